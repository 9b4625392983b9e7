"""Checkpoint saving side by side: how long the training loop is blocked per save, and save and
load throughput.

    python bench/checkpoint.py [--preset llama_130m] [--saves 2] [--dir /tmp/ckpt-bench]

One process trains the preset (134M parameters with llama_130m; AdamW, fp32, so 1.6 GB of
weights and optimizer state per checkpoint) and saves after every step in three ways, one after
the other in this run:

- skipjack: the checkpoint manager's asynchronous sharded save (DCP with a background stager and
  writer). Blocked = the save call plus any wait for the copy before the next optimizer step;
  the next step's forward and backward run meanwhile.
- torch.save: the gathered state dict (model and optimizer) written synchronously to one file.
- DCP sync: `torch.distributed.checkpoint.save` of the same sharded state, synchronously.

Save throughput is checkpoint bytes over the time until the files are complete; load throughput
is bytes over the time to read them back into the model and optimizer. Last, the checksums the
marker holds: the skipjack checkpoint's files hashed with XXH3-128 (what skipjack uses) and with
SHA-256, side by side, from the page cache (the cost on top of the disk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from skipjack.atomic import replacing
from skipjack.checkpoint.manager import CheckpointManager
from skipjack.checkpoint.marker import file_digest
from skipjack.checkpoint.persistent import step_dir
from skipjack.checkpoint.sharded import flatten, load
from skipjack.config import CheckpointConfig, ParallelConfig, TrainConfig, TrainJobConfig
from skipjack.data.loader import ShardedLoader
from skipjack.launch.env import init_distributed
from skipjack.models.llama import num_parameters, preset
from skipjack.parallel.dims import ParallelDims
from skipjack.testing.reference import SyntheticSamples
from skipjack.trainer.engine import NativeEngine
from skipjack.trainer.trainer import training_state


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def hash_rates(directory: Path) -> dict[str, float]:
    """Bytes per second hashing the files of `directory`, per checksum, after one read to warm
    the page cache."""
    files = [p for p in directory.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    for path in files:
        path.read_bytes()
    rates = {}
    for algorithm in ("xxh3_128", "sha256"):
        start = time.perf_counter()
        for path in files:
            file_digest(path, algorithm)
        rates[algorithm] = size / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama_130m")
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="skipjack-ckpt-bench-"))
    device = torch.device("cpu")
    init_distributed(device)
    dims = ParallelDims(dp=1).build_groups()
    cfg = preset(args.preset)
    job = TrainJobConfig(
        model=cfg,
        parallel=ParallelConfig(),
        train=TrainConfig(steps=100, micro_batch_size=1, seq_len=args.seq_len, dtype="fp32"),
        checkpoint=CheckpointConfig(interval=1, dir=str(root / "skipjack"), keep_last=1),
    )
    training = NativeEngine(job, dims, 1, device)
    data = SyntheticSamples(100, args.seq_len, cfg.vocab_size)
    loader = ShardedLoader(data, 1, 1, 0, 1)
    group = dims.group("checkpoint")

    def backward() -> float:
        start = time.perf_counter()
        training.forward_backward(loader.next())
        return time.perf_counter() - start

    def update() -> None:
        training.optimizer_step()

    backward()
    update()  # the optimizer state exists from here on
    step_seconds = backward()
    update()
    parts = training_state(training, loader)

    def state() -> dict:
        return flatten({part: s.state_dict() for part, s in parts.items()})

    rows = {}

    # skipjack: asynchronous, sharded
    manager = CheckpointManager.for_job(job.checkpoint, cfg, dims, lead=True)
    blocked, written = [], []
    for i in range(args.saves):
        start = time.perf_counter()
        manager.save(i + 1, parts)
        call = time.perf_counter() - start
        backward()  # the next step's forward and backward
        wait_start = time.perf_counter()
        manager.before_update()
        blocked.append(call + time.perf_counter() - wait_start)
        update()
        manager.wait()
        written.append(time.perf_counter() - start)
    manager.close()
    last = step_dir(root / "skipjack", args.saves)
    size = directory_bytes(last)
    start = time.perf_counter()
    load(parts, str(last), group)
    rows["skipjack async"] = (blocked, written, time.perf_counter() - start, size)

    # torch.save of the gathered state dict
    blocked = []
    for _ in range(args.saves):
        start = time.perf_counter()
        gathered = {"model": training.model.state_dict(), "optim": training.optimizer.state_dict()}
        with replacing(root / "torch.pt") as tmp:
            torch.save(gathered, tmp)
        blocked.append(time.perf_counter() - start)
    start = time.perf_counter()
    loaded = torch.load(root / "torch.pt", weights_only=True)
    training.model.load_state_dict(loaded["model"])
    training.optimizer.load_state_dict(loaded["optim"])
    size = (root / "torch.pt").stat().st_size
    rows["torch.save"] = (blocked, blocked, time.perf_counter() - start, size)

    # DCP, synchronous
    blocked = []
    for i in range(args.saves):
        target = root / f"dcp-{i}"
        start = time.perf_counter()
        dcp.save(state(), checkpoint_id=str(target), process_group=group)
        blocked.append(time.perf_counter() - start)
    start = time.perf_counter()
    dcp.load(state(), checkpoint_id=str(target), process_group=group)
    rows["DCP sync"] = (blocked, blocked, time.perf_counter() - start, directory_bytes(target))

    params = num_parameters(cfg)
    print(
        f"\n{args.preset} ({params / 1e6:.0f}M parameters, AdamW fp32), CPU, one process; "
        f"a training step takes {step_seconds:.1f} s; median of {args.saves} saves"
    )
    print(
        f"{'method':<16}{'blocked s/save':>15}{'vs torch.save':>14}{'save MB/s':>11}"
        f"{'load MB/s':>11}{'GB':>7}"
    )
    base = statistics.median(rows["torch.save"][0])
    summary = {}
    for name, (blocked, written, load_s, size) in rows.items():
        b, w = statistics.median(blocked), statistics.median(written)
        summary[name] = {"blocked_s": b, "written_s": w, "load_s": load_s, "bytes": size}
        print(
            f"{name:<16}{b:>15.3f}{base / b:>13.1f}x{size / w / 1e6:>11.0f}"
            f"{size / load_s / 1e6:>11.0f}{size / 1e9:>7.2f}"
        )
    hashing = hash_rates(step_dir(root / "skipjack", args.saves))
    print(f"\n{'checksum':<16}{'GB/s (one core)':>16}{'vs SHA-256':>11}")
    for name, rate in hashing.items():
        print(f"{name:<16}{rate / 1e9:>16.2f}{rate / hashing['sha256']:>10.1f}x")
    if args.json:
        report = {"args": vars(args), "rows": summary, "hash_bytes_per_s": hashing}
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
