"""Batches sharded over data-parallel ranks, resumable from a global sample position.

Step k of training consumes global samples [c, c + global_batch_size) where c is the number of
samples consumed before it. Replica r of dp takes the r-th contiguous share and cuts it into
micro-batches. The position is global, so a run resumed with another dp degree continues from
the same sample, and the math of a step never depends on the layout.
"""

from __future__ import annotations

from collections.abc import Sequence

from skipjack.batch import MicroBatch
from skipjack.data.indexed import sample_batch


class ShardedLoader:
    def __init__(
        self,
        dataset: Sequence,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
    ):
        if global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"global batch {global_batch_size} not divisible by dp {dp_size} x "
                f"micro-batch {micro_batch_size}"
            )
        if len(dataset) == 0:
            raise ValueError("the dataset has no samples; it is shorter than one sequence")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    def batch_at(self, consumed: int) -> list[MicroBatch]:
        """This rank's micro-batches of the global batch that starts at sample `consumed`."""
        share = self.global_batch_size // self.dp_size
        start = consumed + self.dp_rank * share
        n = len(self.dataset)
        micro = []
        for m in range(self.accumulation_steps):
            first = start + m * self.micro_batch_size
            indices = [(first + j) % n for j in range(self.micro_batch_size)]
            micro.append(sample_batch(self.dataset, indices))
        return micro

    def next(self) -> list[MicroBatch]:
        batch = self.batch_at(self.consumed_samples)
        self.consumed_samples += self.global_batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
