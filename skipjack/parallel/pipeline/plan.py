"""Step plans: what one optimizer step runs, made once per step, identical on every rank.

A `StepPlan` gives, for every microbatch of every data-parallel replica, its route as (replica,
stage) hops, and for every block the `Subnet` it runs (absent: all of it). The full pipeline
without subnets is the default plan; SkipPipe's paths and the EST / SAT regimes are other plans.
The runtime executes a plan: it runs the schedule built from the plan's routes (over every
replica's nodes when routes cross replicas) and hands each chunk the subnets of its blocks.

A microbatch starts at stage 0 of its own replica (where it was loaded) and ends at the last
stage of any replica; in between it may visit any stage of any replica, each place once.
`in_flight` bounds the microbatches a node holds awaiting their backward (None: the runtime's
choice, see `schedule_from_routes`). `priority` optionally says, per microbatch (replica-major)
and hop, when a planner meant its forward and its backward to start (SkipPipe's path scheduler):
each node then takes its ready actions in that order.
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
    in_flight: int | None = None
    priority: list[list[tuple[float, float]]] | None = None  # [microbatch][hop] (F, B)

    @classmethod
    def full(cls, replicas: int, microbatches: int, stages: int) -> StepPlan:
        """Every microbatch through every stage of its own replica, every block whole."""
        return cls(
            [
                [[(r, s) for s in range(stages)] for _ in range(microbatches)]
                for r in range(replicas)
            ]
        )

    def is_full(self, stages: int) -> bool:
        """Every route the whole pipeline of its own replica."""
        return all(
            hops == [(r, s) for s in range(stages)]
            for r, replica in enumerate(self.routes)
            for hops in replica
        )

    def places(self, stages: int) -> list[list[int]]:
        """The routes of every microbatch, replica-major (microbatch m of replica r is number
        r x microbatches + m), as places replica x stages + stage (schedule.py); raises
        ValueError for a route that does not start at stage 0 of its own replica, or names a
        replica or stage that does not exist."""
        replicas = len(self.routes)
        counts = {len(replica) for replica in self.routes}
        if len(counts) > 1:
            raise ValueError(f"replicas plan different microbatch counts: {sorted(counts)}")
        routes = []
        for r, replica in enumerate(self.routes):
            for mb, hops in enumerate(replica):
                if not hops or hops[0] != (r, 0):
                    raise ValueError(
                        f"microbatch {mb} of replica {r} starts at {hops[0] if hops else None}: "
                        f"a route starts at stage 0 of its own replica, ({r}, 0)"
                    )
                bad = [h for h in hops if not (0 <= h[0] < replicas and 0 <= h[1] < stages)]
                if bad:
                    raise ValueError(
                        f"microbatch {mb} of replica {r} visits {bad[0]}: there are {replicas} "
                        f"replica(s) of {stages} stages"
                    )
                routes.append([replica_ * stages + stage for replica_, stage in hops])
        return routes
