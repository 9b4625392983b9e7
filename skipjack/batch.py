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

    def pack(self) -> torch.Tensor:
        """One int64 tensor (4, batch, seq) to send to a rank that has not loaded this batch:
        tokens, labels, positions and documents, a row of -1 for those absent."""
        absent = torch.full_like(self.tokens, -1)
        rows = (self.tokens, self.labels, self.positions, self.documents)
        return torch.stack([absent if t is None else t.to(torch.int64) for t in rows])

    @staticmethod
    def unpack(packed: torch.Tensor) -> MicroBatch:
        tokens, labels, positions, documents = packed.unbind(0)
        return MicroBatch(
            tokens,
            labels,
            None if bool((positions < 0).all()) else positions,
            None if bool((documents < 0).all()) else documents,
        )
