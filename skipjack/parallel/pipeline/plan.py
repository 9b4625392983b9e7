"""Step plans: what one optimizer step runs, made once per step, identical on every rank.

A `StepPlan` gives, for every microbatch of every data-parallel replica, its route as (replica,
stage) hops, and for every block the `Subnet` it runs (absent: all of it). The full pipeline
without subnets is the default plan; SkipPipe's paths and the EST / SAT regimes are other plans.
The runtime executes a plan: it runs the schedule built from the plan's routes and hands each
chunk the subnets of its blocks. Routes that cross replicas are not executable yet (the runtime
says so); within a replica any route from the first to the last stage is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Hop = tuple[int, int]  # (replica, stage)


@dataclass(frozen=True)
class StepPlan:
    routes: list[list[list[Hop]]]  # [replica][microbatch] -> hops
    subnets: Mapping[int, Any] = field(default_factory=dict)  # global block -> models Subnet

    @classmethod
    def full(cls, replicas: int, microbatches: int, stages: int) -> StepPlan:
        """Every microbatch through every stage of its own replica, every block whole."""
        return cls(
            [
                [[(r, s) for s in range(stages)] for _ in range(microbatches)]
                for r in range(replicas)
            ]
        )

    def stage_routes(self, replica: int) -> list[list[int]]:
        """The stages each microbatch of `replica` visits, in order; raises ValueError for a
        route that leaves the replica."""
        routes = []
        for mb, hops in enumerate(self.routes[replica]):
            away = [hop for hop in hops if hop[0] != replica]
            if away:
                raise ValueError(
                    f"microbatch {mb} of replica {replica} visits {away[0]}: routes across "
                    "replicas are not executable yet"
                )
            routes.append([stage for _, stage in hops])
        return routes
