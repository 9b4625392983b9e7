"""Checkpoint policy: when to save, where, which directories are complete, what to resume from.

`<checkpoint.dir>/step-0000120/` holds one checkpoint: DCP's files and, written last, the marker
`checkpoint.json` (step, layout, and the size and SHA-256 of every file). A directory without the
marker is never loaded, so a crash in the middle of a save leaves the previous checkpoints as
they were; a save into a step's directory first removes what an interrupted save left there.
At most one save is in flight: the next one waits for it. Rank 0 hashes the files and writes the
marker in the background, then keeps the newest `keep_last` complete checkpoints.

Resume (`checkpoint.resume`): `none`; `auto`, the newest complete checkpoint under
`checkpoint.dir` (a run without one starts fresh); or a path, either a run directory (its
`checkpoints/`, or itself, holds `step-*`) or one `step-*` directory. Rank 0 verifies the marker
and every checksum; under `auto` a checkpoint that fails falls back to the previous one with a
warning, an explicit path fails with an error naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from skipjack.atomic import write_text
from skipjack.checkpoint.sharded import CheckpointError, Saving, full_state, load, save_async
from skipjack.config import CheckpointConfig, ModelConfig, RopeScalingConfig
from skipjack.parallel.dims import ParallelDims

MARKER = "checkpoint.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_marker(directory: Path, step: int, layout: dict, model: ModelConfig) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MARKER
    }
    info = {"step": step, "layout": layout, "model": dataclasses.asdict(model), "files": files}
    write_text(directory / MARKER, json.dumps(info, indent=1))


def marked_model(directory: Path) -> ModelConfig:
    """The model config a checkpoint was written with (from its marker)."""
    fields = json.loads((directory / MARKER).read_text())["model"]
    if fields.get("rope_scaling"):
        fields["rope_scaling"] = RopeScalingConfig(**fields["rope_scaling"])
    return ModelConfig(**fields)


def verify(directory: Path) -> int:
    """The step of a complete, intact checkpoint; raises CheckpointError naming the problem."""
    marker = directory / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{directory}: incomplete (no {MARKER}); the save did not finish")
    info = json.loads(marker.read_text())
    for name, expected in info["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint is damaged")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, expected {expected['bytes']}; "
                "the file is truncated or was changed"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch; the file is corrupted")
    return int(info["step"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Step directories with a marker, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def _candidates(resume: str, root: Path) -> tuple[list[Path], bool]:
    """Directories to try, newest first, and whether a failure may fall back to the next."""
    if resume == "none":
        return [], False
    if resume == "auto":
        return complete_checkpoints(root)[::-1], True
    path = Path(resume).expanduser()
    if path.name.startswith("step-"):
        return [path], False
    found = complete_checkpoints(path / "checkpoints") or complete_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"checkpoint.resume={resume}: no complete step-* checkpoint in {path} or "
            f"{path / 'checkpoints'}"
        )
    return found[::-1], True


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, model: ModelConfig, dims: ParallelDims, lead: bool):
        self.cfg = cfg
        self.model = model
        self.root = Path(cfg.dir).expanduser()
        self.dims = dims
        self.lead = lead
        self.group = dims.group("checkpoint")
        self.layout = {"dp": dims.dp, "pp": dims.pp, "tp": dims.tp}
        self._pending: tuple[Saving, Future | None] | None = None
        self.restored_from: Path | None = None
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="skipjack-ckpt") if lead else None

    # -- resume ----------------------------------------------------------------------------

    def find(self) -> Path | None:
        """The verified checkpoint to resume from, chosen by rank 0 and told to every rank."""
        choice: list = [None]
        if self.lead:
            try:
                choice[0] = self._choose()
            except CheckpointError as e:
                choice[0] = e
        dist.broadcast_object_list(choice, src=0, group=self.group)
        if isinstance(choice[0], CheckpointError):
            raise choice[0]
        return choice[0]

    def _choose(self) -> Path | None:
        candidates, fallback = _candidates(self.cfg.resume, self.root)
        for directory in candidates:
            try:
                verify(directory)
                return directory
            except CheckpointError as e:
                if not fallback:
                    raise
                warnings.warn(f"skipjack: skipping checkpoint: {e}", stacklevel=2)
        if candidates:
            raise CheckpointError(f"no intact checkpoint among {[str(c) for c in candidates]}")
        return None

    def restore(self, training, loader) -> dict | None:
        """Load the checkpoint to resume from into `training` and the data position into
        `loader`; returns its trainer values ({step, tokens}), or None for a fresh start."""
        directory = self.find()
        if directory is None:
            return None
        self.restored_from = directory
        state = load(training, self.dims, str(directory), self.group)
        loader.load_state_dict(state["loader"])
        return {key: int(value) for key, value in state["trainer"].items()}

    # -- save ------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.cfg.interval > 0 and step % self.cfg.interval == 0

    def save(self, step: int, training, trainer: dict, loader: dict) -> None:
        """Start saving this rank's state of `step` (a collective); returns once the save is
        under way. Call `before_update` before changing any parameter or optimizer state."""
        self.wait()
        directory = step_dir(self.root, step)
        if self.lead:
            if directory.exists():
                shutil.rmtree(directory)  # what an interrupted save of this step left
            directory.mkdir(parents=True)
        dist.barrier(group=self.group)
        state = full_state(training, self.dims, trainer, loader)
        saving = save_async(state, str(directory), self.group)
        finished = None
        if self.lead:
            finished = self._finisher.submit(self._finish, saving, directory, step)
        self._pending = (saving, finished)

    def _finish(self, saving: Saving, directory: Path, step: int) -> None:
        saving.written.result()  # rank 0's save completes after every rank's files are written
        write_marker(directory, step, self.layout, self.model)
        complete = complete_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def before_update(self) -> None:
        """Block until the save in flight holds its own copy of the tensors."""
        if self._pending is not None:
            self._pending[0].wait_staged()

    def wait(self) -> None:
        """Block until the save in flight is written (and, on rank 0, marked complete)."""
        if self._pending is None:
            return
        saving, finished = self._pending
        self._pending = None
        saving.written.result()
        if finished is not None:
            finished.result()

    def close(self) -> None:
        self.wait()
        if self._finisher is not None:
            self._finisher.shutdown()
