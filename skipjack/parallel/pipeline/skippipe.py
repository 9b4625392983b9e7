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
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from skipjack.config import ConfigError
from skipjack.config.parallel import SkipPipeConfig
from skipjack.parallel.pipeline.allocate import allocate
from skipjack.parallel.pipeline.network import Links, load_links
from skipjack.parallel.pipeline.paths import Cluster, Plan, Rules, path_length
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.route import fixed_pipelines, schedule_paths


def layout_links(config: SkipPipeConfig, dp: int, pp: int, message_bytes: float) -> Links:
    """The links between the layout's nodes under `config.network` and `config.allocation`."""
    links = load_links(config.network, dp * pp)
    if config.allocation == "layout" or links.free():
        return links
    found = allocate(links.matrix(message_bytes), [dp] * pp)
    # stage s replica r is the allocator's r-th node of stage s
    where = [found.stages[s][r] for r in range(dp) for s in range(pp)]
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
        planned: list = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            cluster = job_cluster(dp, pp, links, forward, loss, message_bytes)
            full = fixed_pipelines(cluster, Rules(pp, 0, config.memory, microbatches))
            if length == pp and config.max_swaps == 0:  # nothing to skip or reorder
                plan, routes, priority = full, StepPlan.full(dp, microbatches, pp + 1).routes, None
            else:
                rules = Rules(length, config.max_swaps, config.memory, microbatches)
                plan = schedule_paths(cluster, rules)
                routes, priority = routes_of(plan, pp), priority_of(plan)
            planned = [(routes, priority, float(plan.makespan), float(full.makespan))]
        if dist.is_initialized():
            dist.broadcast_object_list(planned, src=0)
        routes, priority, seconds, full_seconds = planned[0]
        return cls(config, dp, pp, microbatches, routes, priority, seconds, full_seconds)

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

    def state_dict(self) -> dict:
        paths = {"routes": self.routes, "priority": self.priority}
        return {"paths": json.dumps(paths), "seconds": [self.plan_seconds, self.full_seconds]}

    def load_state_dict(self, state: dict) -> None:
        paths = json.loads(state["paths"])
        self.routes = [[[tuple(hop) for hop in route] for route in r] for r in paths["routes"]]
        priority = paths["priority"]
        self.priority = None if priority is None else [[tuple(t) for t in p] for p in priority]
        self.plan_seconds, self.full_seconds = map(float, state["seconds"])

    def plan(self, step: int) -> StepPlan:
        """The plan of optimizer step `step`: the paths, or the whole pipeline every
        `full_pipeline_every` steps."""
        every = self.config.full_pipeline_every
        if not self.skips or (every and step % every == 0):
            return StepPlan.full(self.dp, self.microbatches, self.pp + 1)
        return StepPlan(self.routes, in_flight=self.config.memory, priority=self.priority)


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
        out.append([*hops, (loss, loss)])
    return out


def routes_of(plan: Plan, pp: int) -> list[list[list[tuple[int, int]]]]:
    """A path plan's routes as (replica, stage) hops, ending at the data node's head place."""
    return [
        [[divmod(node, pp) for node in path] + [(d, pp)] for path in paths]
        for d, paths in enumerate(plan.paths)
    ]
