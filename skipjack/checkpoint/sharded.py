"""The persistent tier: a torch.distributed.checkpoint (DCP) state for any layout.

A checkpoint's state dict, by key:

- `model/<name>`: every parameter under its global name (`layers.3.attention.wq.weight`, the same
  in every layout). A sharded parameter is a DTensor over the 1-D device mesh of its shard spec's
  group (`tp`, or `vocab` = the pp x tp ranks of a replica) with the model's true global shape
  (vocabulary padding cut off), so each rank writes only its own rows, described by their global
  offsets, and a rank of any other layout reads exactly the rows it holds. Replicated tensors are
  written once.
- `optim/<name>/<key>`: the optimizer state of that parameter. A tensor shaped like the parameter
  is sharded like it; an optimizer with `state_shard_dim(param, key)` (GaLore) names the dimension
  of each state tensor that is split like the parameter (its moments or its rows of the basis);
  the rest is replicated (Adam's step count, a basis every rank holds whole).
- `lr_schedule`, `trainer` (step, tokens), `loader` (samples consumed, global), `rng`: plain values.

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
from skipjack.parallel.shard_spec import ShardSpec, spec_of, sum_over_replicas


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: names the file or parameter and what to do."""


def _global(local: torch.Tensor, spec: ShardSpec, dims: ParallelDims):
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


def _parameters(training) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of every module this rank trains (stage chunks, vocab shards)."""
    return [(name, p) for module in training.model for name, p in module.named_parameters()]


def model_state(training, dims: ParallelDims) -> dict[str, torch.Tensor]:
    return {
        f"model/{name}": _global(p.detach(), spec_of(p), dims) for name, p in _parameters(training)
    }


def _state_shard_dim(optimizer, p: torch.nn.Parameter, key: str, value) -> int | None:
    """The dimension of optimizer state `value` that runs along `p`'s split dimension and is
    split like it over its shard group (None: the same on every rank of it). The optimizer says
    so (GaLore's bases and moments); otherwise a tensor shaped like the parameter is split like
    it."""
    if hasattr(optimizer, "state_shard_dim"):
        return optimizer.state_shard_dim(p, key)
    spec = spec_of(p)
    return spec.dim if spec.sharded and value.shape == p.shape else None


def _optimizer_state(training, dims: ParallelDims) -> dict[str, torch.Tensor]:
    state = {}
    for name, p in _parameters(training):
        spec = spec_of(p)
        for key, value in training.optimizer.state.get(p, {}).items():
            dim = None
            if isinstance(value, torch.Tensor):
                dim = _state_shard_dim(training.optimizer, p, key, value)
            if dim is not None:
                # along `dim` the state runs along the parameter's split dimension: its global
                # size is the parameter's true one (vocabulary padding dropped)
                padded, shape = list(value.shape), list(value.shape)
                padded[dim] *= spec.num_shards
                shape[dim] = spec.unpadded_shape[spec.dim]
                value_spec = ShardSpec(
                    tuple(padded), dim, spec.group, spec.num_shards, spec.index,
                    replicas=spec.replicas, true_shape=tuple(shape),
                )  # fmt: skip
                value = _global(value, value_spec, dims)
            state[f"optim/{name}/{key}"] = value
    return state


def materialise_optimizer_state(training) -> None:
    """Give every parameter its optimizer state (a step with zero gradients and zero learning
    rate, which changes no weight), so that a load has tensors to fill in place."""
    optimizer = training.optimizer
    if all(p in optimizer.state for _, p in _parameters(training)):
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for _, p in _parameters(training):
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def full_state(training, dims: ParallelDims, trainer: dict, loader: dict) -> dict:
    """Everything a checkpoint holds, as views of this rank's live tensors."""
    state = {**model_state(training, dims), **_optimizer_state(training, dims)}
    state["lr_schedule"] = training.schedule.state_dict()
    state["trainer"] = dict(trainer)
    state["loader"] = dict(loader)
    state["rng"] = torch.get_rng_state()
    return state


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


def save(state: dict, directory: str, group: dist.ProcessGroup) -> None:
    dcp.save(state, checkpoint_id=directory, process_group=group)


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


def load(training, dims: ParallelDims, directory: str, group: dist.ProcessGroup) -> dict:
    """Fill this rank's parameters, optimizer and LR schedule from `directory`; returns the
    trainer, loader and rng values."""
    check_model(directory, _expected_shapes(training))
    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    if not any(key.startswith("trainer") for key in metadata):
        raise CheckpointError(
            f"{directory}: holds weights only (an import); start from it with "
            f"model.init_from={directory} instead of resuming"
        )
    materialise_optimizer_state(training)
    state = full_state(training, dims, {"step": 0, "tokens": 0}, {"consumed_samples": 0})
    dcp.load(state, checkpoint_id=directory, process_group=group)
    join_replicas(training, dims, optimizer=True)
    training.schedule.load_state_dict(state["lr_schedule"])
    for group, lr in zip(
        training.optimizer.param_groups, training.schedule.get_last_lr(), strict=True
    ):
        group["lr"] = lr  # the schedule's state does not reach the optimizer until its next step
    torch.set_rng_state(state["rng"])
    return {"trainer": state["trainer"], "loader": state["loader"]}


def join_replicas(training, dims: ParallelDims, optimizer: bool) -> None:
    """After a load, give every replica of a shard the whole shard: each read only its part
    (see `_global`) of the parameter and, with `optimizer`, of its state shaped like it."""
    for _, p in _parameters(training):
        spec = spec_of(p)
        if not (spec.sharded and spec.replicas > 1):
            continue
        state = training.optimizer.state.get(p, {}) if optimizer else {}
        tensors = [p.data] + [
            v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape
        ]
        group = dims.group(spec.group)
        start, size = spec.replica_part(dist.get_rank(group))
        for tensor in tensors:
            mine = tensor.narrow(spec.dim, start, size).clone()
            tensor.zero_()
            tensor.narrow(spec.dim, start, size).copy_(mine)
            sum_over_replicas(tensor, spec, group)


def _expected_shapes(training) -> dict[str, tuple[int, ...]]:
    """The global shape a checkpoint holds of every parameter this rank trains."""
    return {name: spec_of(p).unpadded_shape for name, p in _parameters(training)}


def check_hf(checkpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError naming the first weight of `expected` (name: global shape) that a
    Hugging Face checkpoint (an `hf.HFCheckpoint`) lacks or holds in another shape."""
    saved = {name: checkpoint.shape(name) for name in checkpoint.names()}
    _check_shapes(str(checkpoint.path), saved, expected)


def load_model(training, dims: ParallelDims, source: str, group: dist.ProcessGroup) -> None:
    """Only the weights (no optimizer, schedule or position) from a Hugging Face directory or a
    skipjack step directory: how post-training starts (`model.init_from`). Either way each rank
    reads only the parts of the weights it holds."""
    from skipjack.checkpoint import hf

    params, expected = _parameters(training), _expected_shapes(training)
    if hf.is_hf_dir(source):
        checkpoint = hf.HFCheckpoint(source, training.model_config)
        check_hf(checkpoint, expected)
        with torch.no_grad():
            for name, p in params:
                p.copy_(checkpoint.read(name, spec_of(p)))
        return
    check_model(source, expected)
    dcp.load(model_state(training, dims), checkpoint_id=source, process_group=group)
    join_replicas(training, dims, optimizer=False)


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
