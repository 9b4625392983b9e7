"""Which transformer layers each pipeline stage holds.

- `even`: as equal as possible (earlier stages take the remainder);
- explicit `layers_per_stage`;
- `redistribute`: Megatron's baseline against the output layer's imbalance: contiguous stages
  chosen to minimise the largest stage cost when the first stage also pays for the embedding and
  the last for the output layer and loss (so the last stage gets fewer layers as the vocabulary
  grows). Vocabulary parallelism is measured against it.
"""

from __future__ import annotations

from functools import cache

from skipjack.config import ConfigError


def even_partition(n_layers: int, n_stages: int) -> list[range]:
    if n_layers < n_stages:
        raise ConfigError(
            "parallel.pp", f"{n_stages} stages need at least as many layers (n_layers={n_layers})"
        )
    base, extra = divmod(n_layers, n_stages)
    sizes = [base + (1 if s < extra else 0) for s in range(n_stages)]
    return _ranges(sizes)


def explicit_partition(layers_per_stage: list[int], n_layers: int, n_stages: int) -> list[range]:
    if len(layers_per_stage) != n_stages or sum(layers_per_stage) != n_layers:
        raise ConfigError(
            "parallel.layers_per_stage",
            f"{layers_per_stage} must have {n_stages} entries summing to n_layers={n_layers}",
        )
    if min(layers_per_stage) < 0:
        raise ConfigError("parallel.layers_per_stage", "layer counts must be >= 0")
    return _ranges(layers_per_stage)


def redistribute_partition(
    n_layers: int, n_stages: int, layer_cost: float, first_cost: float, last_cost: float
) -> list[range]:
    """Contiguous layer counts minimising the most expensive stage (ties: earlier stages fuller).

    Costs are in any common unit, e.g. forward FLOPs per token: a block ~ 2 x its parameters
    + 4 s d, the output layer and loss ~ 2 d V, the embedding lookup ~ 0.
    """
    if n_layers < n_stages:
        return even_partition(n_layers, n_stages)

    @cache
    def best(stage: int, start: int) -> tuple[float, tuple[int, ...]]:
        """Smallest max-cost of stages stage.. covering layers start.. (each stage >= 1 layer)."""
        left = n_layers - start
        extra = (first_cost if stage == 0 else 0.0) + (last_cost if stage == n_stages - 1 else 0.0)
        if stage == n_stages - 1:
            return extra + left * layer_cost, (left,)
        options = []
        for count in range(left - (n_stages - stage - 1), 0, -1):
            rest_cost, rest = best(stage + 1, start + count)
            options.append((max(extra + count * layer_cost, rest_cost), (count, *rest)))
        return min(options, key=lambda o: o[0])

    return _ranges(list(best(0, 0)[1]))


def _ranges(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out
