"""SkipPipe in a training job: the links of the layout's nodes, and the step plans whose routes
are the path scheduler's paths (docs/skippipe.md).

The layout's nodes are the (replica, stage) pairs of a dp x pp job, node replica x pp + stage;
stage 0's nodes are the data nodes, and each also holds the output layer and the loss (the
schedule's head place), so a path goes back to its data node as in the paper. The node a layout
node is on in the link profile is its own index (`allocation=layout`), or the allocator's choice
(`allocation=search`: stages of dp nodes each, data-parallel and pipeline links made cheap).
Paths are planned once, on global rank 0, and broadcast, so every rank runs the same plan; the
network does not change between steps, and neither do they.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from skipjack.config import ConfigError
from skipjack.config.parallel import SkipPipeConfig
from skipjack.parallel.pipeline.allocate import allocate
from skipjack.parallel.pipeline.network import Links, load_links
from skipjack.parallel.pipeline.paths import Cluster, Plan, Rules, path_length
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.route import fixed_pipelines, schedule_paths
from skipjack.parallel.pipeline.schedule import schedule_from_routes

MAX_SEARCHED_STAGES = 12  # the allocator's tour is exact (Held-Karp): 2^pp x pp^2 per swap


def on_rank_zero(work: Callable[[], Any]) -> Any:
    """`work()` on global rank 0, its result (or its error, raised on every rank) broadcast, so
    no rank waits for a result that never comes."""
    box: list = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            box = [("ok", work())]
        except Exception as error:  # every rank raises it below
            box = [("error", error)]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def layout_links(config: SkipPipeConfig, dp: int, pp: int, message_bytes: float) -> Links:
    """The links between the layout's nodes under `config.network` and `config.allocation`
    (searched on global rank 0)."""
    links = load_links(config.network, dp * pp)
    if config.allocation == "layout" or links.free():
        return links
    if pp > MAX_SEARCHED_STAGES:
        raise ConfigError(
            "parallel.skippipe.allocation",
            f"search handles up to {MAX_SEARCHED_STAGES} stages, not pp={pp}; use layout",
        )

    def search() -> list[int]:
        found = allocate(links.matrix(message_bytes), [dp] * pp)
        # stage s replica r is the allocator's r-th node of stage s
        return [found.stages[s][r] for r in range(dp) for s in range(pp)]

    where = on_rank_zero(search)
    index = np.ix_(where, where)
    regions = tuple(links.regions[n] for n in where) if links.regions else ()
    return Links(links.latency[index], links.bandwidth[index], regions)


@dataclass
class SkipPipe:
    """The step plans of a dp x pp job with `microbatches` per replica and step."""

    config: SkipPipeConfig
    dp: int
    pp: int
    microbatches: int
    routes: list[list[list[tuple[int, int]]]]  # the paths as (replica, stage) hops
    priority: list[list[tuple[float, float]]] | None  # the path simulator's start times
    in_flight: int | None  # the runtime's limit: memory, unless pair order needs more
    plan_seconds: float  # an iteration along the paths, predicted by the path simulator
    full_seconds: float  # an iteration along whole pipelines, likewise

    @classmethod
    def plan_paths(
        cls,
        config: SkipPipeConfig,
        dp: int,
        pp: int,
        microbatches: int,
        links: Links,
        forward: list[float],
        loss: float,
        message_bytes: float,
    ) -> SkipPipe:
        """Paths for seconds per microbatch forward of each stage `forward` and of the output
        layer and loss `loss`, over `links`, planned on global rank 0 and broadcast."""
        length = path_length(pp, config.skip_ratio)
        if length < 2:
            raise ConfigError(
                "parallel.skippipe.skip_ratio",
                f"{config.skip_ratio} of {pp} stages skips all but stage 0; lower it or raise pp",
            )
        if min(forward) <= 0:
            raise ConfigError(
                "parallel.layers_per_stage", "SkipPipe needs at least one layer in every stage"
            )

        def plan() -> tuple:
            cluster = job_cluster(dp, pp, links, forward, loss, message_bytes)
            full = fixed_pipelines(cluster, Rules(pp, 0, config.memory, microbatches))
            if length == pp and config.max_swaps == 0:  # nothing to skip or reorder
                routes = StepPlan.full(dp, microbatches, pp + 1).routes
                return routes, None, config.memory, full.makespan, full.makespan
            rules = Rules(length, config.max_swaps, config.memory, microbatches)
            found = schedule_paths(cluster, rules)
            routes, priority = routes_of(found, pp), priority_of(found)
            in_flight = config.memory
            places = StepPlan(routes).places(pp + 1)
            try:  # what the runtime builds; if keeping pair order needs more room, it gets it
                schedule_from_routes(pp, places, 1, dp, in_flight, True, priority)
            except ValueError:
                in_flight = None
            return routes, priority, in_flight, float(found.makespan), float(full.makespan)

        routes, priority, in_flight, seconds, full_seconds = on_rank_zero(plan)
        return cls(config, dp, pp, microbatches, routes, priority, in_flight, seconds, full_seconds)

    @property
    def skips(self) -> bool:
        """Whether the paths are anything but every replica's own whole pipeline."""
        return self.routes != StepPlan.full(self.dp, self.microbatches, self.pp + 1).routes

    def describe(self) -> str:
        """One line for the log: the paths and the iteration time the simulator predicts."""
        c = self.config
        length = len(self.routes[0][0]) - 1
        every = (
            f", the whole pipeline every {c.full_pipeline_every} steps"
            if c.full_pipeline_every
            else ""
        )
        return (
            f"SkipPipe: paths through {length} of {self.pp} stages (skip_ratio {c.skip_ratio}, "
            f"max_swaps {c.max_swaps}, memory {c.memory}) over network {c.network}{every}; "
            f"predicted iteration {self.plan_seconds:.3g} s against {self.full_seconds:.3g} s "
            "for whole pipelines (path simulator)"
        )

    # a checkpoint part: a resume runs the paths it saved (a checkpoint without one keeps these)
    optional = True

    def settings(self) -> dict:
        """What the paths were planned for: a resume keeps saved paths only for the same."""
        c = self.config
        return {
            "dp": self.dp, "pp": self.pp, "microbatches": self.microbatches,
            "skip_ratio": c.skip_ratio, "max_swaps": c.max_swaps, "memory": c.memory,
            "network": c.network, "allocation": str(c.allocation),
            "compute_tflops": c.compute_tflops,
        }  # fmt: skip

    def state_dict(self) -> dict:
        paths = {
            "settings": self.settings(),
            "routes": self.routes,
            "priority": self.priority,
            "in_flight": self.in_flight,
            "seconds": [self.plan_seconds, self.full_seconds],
        }
        return {"paths": json.dumps(paths)}

    def load_state_dict(self, state: dict) -> None:
        paths = json.loads(state["paths"])
        if paths["settings"] != self.settings():
            warnings.warn(
                "SkipPipe: the checkpoint's paths were planned for other settings "
                f"({paths['settings']}); running the paths planned now",
                stacklevel=2,
            )
            return
        self.routes = [[[tuple(hop) for hop in route] for route in r] for r in paths["routes"]]
        priority = paths["priority"]
        self.priority = None if priority is None else [[tuple(t) for t in p] for p in priority]
        self.in_flight = paths["in_flight"]
        self.plan_seconds, self.full_seconds = map(float, paths["seconds"])

    def plan(self, step: int) -> StepPlan:
        """The plan of optimizer step `step`: the paths, or the whole pipeline every
        `full_pipeline_every` steps."""
        every = self.config.full_pipeline_every
        if not self.skips or (every and step % every == 0):
            return StepPlan.full(self.dp, self.microbatches, self.pp + 1)
        return StepPlan(self.routes, in_flight=self.in_flight, priority=self.priority)


def job_cluster(
    dp: int, pp: int, links: Links, forward: list[float], loss: float, message_bytes: float
) -> Cluster:
    """The path scheduler's cost model of the layout's nodes."""
    stages = [[r * pp + s for r in range(dp)] for s in range(pp)]
    per_node = [forward[n % pp] for n in range(dp * pp)]
    cluster = Cluster.build(stages, links, per_node, message_bytes)
    return Cluster(cluster.stages, cluster.forward, cluster.links, loss_factor=loss / forward[0])


def priority_of(plan: Plan) -> list[list[tuple[float, float]]]:
    """When the path simulator starts every microbatch's forward and backward at each hop of its
    route (the head: its loss), replica-major like the routes."""
    starts, out = plan.starts, []
    for mb, path in enumerate(plan.flat()):
        hops = [(starts[("F", mb, h)], starts[("B", mb, h)]) for h in range(len(path))]
        loss = starts[("L", mb, len(path))]
        out.append([*hops, (loss, math.nextafter(loss, math.inf))])  # its forward, then backward
    return out


def routes_of(plan: Plan, pp: int) -> list[list[list[tuple[int, int]]]]:
    """A path plan's routes as (replica, stage) hops, ending at the data node's head place."""
    return [
        [[divmod(node, pp) for node in path] + [(d, pp)] for path in paths]
        for d, paths in enumerate(plan.paths)
    ]
