"""The persistent tier: sharded DCP checkpoints on a shared file system (checkpoint/sharded.py).

`<checkpoint.dir>/step-0000120/` holds one checkpoint: DCP's files and, written last, the marker
`checkpoint.json` (step, layout, and the size and checksum of every file; checkpoint/marker.py).
A part that saves itself in its own format (`own_format`: DeepSpeed's ZeRO files) writes into
`step-*/<part>/`, checksummed in the marker like the rest.
A directory without the marker is never loaded, so a crash in the middle of a save leaves the
previous checkpoints as they were; a save into a step's directory first removes what an
interrupted save left there. At most one save is in flight: the next one waits for it. Once the
files are written, every rank hashes its own files in its background thread, rank 0 gathers the
digests, checks that every file the metadata names is there, writes the marker and keeps the
newest `keep_last` complete checkpoints.

Resume (`checkpoint.resume`): `none`; `auto`, the newest complete checkpoint under
`checkpoint.dir` (a run without one starts fresh); or a path, either a run directory (its
`checkpoints/`, or itself, holds `step-*`) or one `step-*` directory. Every rank verifies its
share of the checksums; under `auto` a checkpoint that fails falls back to the previous one with
a warning, an explicit path fails with an error naming the file.
"""

from __future__ import annotations

import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from skipjack.checkpoint.marker import (
    complete_checkpoints,
    digests,
    marked_step,
    own_files,
    verify,
    write_marker,
)
from skipjack.checkpoint.sharded import CheckpointError, Saving, flatten, load, save_async
from skipjack.checkpoint.state import State
from skipjack.config import CheckpointConfig, ModelConfig
from skipjack.parallel.dims import ParallelDims


def own_format(state: State) -> State:
    """The parts that save and load their own files (`save_files(directory)`,
    `load_files(directory)`: the DeepSpeed engine's ZeRO partitions) instead of tensors."""
    return {part: s for part, s in state.items() if hasattr(s, "save_files")}


def _files(directory: Path) -> list[Path]:
    return [f for f in directory.rglob("*") if f.is_file()]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def resume_candidates(resume: str, root: Path) -> tuple[list[Path], bool]:
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


class PersistentTier:
    """Step directories under `checkpoint.dir`, every `checkpoint.interval` steps."""

    name = "persistent"

    def __init__(self, cfg: CheckpointConfig, model: ModelConfig, dims: ParallelDims, lead: bool):
        self.cfg = cfg
        self.notes: list[str] = []  # nothing to say besides where it read
        self.model = model
        self.root = Path(cfg.dir).expanduser()
        self.dims = dims
        self.lead = lead
        self.group = dims.group("checkpoint")
        self.layout = {"dp": dims.dp, "pp": dims.pp, "tp": dims.tp}
        self._pending: tuple[Saving, Future] | None = None
        self._found: Path | None = None
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="skipjack-ckpt")

    # -- resume ----------------------------------------------------------------------------

    def newest(self) -> int | None:
        """The step of the checkpoint to resume from (every rank agrees), None without one;
        raises CheckpointError when an explicit `checkpoint.resume` path cannot be used."""
        self._found = self.find()
        return None if self._found is None else marked_step(self._found)

    def where(self) -> str:
        return str(self._found)

    def find(self) -> Path | None:
        """The checkpoint to resume from: rank 0 lists the candidates, every rank verifies its
        share of each, and the first that passes on all ranks is chosen (on all ranks)."""
        listed: list = [None]
        if self.lead:
            try:
                listed[0] = resume_candidates(self.cfg.resume, self.root)
            except CheckpointError as e:
                listed[0] = e
        dist.broadcast_object_list(listed, group=self.group, group_src=0)
        if isinstance(listed[0], CheckpointError):
            raise listed[0]
        candidates, fallback = listed[0]
        for directory in candidates:
            problem = self._verify_on_every_rank(directory)
            if problem is None:
                return directory
            if not fallback:
                raise CheckpointError(problem)
            if self.lead:
                warnings.warn(f"skipjack: skipping checkpoint: {problem}", stacklevel=2)
        if candidates:
            raise CheckpointError(f"no intact checkpoint among {[str(c) for c in candidates]}")
        return None

    def _verify_on_every_rank(self, directory: Path) -> str | None:
        """The first problem any rank finds in its share of `directory`'s files, or None."""
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        try:
            verify(directory, rank, world)
            problem = None
        except CheckpointError as e:
            problem = str(e)
        problems: list = [None] * world
        dist.all_gather_object(problems, problem, group=self.group)
        return next((p for p in problems if p is not None), None)

    def load(self, state: State) -> None:
        """Fill `state` from the checkpoint `newest` found: the parts in their own format from
        their files, the others through DCP."""
        own = own_format(state)
        load(
            {part: s for part, s in state.items() if part not in own}, str(self._found), self.group
        )
        for part, s in own.items():
            s.load_files(self._found / part)

    # -- save ------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.cfg.interval > 0 and step % self.cfg.interval == 0

    def save(self, step: int, state: State) -> None:
        """Start saving this rank's `state` of `step` (a collective); returns once the save is
        under way. Call `before_update` before changing any parameter or optimizer state."""
        self.wait()
        directory = step_dir(self.root, step)
        if self.lead:
            if directory.exists():
                shutil.rmtree(directory)  # what an interrupted save of this step left
            directory.mkdir(parents=True)
        dist.barrier(group=self.group)
        own = own_format(state)
        for part, s in own.items():  # a collective each, written before the DCP save starts
            s.save_files(directory / part)
        parts = {part: s.state_dict() for part, s in state.items() if part not in own}
        saving = save_async(flatten(parts), str(directory), self.group)
        # rank 0 hashes the files the parts wrote in their own format
        extra = (
            sorted(str(f.relative_to(directory)) for p in own for f in _files(directory / p))
            if self.lead
            else []
        )
        self._pending = (
            saving,
            self._finisher.submit(self._finish, saving, directory, step, extra),
        )

    def _finish(self, saving: Saving, directory: Path, step: int, extra: list[str]) -> None:
        """This rank's background work once the files are written: hash the files it wrote
        (rank 0 also the `extra` files parts wrote in their own format); rank 0 gathers the
        digests, writes the marker (only if every file the metadata names is there) and prunes;
        every rank learns whether that worked."""
        saving.written.result()  # completes on every rank after all files and .metadata exist
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        mine = digests(directory, own_files(directory, rank, world) + extra)
        gathered: list | None = [None] * world if self.lead else None
        dist.gather_object(mine, gathered, group=self.group, group_dst=0)
        outcome: list = [None]
        if self.lead:
            try:
                files = {name: d for part in gathered for name, d in part.items()}
                write_marker(directory, step, self.layout, self.model, files)
                self._prune()
            except Exception as e:  # any failure must reach every rank, not leave them waiting
                outcome[0] = e if isinstance(e, CheckpointError) else CheckpointError(repr(e))
        dist.broadcast_object_list(outcome, group=self.group, group_src=0)
        if outcome[0] is not None:
            raise outcome[0]

    def _prune(self) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def before_update(self) -> None:
        """Block until the save in flight holds its own copy of the tensors."""
        if self._pending is not None:
            self._pending[0].wait_staged()

    def wait(self) -> None:
        """Block until the save in flight is written and marked complete; raises the
        CheckpointError of a save that could not be completed."""
        if self._pending is None:
            return
        saving, finished = self._pending
        self._pending = None
        saving.written.result()
        finished.result()

    def close(self) -> None:
        self.wait()
        self._finisher.shutdown()
