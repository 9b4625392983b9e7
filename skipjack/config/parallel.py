"""`parallel`: the data, tensor and pipeline degrees and how the pipeline runs, and checks that
need nothing but this section (the rest are in job.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from skipjack.config.choice import Choice
from skipjack.config.errors import ConfigError, positive

Schedule = Choice("Schedule", "gpipe 1f1b interleaved_1f1b")
Partition = Choice("Partition", "even redistribute")
VocabParallel = Choice("VocabParallel", "none alg1 alg2")


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


def validate_parallel(p: ParallelConfig) -> None:
    for name in ("tp", "pp", "vpp", "bucket_mb"):
        positive(f"parallel.{name}", getattr(p, name))
    if (p.vpp > 1) != (p.schedule == "interleaved_1f1b"):
        raise ConfigError(
            "parallel.vpp", "vpp > 1 goes with parallel.schedule=interleaved_1f1b, and only with it"
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
