"""Tensor parallelism side by side: tokens/s and bytes communicated per step.

    python bench/tensor_parallel.py [--preset tiny] [--steps 8] [--seq-len 256] [--json out.json]

Runs tp=1 (one process), tp=2 and tp=2 with sequence parallelism (two gloo processes) on the
same model, data and global batch, one after the other in this run, and prints one table. Bytes
are what one rank sends per optimizer step, counted at the torch.distributed call sites with the
ring algorithm's volumes (forward and backward collectives, gradient norm included).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from skipjack.config import ParallelConfig, TrainConfig, TrainJobConfig
from skipjack.data.loader import ShardedLoader
from skipjack.models.llama import flops_per_token, preset
from skipjack.parallel.dims import ParallelDims
from skipjack.testing import run_ranks
from skipjack.testing.reference import SyntheticSamples
from skipjack.trainer.engine import NativeEngine

# bytes one rank sends in a ring implementation, per byte of the tensor argument named below
SENT_PER_BYTE = {
    "all_reduce": lambda p: 2 * (p - 1) / p,  # the tensor (reduce-scatter + all-gather)
    "all_gather": lambda p: p - 1,  # this rank's input shard, relayed p - 1 times
    "reduce_scatter": lambda p: p - 1,  # this rank's output shard, p - 1 times
    "broadcast": lambda p: 1.0,  # the tensor (upper bound: the root's share)
}


def _tensor_argument(name: str, args: tuple) -> torch.Tensor:
    if name == "all_gather":
        return args[1]  # (output list, input)
    return args[0]  # all_reduce(tensor), reduce_scatter(output, inputs), broadcast(tensor)


class CommCounter:
    """Counts the bytes this rank sends through torch.distributed collectives (ring model)."""

    def __init__(self):
        self.bytes = 0.0
        self._originals = {}

    def __enter__(self):
        for name, per_byte in SENT_PER_BYTE.items():
            original = getattr(dist, name)
            self._originals[name] = original

            def counted(*args, _name=name, _per_byte=per_byte, _original=original, **kwargs):
                p = dist.get_world_size(kwargs.get("group"))
                tensor = _tensor_argument(_name, args)
                if p > 1:
                    self.bytes += tensor.numel() * tensor.element_size() * _per_byte(p)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def measure(
    preset_name: str, tp: int, sequence_parallel: bool, steps: int, seq_len: int, batch: int
) -> dict:
    device = torch.device("cpu")
    dims = ParallelDims(dp=1, tp=tp, rank=dist.get_rank()).build_groups()
    cfg = preset(preset_name, max_seq_len=max(seq_len, 512))
    job = TrainJobConfig(
        model=cfg,
        parallel=ParallelConfig(tp=tp, sequence_parallel=sequence_parallel),
        train=TrainConfig(steps=steps + 2, micro_batch_size=batch, seq_len=seq_len, dtype="fp32"),
    )
    engine = NativeEngine(job, dims, 1, device)
    data = SyntheticSamples((steps + 2) * batch, seq_len, cfg.vocab_size)
    loader = ShardedLoader(data, batch, batch, 0, 1)

    def step():
        engine.step(loader.next())

    for _ in range(2):  # warm-up
        step()
    with CommCounter() as counter:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - start
    tokens = steps * batch * seq_len
    return {
        "tp": tp,
        "sequence_parallel": sequence_parallel,
        "tokens_per_s": tokens / seconds,
        "comm_bytes_per_step": counter.bytes / steps,
        "flops_per_s": tokens * flops_per_token(cfg, seq_len) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    common = (args.steps, args.seq_len, args.batch)
    rows = []
    for tp, sp in [(1, False), (2, False), (2, True)]:
        rows.append(run_ranks(measure, tp, args.preset, tp, sp, *common, timeout=1800)[0])
    base = rows[0]["tokens_per_s"]
    print(f"\n{args.preset}, seq {args.seq_len}, batch {args.batch}, CPU, {args.steps} steps")
    print(f"{'layout':<12}{'tokens/s':>12}{'vs tp=1':>9}{'sent MiB/step/rank':>20}{'GFLOP/s':>10}")
    for r in rows:
        name = f"tp={r['tp']}" + (" sp" if r["sequence_parallel"] else "")
        line = (
            f"{name:<12}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / base:>8.2f}x"
            f"{r['comm_bytes_per_step'] / 2**20:>20.2f}{r['flops_per_s'] / 1e9:>10.1f}"
        )
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
