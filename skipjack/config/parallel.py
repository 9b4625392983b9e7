"""`parallel`: the data, tensor and pipeline degrees and how the pipeline runs, and checks that
need nothing but this section (the rest are in job.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError, positive

Schedule = Choice("Schedule", "gpipe 1f1b interleaved_1f1b")
Partition = Choice("Partition", "even redistribute")
VocabParallel = Choice("VocabParallel", "none alg1 alg2")
Allocation = Choice("Allocation", "layout search")
PROFILES = ("none", "cluster", "multi_cluster", "geo")  # built-in link profiles (network.py)


@dataclass
class SkipPipeConfig:
    """SkipPipe's partial and reordered pipelining (docs/skippipe.md)."""

    enabled: bool = False
    skip_ratio: float = 0.0  # share of the pp stages a microbatch's path skips (never stage 0)
    max_swaps: int = 0  # swaps of two adjacent stages on a path (0: stages in order)
    memory: int = 3  # microbatches a node holds at once (forward done, backward not yet)
    full_pipeline_every: int = 0  # every k-th step runs the whole pipeline (0: never)
    # link profile that pipeline transfers are delayed by (with or without skipping): none,
    # cluster, multi_cluster, geo, or a csv file of links between regions
    network: str = "none"
    # which layout node (replica x pp + stage) sits on which node of the profile: in layout
    # order, or searched to make data-parallel and pipeline links cheap (allocate.py)
    allocation: Allocation = Allocation.layout
    # compute speed the planner assumes per node (its tp ranks together), TFLOP/s; 0: rank 0's
    # matmul throughput x tp, measured at start-up (the plan
    # is saved in checkpoints, so a resume runs the same paths; set it for plans that are the
    # same in every run and layout)
    compute_tflops: float = 0.0


@dataclass
class ParallelConfig:
    """Parallel degrees. `dp=-1` means world size / (pp x tp)."""

    dp: int = -1
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    schedule: Schedule = Schedule["1f1b"]
    partition: Partition = Partition.even
    layers_per_stage: list[int] = field(default_factory=list)
    vocab_parallel: VocabParallel = VocabParallel.none
    # micro-batches per step and replica (what flows through the pipeline); 0: from
    # train.micro_batch_size (`auto` there: enough to fill the pipeline, see derive_micro_batches)
    microbatches: int = 0
    sequence_parallel: bool = False
    bucket_mb: float = 25.0
    skippipe: SkipPipeConfig = field(default_factory=SkipPipeConfig)


def validate_parallel(p: ParallelConfig) -> None:
    for name in ("tp", "pp", "vpp", "bucket_mb"):
        positive(f"parallel.{name}", getattr(p, name))
    if (p.vpp > 1) != (p.schedule == "interleaved_1f1b"):
        raise ConfigError(
            "parallel.vpp", "vpp > 1 goes with parallel.schedule=interleaved_1f1b, and only with it"
        )
    validate_skippipe(p)


def validate_skippipe(p: ParallelConfig) -> None:
    s, name = p.skippipe, "parallel.skippipe"
    if not 0.0 <= s.skip_ratio < 1.0:
        raise ConfigError(f"{name}.skip_ratio", f"must be in [0, 1), got {s.skip_ratio}")
    if s.max_swaps < 0:
        raise ConfigError(f"{name}.max_swaps", f"must be >= 0, got {s.max_swaps}")
    positive(f"{name}.memory", s.memory)
    if s.compute_tflops < 0:
        raise ConfigError(
            f"{name}.compute_tflops", f"must be >= 0 (0: measured), got {s.compute_tflops}"
        )
    if s.full_pipeline_every < 0:
        raise ConfigError(
            f"{name}.full_pipeline_every", f"must be >= 0 (0: never), got {s.full_pipeline_every}"
        )
    if s.network not in PROFILES and not Path(s.network).is_file():
        raise ConfigError(
            f"{name}.network",
            f"{s.network!r} is not one of {', '.join(PROFILES)} and no such file",
        )
    if not s.enabled:
        return
    if p.pp < 2:
        raise ConfigError(f"{name}.enabled", "SkipPipe skips pipeline stages: needs pp >= 2")
    if p.vocab_parallel != "none":
        raise ConfigError(
            f"{name}.enabled",
            "vocabulary parallelism runs whole pipelines only; set parallel.vocab_parallel=none",
        )
    if p.vpp != 1:
        raise ConfigError(f"{name}.enabled", "SkipPipe runs one model chunk per stage; set vpp=1")
    if p.partition == "redistribute":
        raise ConfigError(
            "parallel.partition",
            "redistribute charges the output layer to the last stage; under SkipPipe it is on "
            "the data node: use partition=even or layers_per_stage",
        )


def resolve_dp(p: ParallelConfig, world_size: int) -> int:
    model_parallel = p.tp * p.pp
    if p.dp == -1:
        if world_size % model_parallel:
            raise ConfigError(
                "parallel.tp",
                f"world size {world_size} is not divisible by pp x tp = {model_parallel}",
            )
        return world_size // model_parallel
    positive("parallel.dp", p.dp)
    if p.dp * model_parallel != world_size:
        raise ConfigError(
            "parallel.dp",
            f"dp x pp x tp = {p.dp} x {p.pp} x {p.tp} != world size {world_size}; "
            "set parallel.dp=-1 to derive it or launch that many processes",
        )
    return p.dp
