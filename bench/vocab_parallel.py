"""Vocabulary parallelism side by side: baseline, redistribute, alg1 and alg2 pipelines.

    python bench/vocab_parallel.py [--vocab 65536 131072] [--pp 2 4] [--steps 4] [--json out.json]

CPU part: a model with a vocabulary large against its hidden size (dim 256, 8 layers, vocab
64k and 128k), sequences of 128 tokens, 8 microbatches of one sequence per step, 1F1B, fp32.
For every pipeline degree, vocabulary size and method, in this one run:

- per-stage compute: each pipeline rank's work for one microbatch (its blocks forward and
  backward, plus the embedding and the output layer with its loss on the first and last stage,
  or its vocabulary passes), timed alone in this process; the max over min of the ranks;
- per-stage parameter memory: the max over min of the ranks' parameter bytes;
- iteration time: real training steps on pp gloo processes (median after one warm-up step);
- peak activation memory: per rank, the most bytes held for backward between two actions
  (tensors autograd saved, parameters excluded, plus the state the vocabulary passes keep);
  the max over ranks.

`alg2-paper` is alg2 on the paper's schedule: one extra warm-up forward (p + 1 microbatches in
flight on the first stage) where skipjack ships two (`EXTRA_WARMUP`, p + 2), run by the same
runtime: the measured price of the second warm-up in activation memory and what it buys in time.

Paper part: the simulator's prediction of MFU for the paper's 8-GPU 1F1B setting (hidden 3072,
32 layers, 24 heads, sequence 4096, 128 microbatches; vocab 32k to 256k), from the same cost
model the trainer uses to place the vocabulary passes, next to the MFU the paper measured
(Yeung et al. 2025, table 5). The prediction assumes every FLOP runs at peak, so compare ratios
between methods, not absolute values. A second paper-setting table puts alg2 with one and two
extra warm-up forwards side by side: the most microbatches any rank holds, the activation memory
that takes (34 s h bytes per layer and microbatch in bf16, Korthikanti et al. 2022, with
flash attention storing no s x s scores) and the simulated MFU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from skipjack.config import ModelConfig, ParallelConfig, TrainConfig, TrainJobConfig
from skipjack.data.loader import ShardedLoader
from skipjack.launch.env import init_distributed
from skipjack.models.llama import Llama, Stage, VocabShards
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.schedule import build_schedule
from skipjack.parallel.pipeline.simulate import simulate
from skipjack.parallel.pipeline.vocab import VocabParallel, insert_vocab_passes
from skipjack.parallel.tensor import TensorParallel, vocab_parallel_cross_entropy
from skipjack.testing import run_ranks
from skipjack.testing.reference import SyntheticSamples, tiny_config
from skipjack.trainer import pipeline
from skipjack.trainer.engine import NativeEngine
from skipjack.trainer.pipeline import EXTRA_WARMUP, pipeline_cost_model, stage_layers

METHODS = ("baseline", "redistribute", "alg1", "alg2")
PAPER_ALG2 = "alg2-paper"  # alg2 with the paper's single extra warm-up forward
MEASURED = METHODS + (PAPER_ALG2,)
SEQ_LEN, MICROBATCHES = 128, 8
# Yeung et al. 2025, table 5: 8 GPUs, 1F1B, sequence 4096; MFU (%) at vocab 32k/64k/128k/256k
PAPER_VOCABS = (32768, 65536, 131072, 262144)
PAPER_MFU = {
    "baseline": (47.05, 41.87, 35.00, 26.75),
    "redistribute": (46.93, 46.78, 47.44, 43.01),
    "alg1": (50.98, 50.98, 50.83, 50.66),
    "alg2": (50.93, 50.75, 50.56, 50.40),
}


def model(vocab: int, dim: int = 256, layers: int = 8, heads: int = 8, ffn: int = 768, seq=512):
    return tiny_config(
        name=f"bench-{vocab}", dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads,
        ffn_dim=ffn, vocab_size=vocab, max_seq_len=seq,
    )  # fmt: skip


def job_for(cfg: ModelConfig, method: str, pp: int, seq_len: int = SEQ_LEN) -> TrainJobConfig:
    vocab = method.removesuffix("-paper") if method.startswith("alg") else "none"
    partition = "redistribute" if method == "redistribute" else "even"
    return TrainJobConfig(
        model=cfg,
        parallel=ParallelConfig(pp=pp, partition=partition, vocab_parallel=vocab),
        train=TrainConfig(
            steps=100,
            global_batch_size=MICROBATCHES,
            micro_batch_size=1,
            seq_len=seq_len,
            dtype="fp32",
        ),
    )


# -- per-stage compute and parameter memory (this process, no communication) -----------------


def _timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stage_work(job: TrainJobConfig, rank: int) -> tuple[float, int]:
    """(seconds of one microbatch's work, parameter bytes) of pipeline rank `rank`."""
    cfg, pp, vocab = job.model, job.parallel.pp, job.parallel.vocab_parallel
    layers = stage_layers(job, pp)[rank]
    first, last = rank == 0, rank == pp - 1
    stage = Llama(cfg, Stage(layers, first, last), TensorParallel(), vocab != "none")
    stage.init_weights(0)
    modules = [stage]
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ_LEN), generator=gen)
    hidden = torch.randn(1, SEQ_LEN, cfg.dim, generator=gen)
    if vocab == "none":

        def work():
            inputs = tokens if first else hidden.clone().requires_grad_()
            out = stage(inputs)
            if last:
                vocab_parallel_cross_entropy(out, tokens, stage.tp, cfg.vocab_size).sum().backward()
            else:
                out.backward(torch.ones_like(out))

    else:
        shards = VocabShards(cfg, rank, pp).init_weights(0)
        modules.append(shards)
        passes = VocabParallel(
            shards, dist.group.WORLD, TensorParallel(), 0, 0, 0, (1, SEQ_LEN, cfg.dim), vocab
        )

        def work():
            out = stage(hidden.clone().requires_grad_())
            out.backward(torch.ones_like(out))
            passes.embed(0, tokens)
            passes.embedding(0)
            passes.hidden[0] = hidden
            passes.output(0, tokens)
            passes.reduce(0, 1.0)
            passes.output_grad(0)
            passes.weight_grad(0)
            passes.input_grads[0] = hidden
            passes.embedding_grad(0)
            passes.finish()

    seconds = _timed(work)
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return seconds, params


# -- iteration time and peak activation memory (pp processes) ---------------------------------


class ActivationMeter:
    """Bytes held for backward, sampled after every pipeline action: tensors autograd saved
    (deduplicated by storage, parameters excluded) plus the vocabulary passes' kept state."""

    def __init__(self, params, vocab: VocabParallel | None):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.vocab = vocab
        self.live: dict[int, list] = {}  # storage -> [bytes, holders]
        self.peak = 0

    def pack(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in self.params or tensor.device.type == "meta":
            return tensor
        return _Held(self, tensor, ptr)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def sample(self) -> None:
        held = {ptr: entry[0] for ptr, entry in self.live.items()}
        if self.vocab is not None:
            for name in ("hidden", "input_grads", "_embedded", "_partials", "_stats", "_saved"):
                for value in getattr(self.vocab, name).values():
                    for t in value if isinstance(value, tuple) else (value,):
                        if isinstance(t, torch.Tensor):
                            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(held.values()))


class _Held:
    def __init__(self, meter: ActivationMeter, tensor: torch.Tensor, ptr: int):
        self.meter, self.tensor, self.ptr = meter, tensor, ptr
        entry = meter.live.setdefault(ptr, [tensor.untyped_storage().nbytes(), 0])
        entry[1] += 1

    def __del__(self):
        entry = self.meter.live.get(self.ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.meter.live[self.ptr]


def run_steps(job: TrainJobConfig, steps: int, extra_warmup: int | None = None) -> dict:
    device = torch.device("cpu")
    if extra_warmup is not None:  # this process only: the trainer's schedule with other slack
        pipeline.EXTRA_WARMUP = {**EXTRA_WARMUP, job.parallel.vocab_parallel: extra_warmup}
    dims = ParallelDims(dp=1, pp=job.parallel.pp, rank=dist.get_rank()).build_groups()
    engine = NativeEngine(job, dims, MICROBATCHES, device)
    runtime = engine.runtime
    meter = ActivationMeter(engine.model.parameters(), runtime.vocab)
    flush = runtime.p2p.flush

    def flush_and_sample(*args):  # the runtime flushes after every action
        meter.sample()
        flush(*args)

    runtime.p2p.flush = flush_and_sample
    data = SyntheticSamples((steps + 1) * MICROBATCHES, SEQ_LEN, job.model.vocab_size)
    loader = ShardedLoader(data, MICROBATCHES, 1, 0, 1)
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            engine.forward_backward(loader.next())
        engine.optimizer_step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times[1:]), "peak_activation_bytes": meter.peak}


# -- the paper's setting, simulated ----------------------------------------------------------


def paper_setting(
    method: str, vocab: int, pp: int = 8, microbatches: int = 128, extra_warmup: int | None = None
) -> tuple[float, int, float]:
    """(MFU, most microbatches any rank holds, the most activation bytes any rank holds) of the
    paper's setting: model FLOPs over pp x makespan, every pass at peak speed (cost unit =
    forward FLOPs); activations 34 s h bytes per layer and microbatch (bf16, flash attention)."""
    seq, dim = 4096, 3072
    cfg = model(vocab, dim=dim, layers=32, heads=24, ffn=8192, seq=seq)
    job = job_for(cfg, method, pp, seq_len=seq)
    layers = stage_layers(job, pp)
    vocab_parallel = job.parallel.vocab_parallel
    if extra_warmup is None:
        extra_warmup = EXTRA_WARMUP[vocab_parallel]
    cost = pipeline_cost_model(cfg, seq, layers, vocab_parallel, pp)
    schedule = build_schedule("1f1b", pp, microbatches, 1, extra_warmup)
    if vocab_parallel != "none":
        schedule = insert_vocab_passes(schedule, cost)
    result = simulate(schedule, cost)
    plain = pipeline_cost_model(cfg, seq, layers)  # everything on stages: the model's FLOPs
    useful = 3 * microbatches * sum(plain.forward)
    held = [n * len(layers[r]) * 34 * seq * dim for r, n in enumerate(result.peak_activations)]
    return useful / (pp * result.makespan), max(result.peak_activations), max(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--paper-microbatches", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    init_distributed(torch.device("cpu"))  # a world of one for the per-stage timings
    rows = []
    for pp in args.pp:
        for vocab in args.vocab:
            cfg = model(vocab)
            work = {}
            for method in MEASURED:
                job = job_for(cfg, method, pp)
                if method == PAPER_ALG2:  # the same stages as alg2, another schedule
                    work[method] = work["alg2"]
                else:
                    work[method] = [stage_work(job, rank) for rank in range(pp)]
                warmup = 1 if method == PAPER_ALG2 else None
                results = run_ranks(run_steps, pp, job, args.steps, warmup, timeout=1800)
                seconds, params = zip(*work[method], strict=True)
                rows.append(
                    {
                        "pp": pp,
                        "vocab": vocab,
                        "method": method,
                        "stage_seconds": seconds,
                        "stage_param_bytes": params,
                        "iteration_s": max(r["seconds"] for r in results),
                        "peak_activation_bytes": max(r["peak_activation_bytes"] for r in results),
                    }
                )
                print(f"measured pp={pp} vocab={vocab} {method}", flush=True)
    print(f"\nCPU, dim 256, 8 layers, seq {SEQ_LEN}, {MICROBATCHES} microbatches of 1, 1F1B, fp32")
    header = (
        f"{'pp':>3}{'vocab':>8} {'method':<13}{'compute max/min':>16}{'params max/min':>15}"
        f"{'iteration s':>12}{'vs best':>8}{'peak act MiB':>13}"
    )
    print(header)
    for row in rows:
        best = min(
            r["iteration_s"] for r in rows if (r["pp"], r["vocab"]) == (row["pp"], row["vocab"])
        )
        c, p = row["stage_seconds"], row["stage_param_bytes"]
        print(
            f"{row['pp']:>3}{row['vocab']:>8} {row['method']:<13}{max(c) / min(c):>16.2f}"
            f"{max(p) / min(p):>15.2f}{row['iteration_s']:>12.2f}"
            f"{row['iteration_s'] / best:>7.2f}x{row['peak_activation_bytes'] / 2**20:>13.1f}"
        )
    print(
        f"\nPaper setting (8 GPUs, 1F1B, dim 3072, 32 layers, seq 4096, "
        f"{args.paper_microbatches} microbatches): MFU, simulated vs paper (table 5)"
    )
    print(f"{'vocab':>8} " + "".join(f"{m:>26}" for m in METHODS))
    paper_rows = []
    for i, vocab in enumerate(PAPER_VOCABS):
        predicted = {m: paper_setting(m, vocab, 8, args.paper_microbatches)[0] for m in METHODS}
        paper_rows.append({"vocab": vocab, "predicted": predicted})
        best_p, best_m = max(predicted.values()), max(PAPER_MFU[m][i] for m in METHODS)
        cells = "".join(
            f"{predicted[m]:>10.1%} ({predicted[m] / best_p:.2f})"
            f"{PAPER_MFU[m][i]:>6.1f} ({PAPER_MFU[m][i] / best_m:.2f})"
            for m in METHODS
        )
        print(f"{vocab:>8} {cells}")
    print("(each cell: simulated MFU (ratio to the best method), paper MFU % (ratio to the best))")
    print("\nPaper setting, alg2: one extra warm-up forward (the paper's) against two (skipjack's)")
    print(f"{'vocab':>8}{'warm-ups':>9}{'most held':>10}{'act GiB':>9}{'vs one':>8}{'MFU':>8}")
    for vocab in PAPER_VOCABS:
        one, two = (paper_setting("alg2", vocab, 8, args.paper_microbatches, w) for w in (1, 2))
        for warmups, (mfu, held, act) in ((1, one), (2, two)):
            row = {"vocab": vocab, "extra_warmup": warmups, "mfu": mfu, "microbatches_held": held}
            paper_rows.append(row | {"activation_bytes": act})
            print(
                f"{vocab:>8}{warmups:>9}{held:>10}{act / 2**30:>9.1f}{act / one[2]:>7.2f}x"
                f"{mfu:>8.1%}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "paper": paper_rows}, f, indent=2)


if __name__ == "__main__":
    main()
