"""Link profiles: the latency and bandwidth between every two nodes of a pipeline job.

A profile is a table of regions and the links between them; nodes are placed on the regions
round-robin (node i in region i mod regions, regions in the order the table first names them),
and two nodes of one region talk over the table's same-region link. SkipPipe's allocator and
path scheduler plan against it (`route.py`, `allocate.py`), the simulator predicts iteration
times from it, and the point-to-point layer can emulate it (`comm.py`: every transfer delayed by
its link), so a CPU run shows what a slow network does to a schedule.

Built-in profiles:
- `none`: no delay (the default);
- `cluster`: one data centre, 0.02 ms and 12.5 GB/s (100 Gb/s) between any two nodes;
- `multi_cluster`: four data centres of such nodes, 10 ms and 1.25 GB/s (10 Gb/s) between them;
- `geo`: twelve regions on four continents, latencies and bandwidths measured between cloud
  regions by SkipPipe's authors (`geo_links.csv`), 1 ms and 2 GiB/s inside a region.
A file of one's own (`region_a,region_b,latency_ms,bandwidth_gib_per_s`, one row per pair of
regions, optionally `x,x,...` rows for the inside of region x) is a profile too; see
docs/skippipe.md for measuring one.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skipjack.config.parallel import PROFILES

GIB = 2**30
_GEO = Path(__file__).with_name("geo_links.csv")
_SAME_REGION = (1.0, 2.0)  # geo: ms, GiB/s inside a region


@dataclass(frozen=True)
class Links:
    """Seconds of latency and bytes per second of bandwidth between every two nodes."""

    latency: np.ndarray  # [nodes, nodes]
    bandwidth: np.ndarray  # [nodes, nodes]; inf: no limit
    regions: tuple[str, ...] = ()  # of every node, where the profile names them

    @property
    def nodes(self) -> int:
        return len(self.latency)

    def seconds(self, src: int, dst: int, nbytes: float) -> float:
        """The time a message of `nbytes` takes from node `src` to node `dst` (0 to itself)."""
        if src == dst:
            return 0.0
        return float(self.latency[src, dst] + nbytes / self.bandwidth[src, dst])

    def matrix(self, nbytes: float) -> np.ndarray:
        """`seconds` of a message of `nbytes` for every pair of nodes."""
        out = self.latency + nbytes / self.bandwidth
        np.fill_diagonal(out, 0.0)
        return out

    def free(self) -> bool:
        return not self.latency.any() and np.isinf(self.bandwidth).all()


def uniform(nodes: int, latency_s: float, bandwidth: float) -> Links:
    shape = (nodes, nodes)
    return Links(np.full(shape, latency_s), np.full(shape, float(bandwidth)))


def load_links(profile: str, nodes: int) -> Links:
    """The links between `nodes` nodes of a built-in profile or of a profile file."""
    if nodes < 1:
        raise ValueError(f"a network needs at least one node, not {nodes}")
    if profile == "none":
        return uniform(nodes, 0.0, np.inf)
    if profile == "cluster":
        return uniform(nodes, 20e-6, 12.5e9)
    if profile == "multi_cluster":
        site = np.arange(nodes) % 4
        same = site[:, None] == site[None, :]
        latency = np.where(same, 20e-6, 10e-3)
        bandwidth = np.where(same, 12.5e9, 1.25e9)
        return Links(latency, bandwidth, tuple(f"site{s}" for s in site))
    path = _GEO if profile == "geo" else Path(profile)
    if not path.is_file():
        raise ValueError(
            f"network profile {profile!r}: not one of {', '.join(PROFILES)} and no such file"
        )
    return _from_table(path, nodes)


def _from_table(path: Path, nodes: int) -> Links:
    regions: list[str] = []
    table: dict[tuple[str, str], tuple[float, float]] = {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"region_a", "region_b", "latency_ms", "bandwidth_gib_per_s"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path}: a profile needs the columns {', '.join(sorted(need))}")
    for line, row in enumerate(rows, start=2):
        a, b = row["region_a"].strip(), row["region_b"].strip()
        try:
            link = float(row["latency_ms"]), float(row["bandwidth_gib_per_s"])
        except ValueError:
            raise ValueError(f"{path}:{line}: latency and bandwidth must be numbers") from None
        if link[0] < 0 or link[1] <= 0:
            raise ValueError(f"{path}:{line}: latency >= 0 and bandwidth > 0, not {link}")
        for region in (a, b):
            if region not in regions:
                regions.append(region)
        table[(a, b)] = table[(b, a)] = link
    placed = [regions[i % len(regions)] for i in range(nodes)]
    latency, bandwidth = np.zeros((nodes, nodes)), np.zeros((nodes, nodes))
    for i, a in enumerate(placed):
        for j, b in enumerate(placed):
            if a == b:
                ms, gib = table.get((a, a), _SAME_REGION)
            elif (a, b) in table:
                ms, gib = table[(a, b)]
            else:
                raise ValueError(f"{path}: no link between regions {a!r} and {b!r}")
            latency[i, j], bandwidth[i, j] = ms / 1e3, gib * GIB
    return Links(latency, bandwidth, tuple(placed))
