"""A micro-batch: what one forward of the model consumes, carried to every pipeline chunk."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the label of a position without loss (PyTorch's cross_entropy default)


@dataclass
class MicroBatch:
    """Rows of token ids and their next-token labels, with what packed sequences add: the RoPE
    position of each token (restarting at each document) and the document it belongs to
    (attention stays inside a document)."""

    tokens: torch.Tensor  # (batch, seq) input ids
    labels: torch.Tensor  # (batch, seq) next-token targets; IGNORE_INDEX where there is no loss
    positions: torch.Tensor | None = None  # (batch, seq); None: 0, 1, ... along every row
    documents: torch.Tensor | None = None  # (batch, seq); None: each row is one document

    def to(self, device: torch.device | str) -> MicroBatch:
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return MicroBatch(
            moved(self.tokens), moved(self.labels), moved(self.positions), moved(self.documents)
        )

    @property
    def targets(self) -> int:
        """How many positions carry a loss."""
        return int((self.labels != IGNORE_INDEX).sum())
