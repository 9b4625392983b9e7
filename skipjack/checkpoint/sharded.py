"""The persistent tier's format: a torch.distributed.checkpoint (DCP) state for any layout.

A checkpoint holds the parts of a training state (checkpoint/state.py), one key per entry of a
part's state dict: `model/<name>` for every parameter under its global name, `optim/<name>/<key>`
for its optimizer state, `lr_schedule/<key>`, `trainer/step`, `trainer/tokens`,
`loader/consumed_samples`, `rng/cpu`. A sharded tensor is a DTensor over the 1-D device mesh of
its shard spec's group (`tp`, or `vocab` = the pp x tp ranks of a replica) with its true global
shape (vocabulary padding cut off), so each rank writes only its own rows, described by their
global offsets, and a rank of any other layout reads exactly the rows it holds. Replicated
tensors are written once.

Saving wraps the live tensors (no copy); DCP's stager copies them before anything is written, and
the caller must not change them until that copy is done (`Saving.wait_staged`). Loading builds the
same dict around the new layout's tensors and DCP fills them in place.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.tensor import DTensor, Shard

from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.shard_spec import ShardSpec, spec_of


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: names the file or parameter and what to do."""


def as_global(local: torch.Tensor, spec: ShardSpec, dims: ParallelDims):
    """`local` (this rank's shard, padding included) as a view of the global tensor of the real
    values (`spec.unpadded_shape`).

    A shard held by several ranks (replicated kv heads) is written, and read, in equal parts:
    the replica j of a shard takes its j-th part, so every row is written once and the global
    tensor is split evenly over every rank of the group (`join_replicas` reassembles a load)."""
    if not spec.sharded:
        return local
    shape = spec.unpadded_shape
    if spec.replicas > 1:
        rank = dist.get_rank(dims.group(spec.group))
        local = local.narrow(spec.dim, *spec.replica_part(rank))
        shards = spec.num_shards * spec.replicas
        spec = ShardSpec(spec.global_shape, spec.dim, spec.group, shards, rank, true_shape=shape)
    # torch.chunk layout: ceil(n / shards) rows each, the last shard short: exactly the padded
    # split, with padding rows (beyond `shape`) dropped
    start = spec.offsets[spec.dim]
    rows = max(0, min(local.shape[spec.dim], shape[spec.dim] - start))
    real = local.narrow(spec.dim, 0, rows)
    stride = torch.empty(shape, device="meta").stride()
    mesh = dims.mesh_of(spec.group)
    return DTensor.from_local(real, mesh, [Shard(spec.dim)], shape=torch.Size(shape), stride=stride)


def flatten(parts: dict[str, dict]) -> dict:
    """The DCP state dict of the state dicts of a training state's parts: `<part>/<key>`."""
    return {f"{part}/{key}": value for part, d in parts.items() for key, value in d.items()}


@dataclass
class Saving:
    """A save in flight: `staged` once DCP holds its own copy, `written` once on disk."""

    staged: object
    written: object

    def wait_staged(self) -> None:
        self.staged.result()


def save_async(state: dict, directory: str, group: dist.ProcessGroup) -> Saving:
    """Start writing `state` into `directory` (a collective over `group`). Staging (the copy of
    the tensors) and writing both run in the background."""
    stager = DefaultStager(StagingOptions(False, False, True, False))
    response = dcp.async_save(
        state, checkpoint_id=directory, process_group=group, async_stager=stager
    )
    return Saving(response.staging_completion, response.upload_completion)


def data_files(directory: str) -> list[str]:
    """The data files DCP's `.metadata` says the checkpoint in `directory` is stored in."""
    try:
        metadata = dcp.FileSystemReader(directory).read_metadata()
    except Exception as e:  # missing, truncated or not a pickle: each its own exception type
        raise CheckpointError(
            f"{directory}/.metadata: unreadable ({type(e).__name__}: {e}); the checkpoint is "
            "damaged"
        ) from e
    return sorted({info.relative_path for info in metadata.storage_data.values()})


def files_written_by(names: list[str], rank: int) -> list[str]:
    """Those of `names` that `rank` of the saving group wrote: DCP's file system writer gives
    each rank's files the prefix `__<rank>_`."""
    return [name for name in names if name.startswith(f"__{rank}_")]


def check_model(directory: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError naming the first parameter whose shape differs between the
    checkpoint and this run (or that one of them lacks)."""
    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    saved = {
        key[len("model/") :]: tuple(md.size)
        for key, md in metadata.items()
        if key.startswith("model/") and isinstance(md, TensorStorageMetadata)
    }
    _check_shapes(directory, saved, expected)
    extra = sorted(set(saved) - set(expected))
    if extra and dist.get_world_size() == 1:  # with pp > 1 a rank holds only its stages
        raise CheckpointError(
            f"{directory}: parameter {extra[0]} is in the checkpoint but not in this run's "
            "model; use the model config the checkpoint was written with"
        )


def _check_shapes(
    source: str, saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> None:
    """Raise CheckpointError naming the first parameter of this run that `source` lacks or
    holds in another shape."""
    for name, shape in expected.items():
        if name not in saved:
            raise CheckpointError(
                f"{source}: has no parameter {name} (shape {shape} in this run); the "
                "checkpoint was written by a different model config"
            )
        if saved[name] != shape:
            raise CheckpointError(
                f"{source}: parameter {name} has shape {saved[name]} in the checkpoint but "
                f"{shape} in this run; use the model config the checkpoint was written with"
            )


def load(state: dict, directory: str, group: dist.ProcessGroup) -> None:
    """Fill the parts of `state` (checkpoint/state.py) from the checkpoint in `directory`, in
    place, in this run's layout."""
    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    if not any(key.startswith("trainer") for key in metadata):
        raise CheckpointError(
            f"{directory}: holds weights only (an import); start from it with "
            f"model.init_from={directory} instead of resuming"
        )
    if "trainer/step" not in metadata:
        raise CheckpointError(
            f"{directory}: written by skipjack before 2026-12-02 in an older layout of the "
            f"training state; resume it with that version, or start from its weights with "
            f"model.init_from={directory}"
        )
    saved = {key.split("/", 1)[0] for key in metadata}
    parts = {
        part: s.state_dict()
        for part, s in state.items()
        if part in saved or not getattr(s, "optional", False)  # optional: kept when not saved
    }
    if "model" in parts:
        check_model(directory, {name: tuple(t.shape) for name, t in parts["model"].items()})
    flat = flatten(parts)
    dcp.load(flat, checkpoint_id=directory, process_group=group)
    for part, d in parts.items():
        state[part].load_state_dict({key: flat[f"{part}/{key}"] for key in d})


def check_hf(checkpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError naming the first weight of `expected` (name: global shape) that a
    Hugging Face checkpoint (an `hf.HFCheckpoint`) lacks or holds in another shape."""
    saved = {name: checkpoint.shape(name) for name in checkpoint.names()}
    _check_shapes(str(checkpoint.path), saved, expected)


def load_model(state: dict, model_config, source: str, group: dist.ProcessGroup) -> None:
    """Only the weights (the `model` part of `state`, checkpoint/state.py; no optimizer,
    schedule or position) from a Hugging Face directory or a skipjack step directory: how
    post-training starts (`model.init_from`). Either way each rank reads only the parts of the
    weights it holds."""
    from skipjack.checkpoint import hf

    model = state["model"]
    expected = {name: spec_of(p).unpadded_shape for name, p in model.params}
    if hf.is_hf_dir(source):
        checkpoint = hf.HFCheckpoint(source, model_config)
        check_hf(checkpoint, expected)
        with torch.no_grad():
            for name, p in model.params:
                p.copy_(checkpoint.read(name, spec_of(p)))
        return
    check_model(source, expected)
    weights = {f"model/{name}": value for name, value in model.state_dict().items()}
    dcp.load(weights, checkpoint_id=source, process_group=group)
    model.load_state_dict(weights)


def read_model(directory: str) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint, whole, in this process (no process group needed)."""
    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    state = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in metadata.items()
        if key.startswith("model/") and isinstance(md, TensorStorageMetadata)
    }
    with _single_process():
        dcp.load(state, checkpoint_id=directory, no_dist=True)
    return {key[len("model/") :]: value for key, value in state.items()}


def write_model(tensors: dict[str, torch.Tensor], directory: str) -> None:
    """A weights-only checkpoint from whole tensors, in this process."""
    with _single_process():
        dcp.save(
            {f"model/{n}": t for n, t in tensors.items()}, checkpoint_id=directory, no_dist=True
        )


@contextlib.contextmanager
def _single_process():
    """DCP warns that it runs without a process group, which is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
