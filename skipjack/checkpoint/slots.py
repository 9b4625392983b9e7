"""One rank's in-memory snapshots as files: two slots, so that a crash in the middle of writing
one leaves the other whole.

A snapshot is a flat training state (`<part>/<key>` -> tensor or plain value, as `sharded.flatten`
makes it): every tensor's bytes go one after another into the slot's file (on /dev/shm a plain
memory copy), plain values are pickled into the manifest. The manifest (`rank<r>.json`) names
both slots with their steps and is replaced atomically (temporary name, then rename) only after
the slot's bytes are written, so a reader sees the old snapshot or the new one, never a torn
one. Tensors are read back into the state's own tensors, in place.

torch is imported where tensors are copied, not with the module: the snapshot agent reads slots
(manifests and bytes) and runs without it, so it starts in a fraction of a second.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from skipjack.atomic import write_text

if TYPE_CHECKING:
    import torch


def local_tensor(value) -> torch.Tensor | None:
    """This rank's tensor of a state value (a DTensor's local shard), None for a plain value."""
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local()
    return value if torch.is_tensor(value) else None


def _bytes_of(tensor: torch.Tensor):
    """The tensor's bytes as a writable buffer (a numpy view of its memory)."""
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


class Slots:
    """Rank `rank`'s two snapshot slots in `directory`; `layout` (plain values: the job's
    layout and this rank's place in it) is kept with every snapshot written."""

    def __init__(self, directory: Path, rank: int, layout: dict | None = None):
        self.directory, self.rank, self.layout = directory, rank, layout
        self.manifest = directory / f"rank{rank}.json"

    def slot_file(self, slot: int) -> Path:
        return self.directory / f"rank{self.rank}.slot{slot}"

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.manifest.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"slots": [None, None], "current": None}

    def steps(self) -> dict[int, int]:
        """step -> slot of every snapshot whose file is whole."""
        return {step: slot for step, (slot, _) in self.snapshots().items()}

    def snapshots(self) -> dict[int, tuple[int, dict | None]]:
        """step -> (slot, layout it was written in) of every snapshot whose file is whole."""
        manifest, out = self.read_manifest(), {}
        for slot, meta in enumerate(manifest["slots"]):
            path = self.slot_file(slot)
            if meta is not None and path.is_file() and path.stat().st_size == meta["size"]:
                out[meta["step"]] = (slot, meta.get("layout"))
        return out

    def write(self, step: int, flat: dict) -> None:
        """Copy `flat` into the slot not holding the newest snapshot, then name it in the
        manifest (the previous snapshot stays whole until then)."""
        manifest = self.read_manifest()
        slot = 0 if manifest["current"] is None else 1 - manifest["current"]
        entries, objects, offset = [], {}, 0
        tensors = []
        for key, value in flat.items():
            tensor = local_tensor(value)
            if tensor is None:
                objects[key] = value
                continue
            nbytes = tensor.numel() * tensor.element_size()
            entries.append([key, str(tensor.dtype), list(tensor.shape), offset, nbytes])
            tensors.append((tensor, offset, nbytes))
            offset += nbytes
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.slot_file(slot)
        manifest["slots"][slot] = None  # while it is rewritten, the slot holds nothing
        self._write_manifest(manifest)
        if not path.is_file() or path.stat().st_size != offset:
            with open(path, "wb") as f:  # same size: its pages stay (a tmpfs zero-fills new ones)
                f.truncate(offset)
        fd = os.open(path, os.O_WRONLY)
        try:  # the kernel copies straight from each tensor's memory (no mapping to fault in)
            for tensor, start, _ in tensors:
                data = memoryview(_bytes_of(tensor))
                while data:
                    written = os.pwrite(fd, data, start)
                    data, start = data[written:], start + written
        finally:
            os.close(fd)
        pickled = base64.b64encode(pickle.dumps(objects)).decode()
        manifest["slots"][slot] = {
            "step": step, "size": offset, "entries": entries, "objects": pickled,
            "layout": self.layout,
        }  # fmt: skip
        manifest["current"] = slot
        self._write_manifest(manifest)

    def read(self, step: int, flat: dict) -> None:
        """Fill `flat`'s tensors in place, and its plain values, from the snapshot of `step`."""
        slot = self.steps()[step]
        meta = self.read_manifest()["slots"][slot]
        objects = pickle.loads(base64.b64decode(meta["objects"]))
        saved = {entry[0]: entry for entry in meta["entries"]}
        missing = [k for k in flat if k not in saved and k not in objects]
        if missing:
            raise KeyError(f"the snapshot of step {step} has no {missing[0]}")
        with open(self.slot_file(slot), "rb", buffering=0) as f:
            for key, value in flat.items():
                tensor = local_tensor(value)
                if tensor is None:
                    flat[key] = objects[key]
                    continue
                _, dtype, shape, start, nbytes = saved[key]
                if list(tensor.shape) != shape or str(tensor.dtype) != dtype:
                    raise ValueError(
                        f"{key}: the snapshot holds {dtype} {shape}, this run {tensor.dtype} "
                        f"{list(tensor.shape)}"
                    )
                direct = tensor.device.type == "cpu" and tensor.is_contiguous()
                target = tensor if direct else tensor.new_empty(tensor.shape, device="cpu")
                f.seek(start)
                if f.readinto(memoryview(_bytes_of(target))) != nbytes:
                    raise ValueError(f"{key}: the snapshot of step {step} is cut short")
                if not direct:
                    tensor.detach().copy_(target)

    def remove(self) -> None:
        for path in (self.manifest, self.slot_file(0), self.slot_file(1)):
            path.unlink(missing_ok=True)

    def _write_manifest(self, manifest: dict) -> None:
        write_text(self.manifest, json.dumps(manifest))
