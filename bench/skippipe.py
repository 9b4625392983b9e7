"""SkipPipe side by side: the simulator at the paper's scale, real processes under network
emulation, and convergence.

    python bench/skippipe.py [--part sim|real|converge|all] [--out DIR]

Part 1 (`sim`, no processes): the paper's geo setting: 20 nodes placed round-robin on the 12
regions of `geo_links.csv`, stages of 5 + 3+3+3+3+3 nodes allocated by `allocate` (and in node
order), a 24-layer dim-1024 Llama at 4 layers per stage, 8 samples of 1024 tokens per
microbatch (0.055 s per sample and layer forward, backward 1.5x, loss 0.25x, fp32 activations
of 32 MiB, 0.35 s per message as in the reference), 6 microbatches per data node, memory 3,
33% skip with up to 2 swaps: the iteration time of whole pipelines (fixed per data node, as
DT-FM; and scheduled by the path scheduler), random rule-abiding paths, SkipPipe without
collision avoidance and SkipPipe, and the scheduler's run time.

The same scheduler on 64 nodes (8 stages of 8, 3 layers per stage): its run time.

Part 2 (`real`, gloo processes on this machine, links emulated from the geo profile): dp=2 x
pp=4 at 25% skip and dp=2 x pp=3 at 33% (with 4 stages 33% also skips one), a 2-layers-per-
stage dim-64 model, 6 microbatches of 2 x 64 tokens per data node, memory 3: the same four
(whole pipelines on each replica), median iteration time over 4 iterations, against the
prediction of the path simulator (its own node orders) and of the schedule simulator (the
runtime's orders), both from the same costs: compute measured in one process, links from the
profile.

Part 3 (`converge`, the default job through the CLI, pp=4 on 4 processes, 150 steps): whole
pipelines against SkipPipe at 25% skip: validation loss at equal steps, then `skipjack eval`
perplexity of each with stages 1 and 3 of 4 omitted.

Writes skippipe.json and skippipe.png (iteration times) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from skipjack.batch import MicroBatch
from skipjack.models.llama import Llama, Stage
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.allocate import allocate
from skipjack.parallel.pipeline.comm import P2P, Emulator
from skipjack.parallel.pipeline.network import load_links
from skipjack.parallel.pipeline.partition import even_partition
from skipjack.parallel.pipeline.paths import Cluster, Rules, path_length
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.route import fixed_pipelines, random_paths, schedule_paths
from skipjack.parallel.pipeline.runtime import PipelineRuntime
from skipjack.parallel.pipeline.schedule import schedule_from_routes
from skipjack.parallel.pipeline.simulate import CostModel, simulate
from skipjack.parallel.pipeline.skippipe import job_cluster, priority_of, routes_of
from skipjack.testing import run_ranks
from skipjack.testing.reference import tiny_config
from skipjack.trainer.pipeline import cross_entropy

VARIANTS = ("full", "random", "unaware", "skippipe")


def plans(cluster: Cluster, rules: Rules) -> dict:
    """The four variants' plans, and the scheduler's seconds."""
    whole = Rules(len(cluster.stages), 0, rules.memory, rules.microbatches)
    started = time.perf_counter()
    skippipe = schedule_paths(cluster, rules)
    seconds = time.perf_counter() - started
    return {
        "full": fixed_pipelines(cluster, whole),
        "full_scheduled": schedule_paths(cluster, whole),
        "random": random_paths(cluster, rules),
        "unaware": schedule_paths(cluster, rules, collisions=False),
        "skippipe": skippipe,
        "scheduler_seconds": seconds,
    }


def part_sim() -> dict:
    sizes, nodes, layers, samples, context, dim = [5, 3, 3, 3, 3, 3], 20, 4, 8, 1024, 1024
    links = load_links("geo", nodes)
    message, overhead = 4.0 * dim * context * samples, 0.35
    cost = links.matrix(message) + overhead
    np.fill_diagonal(cost, 0.0)
    out = {}
    started = time.perf_counter()
    searched = allocate(cost, sizes)
    allocation_seconds = time.perf_counter() - started
    in_order, first = [], 0
    for size in sizes:
        in_order.append(list(range(first, first + size)))
        first += size
    for name, stages in (("allocated", searched.stages), ("node_order", in_order)):
        cluster = Cluster.build(stages, links, 0.055 * samples * layers, message, overhead)
        rules = Rules(path_length(len(sizes), 0.33), 2, 3, 6)
        found = plans(cluster, rules)
        out[name] = {k: v if k == "scheduler_seconds" else v.makespan for k, v in found.items()}
    out["allocation_seconds"] = allocation_seconds
    out["allocation_objective"] = searched.objective
    # scale: 64 nodes in 8 stages of 8, the same model and costs, nodes in order
    stages = [list(range(s * 8, s * 8 + 8)) for s in range(8)]
    big = Cluster.build(stages, load_links("geo", 64), 0.055 * samples * 3, message, overhead)
    started = time.perf_counter()
    plan = schedule_paths(big, Rules(path_length(8, 0.33), 2, 3, 6))
    out["nodes_64"] = {
        "skippipe": plan.makespan,
        "scheduler_seconds": time.perf_counter() - started,
    }
    whole = fixed_pipelines(big, Rules(8, 0, 3, 6))
    out["nodes_64"]["full"] = whole.makespan
    return out


# -- real processes -------------------------------------------------------------------------

MICRO, SEQ, PER_NODE, MEMORY, ITERATIONS = 2, 64, 6, 3, 4


def _model(pp: int):
    return tiny_config(n_layers=2 * pp, max_seq_len=SEQ)


def _micro(count: int, vocab: int) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(0)
    return [
        MicroBatch(t[:, :-1].contiguous(), t[:, 1:].contiguous())
        for t in (torch.randint(0, vocab, (MICRO, SEQ + 1), generator=g) for _ in range(count))
    ]


def measure_compute(pp: int) -> tuple[list[float], list[float], float]:
    """Seconds of one microbatch's forward and backward through each stage, and of the head's
    forward and backward, in one process (median of 20)."""
    cfg = _model(pp)
    layers = even_partition(cfg.n_layers, pp)
    batch = _micro(1, cfg.vocab_size)[0]
    forward, backward = [], []
    h = None
    for s in range(pp):
        chunk = Llama(cfg, Stage(layers[s], s == 0, False)).init_weights(0)
        x = batch.tokens if s == 0 else torch.randn(MICRO, SEQ, cfg.dim, requires_grad=True)
        f, b = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            h = chunk(x)
            t1 = time.perf_counter()
            h.backward(torch.ones_like(h))
            b.append(time.perf_counter() - t1)
            f.append(t1 - t0)
        forward.append(statistics.median(f))
        backward.append(statistics.median(b))
    head = Llama(cfg, Stage(range(0), False, True)).init_weights(0)
    loss = cross_entropy(head.tp, cfg.vocab_size)
    times = []
    for _ in range(20):
        x = torch.randn(MICRO, SEQ, cfg.dim, requires_grad=True)
        t0 = time.perf_counter()
        loss(head(x), batch).backward()
        times.append(time.perf_counter() - t0)
    return forward, backward, statistics.median(times)


def _iterations(dp: int, pp: int, variants: dict, network: str) -> dict:
    """On each rank: per variant, the median seconds of an iteration along its routes."""
    dims = ParallelDims(dp=dp, pp=pp, rank=dist.get_rank()).build_groups()
    cfg, rank = _model(pp), dims.pp_rank
    layers = even_partition(cfg.n_layers, pp)
    stages = [Stage(layers[rank], rank == 0, False)]
    if rank == 0:
        stages.append(Stage(range(0), False, True))
    chunks = [Llama(cfg, stage).init_weights(0) for stage in stages]
    links = load_links(network, dp * pp)
    p2p = P2P(
        dims.group("pipe"),
        dp * (pp + 1),
        torch.device("cpu"),
        Emulator.over(links, dims.pipe_ranks(), dist.get_rank()),
    )
    full = schedule_from_routes(pp, StepPlan.full(1, PER_NODE, pp + 1).places(pp + 1), head=True)
    runtime = PipelineRuntime(
        full, chunks, rank, p2p, torch.device("cpu"), cross_entropy(chunks[0].tp, cfg.vocab_size),
        replica=dims.dp_rank, ranks=dims.pipe_ranks(),
    )  # fmt: skip
    micro = _micro(PER_NODE, cfg.vocab_size)
    out = {}
    for name, (routes, priority) in variants.items():
        plan = StepPlan(routes, in_flight=MEMORY, priority=priority)
        times = []
        for i in range(ITERATIONS + 1):
            dist.barrier()
            start = time.perf_counter()
            runtime.run(micro, float(MICRO * SEQ * PER_NODE * dp), plan=plan)
            dist.barrier()
            if i:  # the first builds the schedule and sends the layouts
                times.append(time.perf_counter() - start)
            for c in chunks:
                c.zero_grad(set_to_none=True)
        out[name] = statistics.median(times)
    return out


def part_real(dp: int, pp: int, skip: float, network: str = "geo") -> dict:
    forward, backward, head = measure_compute(pp)
    links = load_links(network, dp * pp)
    cfg = _model(pp)
    message = 4.0 * MICRO * SEQ * cfg.dim
    cluster = job_cluster(dp, pp, links, forward, head, message)
    factor = statistics.mean(b / f for b, f in zip(backward, forward, strict=True))
    cluster = Cluster(cluster.stages, cluster.forward, cluster.links, factor, cluster.loss_factor)
    rules = Rules(path_length(pp, skip), 1, MEMORY, PER_NODE)
    found = plans(cluster, rules)
    routes = {v: (routes_of(found[v], pp), priority_of(found[v])) for v in VARIANTS}
    measured = run_ranks(_iterations, dp * pp, dp, pp, routes, network, timeout=900)[0]
    # the runtime's own node orders through the schedule simulator, same costs
    cost = CostModel(
        [*forward, head / (1 + factor)],
        [*backward, head * factor / (1 + factor)],
        lambda a, b: links.seconds(a, b, message),
    )
    rows = {}
    for v in VARIANTS:
        places = StepPlan(routes[v][0]).places(pp + 1)
        schedule = schedule_from_routes(
            pp, places, replicas=dp, in_flight=MEMORY, head=True, priority=routes[v][1]
        )
        rows[v] = {
            "measured": measured[v],
            "path_simulator": found[v].makespan,
            "schedule_simulator": simulate(schedule, cost).makespan,
        }
    return {"dp": dp, "pp": pp, "skip": skip, "rows": rows}


# -- convergence ----------------------------------------------------------------------------

STEPS = 150


def _cli(*args: str, nproc: int, cwd: Path) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    command += ["-m", "skipjack.cli", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def part_converge(out: Path) -> dict:
    common = [
        "parallel.pp=4", f"train.steps={STEPS}", "train.val_interval=50", "logging.plot=false",
        "logging.progress=false", "checkpoint=sharded", f"checkpoint.interval={STEPS}",
    ]  # fmt: skip
    skip = ["parallel.skippipe.enabled=true", "parallel.skippipe.skip_ratio=0.25"]
    result = {}
    for name, extra in (("full", []), ("skippipe", skip)):
        run = out / f"converge-{name}"
        _cli("train", *common, *extra, f"hydra.run.dir={run}", nproc=4, cwd=out)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
        evals = {}
        for label, keep in (("whole", []), ("stages_0_2_of_4", ["eval.stages=[0,2]"])):
            where = out / f"eval-{name}-{label}"
            _cli(
                "eval",
                f"checkpoint.resume={run}",
                *keep,
                f"hydra.run.dir={where}",
                nproc=1,
                cwd=out,
            )
            evals[label] = json.loads((where / "eval.json").read_text())["perplexity"]
        result[name] = {"val_loss": val, "perplexity": evals}
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "sim" in results:
        sim = results["sim"]["allocated"]
        panels.append(("simulator, paper's geo setting", {v: sim[v] for v in VARIANTS}))
    for real in results.get("real", []):
        title = f"CPU, geo emulation, dp={real['dp']} x pp={real['pp']}, {real['skip']:.0%} skip"
        panels.append((title, {v: real["rows"][v]["measured"] for v in VARIANTS}))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        ax.bar(
            list(values),
            list(values.values()),
            color=["grey", "tab:orange", "tab:blue", "tab:green"],
        )
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("iteration time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("sim", "real", "converge", "all"), default="all")
    parser.add_argument("--out", type=Path, default=Path("bench-skippipe"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if args.part in ("sim", "all"):
        results["sim"] = part_sim()
        sim = results["sim"]
        for name in ("allocated", "node_order"):
            row = sim[name]
            print(f"simulator ({name}): " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
            print(
                f"  skippipe / full: {row['skippipe'] / row['full']:.3f}, "
                f"/ full scheduled: {row['skippipe'] / row['full_scheduled']:.3f}"
            )
        big = sim["nodes_64"]
        print(
            f"64 nodes: full {big['full']:.2f}, skippipe {big['skippipe']:.2f}, "
            f"scheduler {big['scheduler_seconds']:.2f} s"
        )
        objective, seconds = sim["allocation_objective"], sim["allocation_seconds"]
        print(f"allocation: objective {objective:.3f} in {seconds:.2f} s")
    if args.part in ("real", "all"):
        results["real"] = [part_real(2, 4, 0.25), part_real(2, 3, 0.33)]
        for real in results["real"]:
            print(f"real dp={real['dp']} pp={real['pp']} skip {real['skip']}:")
            full = real["rows"]["full"]["measured"]
            for v, row in real["rows"].items():
                print(
                    f"  {v:9s} measured {row['measured']:.3f} s ({row['measured'] / full:.2f}x), "
                    f"path simulator {row['path_simulator']:.3f}, "
                    f"schedule simulator {row['schedule_simulator']:.3f}"
                )
    if args.part in ("converge", "all"):
        results["converge"] = part_converge(args.out.resolve())
        for name, row in results["converge"].items():
            print(f"{name}: val_loss {row['val_loss']}, perplexity {row['perplexity']}")
    (args.out / "skippipe.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "skippipe.png")
    print(f"wrote {args.out / 'skippipe.json'} and {args.out / 'skippipe.png'}")


if __name__ == "__main__":
    main()
