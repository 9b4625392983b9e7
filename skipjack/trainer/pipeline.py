"""The pipeline a rank runs: stage partition, schedule, model chunks, vocabulary shards, and the
cost model that places the vocabulary passes (and predicts MFU in bench/vocab_parallel.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from skipjack.batch import MicroBatch
from skipjack.config import ConfigError, ModelConfig, TrainJobConfig
from skipjack.models.llama import Llama, Stage, VocabShards, block_flops, output_flops
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.comm import P2P, Emulator
from skipjack.parallel.pipeline.network import Links
from skipjack.parallel.pipeline.partition import (
    even_partition,
    explicit_partition,
    redistribute_partition,
)
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.runtime import Loss, PipelineRuntime
from skipjack.parallel.pipeline.schedule import Schedule, build_schedule, schedule_from_routes
from skipjack.parallel.pipeline.simulate import CostModel
from skipjack.parallel.pipeline.skippipe import SkipPipe
from skipjack.parallel.pipeline.vocab import VocabParallel, insert_vocab_passes
from skipjack.parallel.tensor import TensorParallel, vocab_parallel_cross_entropy

# Extra warm-up forwards under vocabulary parallelism: between the last stage's forward of a
# microbatch and its backward, every other rank must reach an action boundary twice (to run S,
# then R). The paper gives alg2 one (one barrier), but with whole stages as actions one forward
# of slack leaves the last stage waiting: simulated MFU for the paper's 8-GPU setting drops 2-8%
# at 32k-128k (bench/vocab_parallel.py), so both algorithms take two.
EXTRA_WARMUP = {"none": 0, "alg1": 2, "alg2": 2}


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on CUDA; CPU runs in fp32 (CPU bf16 matmuls are slower, not faster)."""
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stage_layers(job: TrainJobConfig, num_stages: int) -> list[range]:
    """The blocks of every stage: explicit counts, Megatron's redistribute, or even."""
    p, m = job.parallel, job.model
    if p.layers_per_stage:
        return explicit_partition(list(p.layers_per_stage), m.n_layers, num_stages)
    if p.partition == "redistribute":
        return redistribute_partition(
            m.n_layers, num_stages, block_flops(m, job.train.seq_len), 0.0, output_flops(m)
        )
    return even_partition(m.n_layers, num_stages)


def plan_flops(
    m: ModelConfig,
    seq_len: int,
    layers: list[range],
    plan: StepPlan,
    tokens: int,
    tp: int = 1,
    add_shards: Callable[[float], float] | None = None,
) -> float:
    """Training FLOPs (3 x forward) of a step along `plan`, microbatches of `tokens` tokens:
    for each microbatch the blocks of the stages its route visits, each running the plan's
    subnet of it, and the output layer. A subnet names one tensor-parallel shard's heads and
    neurons: `add_shards` adds up the shards' counts (a regime's global selection falls
    unevenly on them; a collective), else every shard is counted as this one. The full plan gives
    `flops_per_token` x tokens."""
    per_stage = [
        sum(block_flops(m, seq_len, plan.subnets.get(b), tp) for b in blocks) for blocks in layers
    ]
    routes = [hops for replica in plan.routes for hops in replica]
    blocks = sum(sum(per_stage[stage] for _, stage in hops) for hops in routes)
    blocks = add_shards(blocks) if add_shards is not None else tp * blocks
    return 3.0 * tokens * (blocks + len(routes) * output_flops(m))


def pipeline_cost_model(
    m: ModelConfig, seq_len: int, layers: list[range], vocab_parallel: str = "none", shards: int = 1
) -> CostModel:
    """Relative costs in forward FLOPs per token (backward = 2 x forward): every stage's blocks;
    without vocabulary parallelism the first stage also pays the embedding lookup and the last
    the output layer and loss; with it each of the `shards` ranks pays its share as vocabulary
    passes (S: logits, plus the input-gradient piece under alg2; R: that piece under alg1;
    T: the weight gradient; E and G: lookups)."""
    forward = [len(r) * block_flops(m, seq_len) for r in layers]
    output = output_flops(m)
    if vocab_parallel == "none":
        forward[0] += m.dim
        forward[-1] += output
        return CostModel(forward, [2 * f for f in forward])
    shard, lookup = output / shards, m.dim / shards
    return CostModel(
        forward,
        [2 * f for f in forward],
        vocab={
            "E": lookup,
            "S": shard * (2 if vocab_parallel == "alg2" else 1),
            "R": shard if vocab_parallel == "alg1" else lookup,
            "T": shard,
            "G": lookup,
        },
    )


def plan_layers(job: TrainJobConfig, schedule: Schedule) -> list[range]:
    """The blocks of every stage of `schedule`, the head place (SkipPipe) holding none."""
    layers = stage_layers(job, schedule.pp * schedule.vpp)
    return layers + [range(0)] if schedule.head else layers


def message_bytes(job: TrainJobConfig, dims: ParallelDims, accumulation: int) -> float:
    """Bytes of one activation between two stages (sent as fp32)."""
    micro_batch = job.train.global_batch_size // (dims.dp * accumulation)
    return 4.0 * micro_batch * job.train.seq_len * job.model.dim


def build_pipeline(
    job: TrainJobConfig,
    dims: ParallelDims,
    tp: TensorParallel,
    accumulation: int,
    device: torch.device,
    links: Links,
) -> PipelineRuntime:
    """This rank's model chunks (one per stage it owns) and the runtime that runs the schedule,
    its transfers delayed by `links` where they are slow (network emulation).

    Without pipeline parallelism it is one chunk holding the whole model and a one-stage 1F1B
    (forward and backward of each micro-batch in turn): one code path for every layout. Under
    SkipPipe, pipeline rank 0 also holds the output layer and loss as a chunk of its own (the
    schedule's head place) and the schedule is built from routes.
    """
    p, m = job.parallel, job.model
    vocab_parallel = p.vocab_parallel != "none"
    if not links.free() and device.type == "cuda":
        raise ConfigError(
            "parallel.skippipe.network",
            "network emulation delays gloo sends from a thread; NCCL matches a pair's messages "
            "in issue order and batches them per group, so emulate on CPU (network=none here)",
        )
    if p.skippipe.enabled:
        full = StepPlan.full(1, accumulation, p.pp + 1).places(p.pp + 1)
        schedule = schedule_from_routes(p.pp, full, in_flight=p.skippipe.memory, head=True)
    else:
        warmup = EXTRA_WARMUP[p.vocab_parallel]
        schedule = build_schedule(p.schedule, p.pp, accumulation, p.vpp, warmup)
    layers = plan_layers(job, schedule)
    last = schedule.num_stages - 1
    chunks = []
    for chunk in range(schedule.chunks(dims.pp_rank)):
        stage = schedule.place(dims.pp_rank, chunk)
        part = Stage(layers[stage], stage == 0, stage == last)
        chunks.append(Llama(m, part, tp, vocab_parallel).init_weights(job.train.seed, device))
    vocab = None
    if vocab_parallel:
        index, size = dims.pp_rank * dims.tp + dims.tp_rank, dims.pp * dims.tp
        shards = VocabShards(m, index, size).init_weights(job.train.seed, device)
        cost = pipeline_cost_model(m, job.train.seq_len, layers, p.vocab_parallel, size)
        schedule = insert_vocab_passes(schedule, cost)
        vocab = VocabParallel(
            shards,
            dims.group("vocab"),
            tp,
            dims.pp_rank,
            schedule.owner(0)[0],
            schedule.owner(last)[0],
            (job.train.micro_batch_size, job.train.seq_len, m.dim),
            p.vocab_parallel,
        )
    return PipelineRuntime(
        schedule,
        chunks,
        dims.pp_rank,
        P2P(
            dims.group("pipe"),
            dims.dp * schedule.num_stages,
            device,
            Emulator.over(links, dims.pipe_ranks(), dims.rank),
        ),
        device,
        cross_entropy(tp, m.vocab_size),
        lambda: autocast_for(device, job.train.dtype),
        vocab,
        dims.dp_rank,
        dims.pipe_ranks(),
    )


def cross_entropy(tp: TensorParallel, vocab_size: int) -> Loss:
    """The pre-training loss: summed token cross-entropy over the vocabulary shards of `tp`
    (positions labelled IGNORE_INDEX count nothing)."""

    def loss(logits: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, batch.labels, tp, vocab_size).sum()

    return loss


def build_skippipe(
    job: TrainJobConfig,
    dims: ParallelDims,
    accumulation: int,
    layers: list[range],
    links: Links,
    device: torch.device,
) -> SkipPipe:
    """The job's SkipPipe paths, costed by each stage's FLOPs at `compute_tflops` or this
    device's measured matmul throughput (the output layer and loss on the data node), over
    `links`."""
    m, t, tflops = job.model, job.train, job.parallel.skippipe.compute_tflops
    tokens = job.train.global_batch_size // (dims.dp * accumulation) * t.seq_len
    speed = tflops * 1e12 if tflops else matmul_flops_per_second(device) * dims.tp  # a node's
    seconds = tokens / speed
    forward = [len(blocks) * block_flops(m, t.seq_len) * seconds for blocks in layers[:-1]]
    loss = output_flops(m) * seconds
    return SkipPipe.plan_paths(
        job.parallel.skippipe,
        dims.dp,
        job.parallel.pp,
        accumulation,
        links,
        forward,
        loss,
        message_bytes(job, dims, accumulation),
    )


def matmul_flops_per_second(device: torch.device, size: int = 512, repeats: int = 8) -> float:
    """Multiply-adds x 2 per second of fp32 matmuls on `device` (a rough scale for costs)."""
    a = torch.randn(size, size, device=device)
    (a @ a).sum().item()
    started = time.perf_counter()
    for _ in range(repeats):
        a = (a @ a) / size
    a.sum().item()
    return 2.0 * size**3 * repeats / (time.perf_counter() - started)
