"""Step plans side by side: what a plan's schedule costs to build against a training step, and
tokens/s of the default job's model through the runtime without a plan, with the full plan and
with a plan of subnets.

    python bench/pipeline.py [--steps 6] [--json out.json]

Part 1 (no processes): for 64 microbatches at pp=8, building today's fixed schedule
(`build_schedule("1f1b")`, checked), and building a plan (`StepPlan.full`), its routes as places
and a schedule from those routes made partial (every other microbatch skips stage 3;
`schedule_from_routes`, checked; what the runtime does each step whose routes differ from the
last), the same over two replicas with every other microbatch ending on the other replica, and
the simulator's deadlock check of the one-replica schedule: milliseconds, and their share of a
step of 64 microbatches at pp=8 of part 2's model, estimated from part 2's measured step:
(m + pp - 1) slots of one microbatch through one stage, a stage being 1/pp of the model.

Part 2 (pp=2 gloo processes, the `tiny` preset, sequences of 256 tokens, 8 micro-batches of one
sequence, 1F1B, fp32): median step time and tokens/s with no plan (the configured schedule), the
full plan (the same schedule through the plan path) and a plan running half of every block's
heads (whole kv groups) and half of its MLP neurons.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from skipjack.config import ParallelConfig, TrainConfig, TrainJobConfig
from skipjack.models.llama import preset
from skipjack.models.subnet import Subnet
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.schedule import build_schedule, schedule_from_routes
from skipjack.parallel.pipeline.simulate import CostModel, simulate
from skipjack.testing import run_ranks
from skipjack.testing.reference import build_run

PP, MICROBATCHES, SEQ_LEN = 2, 8, 256


def _ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def planning_costs(pp: int = 8, microbatches: int = 64) -> dict[str, float]:
    def fixed():
        build_schedule("1f1b", pp, microbatches)

    def routed():
        plan = StepPlan.full(1, microbatches, pp)
        routes = plan.places(pp)
        for mb in range(0, microbatches, 2):
            routes[mb] = [s for s in routes[mb] if s != 3]
        return schedule_from_routes(pp, routes)

    def across():
        half = microbatches // 2
        hops = StepPlan.full(2, half, pp).routes
        for r, replica in enumerate(hops):
            for mb in range(0, half, 2):
                replica[mb][-1] = (1 - r, pp - 1)
        return schedule_from_routes(pp, StepPlan(hops).places(pp), replicas=2)

    schedule = routed()
    return {
        "fixed 1F1B schedule (once per job)": _ms(fixed),
        "plan + routed schedule (per step)": _ms(routed),
        "same, 2 replicas, routes across": _ms(across),
        "simulator deadlock check": _ms(lambda: simulate(schedule, CostModel.uniform(pp))),
    }


def step_times(steps: int) -> dict[str, float]:
    """On each of PP ranks: the median step time of each variant."""
    cfg = preset("tiny")
    job = TrainJobConfig(
        model=cfg,
        parallel=ParallelConfig(pp=PP),
        train=TrainConfig(
            steps=3 * (steps + 1),
            global_batch_size=MICROBATCHES,
            micro_batch_size=1,
            seq_len=SEQ_LEN,
            dtype="fp32",
        ),
    )
    dims, loader, engine = build_run(job, 0)
    half = Subnet(torch.arange(cfg.n_heads // 2), torch.arange(cfg.ffn_dim // 2))
    variants = {
        "no plan": None,
        "full plan": StepPlan.full(1, MICROBATCHES, PP),
        "half heads + neurons": StepPlan(
            StepPlan.full(1, MICROBATCHES, PP).routes, {i: half for i in range(cfg.n_layers)}
        ),
    }
    times = {name: [] for name in variants}
    for _ in range(steps + 1):  # variants take turns: no order effect
        for name, plan in variants.items():
            start = time.perf_counter()
            engine.step(loader.next(), plan=plan)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    seconds = max(run_ranks(step_times, PP, args.steps), key=lambda r: r["no plan"])
    planning = planning_costs()
    step = seconds["no plan"]
    # part 2: (MICROBATCHES + PP - 1) slots of a stage holding 1/PP of the model
    microbatch = step / (MICROBATCHES + PP - 1) * PP
    big_step = (64 + 8 - 1) * microbatch / 8
    print(f"\nBuilding a step's schedule, 64 microbatches at pp=8 (one core, best of 5); "
          f"such a step of this model takes about {big_step:.2f} s")  # fmt: skip
    print(f"{'what':<40}{'ms':>8}{'of a step':>11}")
    for name, ms in planning.items():
        print(f"{name:<40}{ms:>8.2f}{ms / 1e3 / big_step:>10.2%}")
    tokens = MICROBATCHES * SEQ_LEN
    print(f"\ntiny, pp={PP}, {MICROBATCHES} micro-batches of 1 x {SEQ_LEN} tokens, 1F1B, fp32, CPU")
    print(f"{'variant':<24}{'step s':>8}{'tokens/s':>10}{'vs no plan':>12}")
    for name, s in seconds.items():
        print(f"{name:<24}{s:>8.3f}{tokens / s:>10.0f}{step / s:>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "planning_ms": planning, "step_s": seconds,
                 "pp8_m64_step_s": big_step}, f, indent=2,
            )  # fmt: skip


if __name__ == "__main__":
    main()
