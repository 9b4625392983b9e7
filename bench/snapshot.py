"""In-memory snapshots against persistent checkpoints, side by side in one run.

    python bench/snapshot.py [--preset llama_130m] [--rounds 6] [--accumulation 4] [--json F]

1. **What a save costs** (one process trains the preset, AdamW fp32: 1.6 GB of weights and
   optimizer state with llama_130m) with: nothing; the memory tier
   (`checkpoint.memory.interval=1`: host tensors copied into /dev/shm at once); the persistent
   tier (asynchronous sharded DCP); and `torch.save` of the state dict, synchronously.
   Interleaved, so that this VM's drift from minute to minute (a second per step) falls on every
   way alike: each round runs, for every way in turn, a step that saves and one that does not
   (where an asynchronous save's background work lands), then writes the page cache out
   untimed (else a save's writeback lands on the next way's pair); a save's cost is its pair's
   time over the same round's pair without saves (median over `--rounds` rounds, after two
   rounds whose saves allocate buffers and files); overhead = that cost over a step's time,
   what saving after every step adds. Blocked = the save call plus the waits before the next
   updates; restore = the tier's own part of a restore into the live state (newest, then
   load), the training state already allocated; for the persistent tier also with its files
   dropped from the page cache first (cold: what a replacement machine reads; /dev/shm is
   memory).
2. **Erasure coding throughput**: a group of 4 nodes, each with a snapshot of `--blob-mb` MB;
   parity of every row (XOR for m=1, Reed-Solomon with zfec for m=2) and the rebuild of m lost
   nodes, in MB of snapshot per second (one core).
3. **Recovery**: the same preset trained by the CLI under plain `torchrun --max-restarts=1`, its
   rank SIGKILLed as step 3 starts (`SKIPJACK_KILL=0@3`, once step 2's saves are complete), once
   restoring from the memory tier and once from the persistent tier (both saving every step, so
   no step is lost): the time from the kill to the end of the first step after the restart, the
   same without that step's own time (ready: restarted and restored), and the restore alone
   (from the log). Last, the expected time a failure costs at equal overhead: the persistent
   tier can afford one save every `cost persistent / cost memory` steps for the memory tier's
   cost (a cost: at least the time a save blocks the step), so a failure loses half that
   interval of steps on top of its recovery.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from skipjack.atomic import replacing
from skipjack.checkpoint.erasure import Group
from skipjack.checkpoint.manager import CheckpointManager
from skipjack.checkpoint.memory import flat_state
from skipjack.config import CheckpointConfig, ParallelConfig, TrainConfig, TrainJobConfig
from skipjack.config.checkpoint import MemoryConfig
from skipjack.data.loader import ShardedLoader
from skipjack.launch.env import init_distributed
from skipjack.models.llama import num_parameters, preset
from skipjack.parallel.dims import ParallelDims
from skipjack.testing.reference import SyntheticSamples
from skipjack.trainer.engine import NativeEngine
from skipjack.trainer.metrics import read_metrics
from skipjack.trainer.trainer import training_state

WARMUP = 2  # rounds whose saves allocate buffers and files (both of the memory tier's slots)


def blocked_per_step(args, root: Path) -> dict[str, dict[str, float]]:
    """Each way of saving's cost per save and blocked time, interleaved (part 1)."""
    device = torch.device("cpu")
    init_distributed(device)
    dims = ParallelDims(dp=1).build_groups()
    cfg = preset(args.preset)
    train = TrainConfig(steps=100, micro_batch_size=1, seq_len=args.seq_len, dtype="fp32")
    job = TrainJobConfig(model=cfg, parallel=ParallelConfig(), train=train)
    engine = NativeEngine(job, dims, args.accumulation, device)
    data = SyntheticSamples(1000, args.seq_len, cfg.vocab_size)
    loader = ShardedLoader(data, args.accumulation, 1, 0, 1)
    state = training_state(engine, loader)
    engine.forward_backward(loader.next())
    engine.optimizer_step()  # the optimizer state exists from here on
    memory = MemoryConfig(interval=1, ranks_per_node=1, root=args.shm)
    policies = {
        "no saves": None,
        "memory tier": CheckpointConfig(dir=str(root / "memory"), memory=memory),
        "persistent async": CheckpointConfig(interval=1, dir=str(root / "dcp"), keep_last=1),
        "torch.save": "torch.save",
    }
    managers = {
        name: CheckpointManager.for_job(policy, cfg, dims, lead=True)
        for name, policy in policies.items()
        if isinstance(policy, CheckpointConfig)
    }

    def step(name: str, save: bool, number: int) -> tuple[float, float]:
        """One training step, saved with `name`'s way when `save`: (seconds, blocked)."""
        manager = managers.get(name)
        start = time.perf_counter()
        engine.forward_backward(loader.next())
        wait = time.perf_counter()
        if manager is not None:
            manager.before_update()
        waited = time.perf_counter() - wait
        engine.optimizer_step()
        saving = time.perf_counter()
        if save and manager is not None:
            manager.save(number, state)
        elif save and name == "torch.save":
            gathered = {"model": engine.model.state_dict(), "optim": engine.optimizer.state_dict()}
            with replacing(root / "torch.pt") as tmp:
                torch.save(gathered, tmp)
        end = time.perf_counter()
        return end - start, waited + (end - saving if save else 0.0)

    pairs: dict[str, list[float]] = {name: [] for name in policies}
    blocked: dict[str, list[float]] = {name: [] for name in policies}
    number = 0
    for round_ in range(WARMUP + args.rounds):
        for name in policies:
            # a step that saves, then one that does not (where an asynchronous save's
            # background work lands): the pair's time against the same round's pair of
            # steps without saves is what one save costs
            number += 2
            (first, held), (second, waited) = step(name, True, number), step(name, False, 0)
            os.sync()  # the saves' dirty pages written out, untimed: not the next pair's cost
            if round_ >= WARMUP:
                pairs[name].append(first + second)
                blocked[name].append(held + waited)
    base = pairs["no saves"]
    rows = {}
    for name in policies:
        costs = [pair - none for pair, none in zip(pairs[name], base, strict=True)]
        rows[name] = {
            "save_cost_s": statistics.median(costs),
            "save_cost_range_s": [min(costs), max(costs)],
            "blocked_s": statistics.median(blocked[name]),
        }
    for name, manager in managers.items():
        manager.wait()
        tier = manager.tiers[0]  # the one this policy saves to
        start = time.perf_counter()
        tier.newest()
        tier.load(state)
        rows[name]["restore_s"] = time.perf_counter() - start
        policy = policies[name]
        if policy.interval:  # again, its files read from the disk, as a new machine would
            evict_from_page_cache(Path(policy.dir))
            start = time.perf_counter()
            tier.newest()
            tier.load(state)
            rows[name]["restore_cold_s"] = time.perf_counter() - start
        manager.close()
    rows["no saves"]["step_s"] = statistics.median(base) / 2
    parts = {part: state[part] for part in ("model", "optim")}
    size = sum(t.numel() * t.element_size() for t in flat_state(parts).values())
    rows["no saves"]["state_bytes"] = size
    return rows


def evict_from_page_cache(directory: Path) -> None:
    """Write `directory`'s files out and drop them from the page cache."""
    os.sync()
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def erasure_rates(blob_mb: int) -> dict[str, dict[str, float]]:
    """Encode and rebuild throughput of a 4-node group (part 2)."""
    rng = np.random.default_rng(0)
    length = blob_mb * 2**20
    snapshots = {n: rng.integers(0, 256, length, dtype=np.uint8) for n in range(4)}
    rates = {}
    for name, m in (("XOR (k=3, m=1)", 1), ("Reed-Solomon (k=2, m=2)", 2)):
        group = Group(4, m)
        start = time.perf_counter()
        parities = group.encode_all(snapshots)
        encode = time.perf_counter() - start
        lost = set(range(m))
        start = time.perf_counter()
        rebuilt = group.rebuild(
            lost,
            {n: s for n, s in snapshots.items() if n not in lost},
            {key: block for key, block in parities.items() if key[1] not in lost},
            {n: length for n in snapshots},
        )
        rebuild = time.perf_counter() - start
        assert all(np.array_equal(rebuilt[n][:length], snapshots[n]) for n in lost)
        rates[name] = {
            "encode_MBps": 4 * length / encode / 1e6,
            "rebuild_MBps": m * length / rebuild / 1e6,
        }
    return rates


def recovery(args, root: Path, tier: str) -> dict[str, float]:
    """Kill the CLI's rank as step 3 starts; seconds from the kill to the end of the first step
    after the restart, to the start of that step, and the restore alone (part 3)."""
    run = root / f"run-{tier}"
    saves = (
        ["checkpoint.memory.interval=1", "checkpoint.interval=0"]
        if tier == "memory"
        else ["checkpoint.interval=1", "checkpoint.keep_last=2"]
    )
    cmd = [
        *(str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=1"),
        *("--max-restarts=1", "-m", "skipjack.cli", "train", f"model={args.preset}"),
        *("train.steps=4", "train.global_batch_size=1", f"train.seq_len={args.seq_len}"),
        *("train.dtype=fp32", "train.val_batches=0", "logging.interval=1", "logging.plot=false"),
        *("logging.progress=false", "logging.wandb=false", "checkpoint=sharded"),
        *(f"checkpoint.memory.root={args.shm}", f"hydra.run.dir={run}", *saves),
    ]
    env = {
        **os.environ,
        "SKIPJACK_KILL": "0@3",
        "SKIPJACK_JOB_ID": f"bench-{tier}-{os.getpid()}",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    rows = read_metrics(run)
    killed = float(re.search(r"SKIPJACK_KILL: .* time ([0-9.]+)", result.stdout).group(1))
    back = [r for r in rows if r["step"] == 3 and "loss" in r][-1]
    step_s = args.seq_len / back["tokens_per_s"]  # one sequence a step
    restore = float(re.search(r"restored in ([0-9.]+) s", result.stdout).group(1))
    assert f"of the {tier} tier" in result.stdout, result.stdout
    kill_to_step = back["time"] - killed
    return {"kill_to_step_s": kill_to_step, "ready_s": kill_to_step - step_s, "restore_s": restore}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama_130m")
    parser.add_argument("--rounds", type=int, default=6, help="measured saves per way of saving")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--blob-mb", type=int, default=256)
    parser.add_argument("--shm", default="/dev/shm")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="skipjack-snapshot-bench-"))
    os.environ.setdefault("SKIPJACK_JOB_ID", f"bench-{os.getpid()}")
    try:
        report = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **report}, indent=2))


def run(args, root: Path) -> dict:
    params = num_parameters(preset(args.preset))
    recovered = {tier: recovery(args, root, tier) for tier in ("memory", "persistent")}
    blocked = blocked_per_step(args, root)
    tokens = args.accumulation * args.seq_len
    base = blocked["no saves"]["step_s"]
    print(
        f"\n{args.preset} ({params / 1e6:.0f}M parameters, AdamW fp32, "
        f"{blocked['no saves']['state_bytes'] / 1e9:.2f} GB of state), CPU, one process, "
        f"{tokens} tokens per step of {base:.2f} s; median of {args.rounds} interleaved rounds"
    )
    print(
        f"{'save':<20}{'cost s':>8}{'overhead':>10}{'range':>16}{'blocked s':>11}"
        f"{'restore s':>11}{'cold s':>8}"
    )
    for name, row in list(blocked.items())[1:]:
        low, high = (100 * c / base for c in row["save_cost_range_s"])
        restore = f"{row['restore_s']:>11.2f}" if "restore_s" in row else ""
        restore += f"{row['restore_cold_s']:>8.2f}" if "restore_cold_s" in row else ""
        print(
            f"{name:<20}{row['save_cost_s']:>8.3f}{100 * row['save_cost_s'] / base:>9.1f}%"
            f"{f'{low:.1f}..{high:.1f}%':>16}{row['blocked_s']:>11.3f}{restore}"
        )
    rates = erasure_rates(args.blob_mb)
    print(f"\n{'erasure code (4 nodes)':<26}{'encode MB/s':>12}{'rebuild MB/s':>13}")
    for name, row in rates.items():
        print(f"{name:<26}{row['encode_MBps']:>12.0f}{row['rebuild_MBps']:>13.0f}")
    print(f"\n{'recovery from':<16}{'kill -> step s':>15}{'ready s':>9}{'restore s':>10}")
    for tier, row in recovered.items():
        print(
            f"{tier:<16}{row['kill_to_step_s']:>15.2f}{row['ready_s']:>9.2f}"
            f"{row['restore_s']:>10.2f}"
        )
    memory, persistent = recovered["memory"], recovered["persistent"]
    saving = ("memory tier", "persistent async")
    # a save costs at least the time it blocks the step (the pairs' noise is larger than the
    # memory tier's whole cost on this VM)
    cost = {n: max(blocked[n]["save_cost_s"], blocked[n]["blocked_s"]) for n in saving}
    interval = max(1, round(cost["persistent async"] / cost["memory tier"]))
    lost = {
        "memory": memory["kill_to_step_s"],
        "persistent": persistent["kill_to_step_s"] + (interval - 1) / 2 * base,
    }
    print(
        f"\nat equal overhead the persistent tier saves every {interval} steps: a failure costs "
        f"{lost['memory']:.1f} s with the memory tier, {lost['persistent']:.1f} s with the "
        f"persistent tier ({lost['persistent'] / lost['memory']:.1f}x); the restore in the "
        f"log is {persistent['restore_s'] / memory['restore_s']:.1f}x faster from memory"
    )
    own = blocked["memory tier"]["restore_s"]
    dcp = blocked["persistent async"]
    print(
        f"the tiers' own restore: {dcp['restore_s'] / own:.1f}x faster from memory than from "
        f"the persistent tier in the page cache, {dcp['restore_cold_s'] / own:.1f}x than from it "
        "on disk"
    )
    return {"blocked": blocked, "erasure": rates, "recovery": recovered, "failure_cost_s": lost}


if __name__ == "__main__":
    main()
