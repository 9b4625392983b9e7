"""Erasure coding of in-memory snapshots across the nodes of a group (REFT, arXiv 2310.12670).

A group of `size` nodes with `parity` m (k = size - m data stripes per row) survives the loss
of any m of its nodes. Every node keeps its own snapshot whole; what the others hold is parity:

- every node's snapshot (bytes, zero-padded to the group's longest) is cut into k stripes;
- there are `size` rows; row r's parity lives on the m nodes r, r + 1, ..., r + m - 1 (mod size)
  and its data are one stripe of each of the other k nodes (node i gives its j-th stripe to the
  j-th row in which it is a data node), so no node holds parity of its own data;
- a row's m parity blocks: the XOR of its k stripes when m = 1 (numpy, in place), else the
  Reed-Solomon code of zfec (systematic: blocks 0..k-1 are the data, k..k+m-1 the parity).

Each node then holds m parity blocks of 1/k of a snapshot: memory m/k of a snapshot. To rebuild
lost nodes, every row that lost a stripe is decoded from any k of its surviving blocks, passed
to zfec at their own block numbers (zfec returns wrong data, silently, for blocks passed at
other numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Group:
    size: int
    parity: int

    def __post_init__(self) -> None:
        if not 1 <= self.parity < self.size:
            raise ValueError(
                f"a group of {self.size} nodes takes 1 to {self.size - 1} parity, not {self.parity}"
            )

    @property
    def k(self) -> int:
        return self.size - self.parity

    def holders(self, row: int) -> list[int]:
        """The nodes holding row `row`'s parity blocks, in block order (k, k + 1, ...)."""
        return [(row + j) % self.size for j in range(self.parity)]

    def data_nodes(self, row: int) -> list[int]:
        """The nodes whose stripes make up row `row`, in block order (0 .. k - 1)."""
        held = set(self.holders(row))
        return [node for node in range(self.size) if node not in held]

    def rows_of(self, node: int) -> list[int]:
        """The rows `node`'s stripes go to, in stripe order."""
        return [row for row in range(self.size) if node in self.data_nodes(row)]

    def stripe_length(self, length: int) -> int:
        """Bytes per stripe for snapshots of at most `length` bytes (whole 8-byte words: XOR
        runs on words)."""
        return -(-length // (8 * self.k)) * 8

    def stripes(self, node: int, snapshot: np.ndarray, length: int) -> dict[int, np.ndarray]:
        """Node `node`'s snapshot cut into its k stripes for snapshots of at most `length`
        bytes, by the row each goes to: views of the snapshot, zero-padded copies where it ends
        short of a stripe."""
        size, out = self.stripe_length(length), {}
        for j, row in enumerate(self.rows_of(node)):
            piece = snapshot[j * size : (j + 1) * size]
            if len(piece) < size:
                piece = np.concatenate([piece, np.zeros(size - len(piece), dtype=np.uint8)])
            out[row] = piece
        return out

    def encode(self, row: int, stripes: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Row `row`'s parity blocks by holder, from its data nodes' stripes (by node)."""
        data = [stripes[node] for node in self.data_nodes(row)]
        return dict(zip(self.holders(row), _parity(data, self.parity), strict=True))

    def encode_all(self, snapshots: dict[int, np.ndarray]) -> dict[tuple[int, int], np.ndarray]:
        """Every row's parity blocks by (row, holder) from every node's snapshot, in one place
        (the agents make the same blocks spread over the group)."""
        longest = max(len(s) for s in snapshots.values())
        stripes = {node: self.stripes(node, s, longest) for node, s in snapshots.items()}
        parities = {}
        for row in range(self.size):
            data = {node: stripes[node][row] for node in self.data_nodes(row)}
            for holder, block in self.encode(row, data).items():
                parities[(row, holder)] = block
        return parities

    def rebuild(
        self,
        lost: set[int],
        snapshots: dict[int, np.ndarray],
        parities: dict[tuple[int, int], np.ndarray],
        lengths: dict[int, int],
    ) -> dict[int, np.ndarray]:
        """The snapshots of the `lost` nodes from the survivors' `snapshots` (by node), their
        parity blocks (by (row, holder)) and every node's snapshot length. Raises ValueError
        when more nodes are lost than the group has parity."""
        if len(lost) > self.parity:
            raise ValueError(
                f"{len(lost)} nodes lost of a group with parity {self.parity}: cannot rebuild"
            )
        longest = max(lengths.values())
        size = self.stripe_length(longest)
        have = {node: self.stripes(node, snapshots[node], longest) for node in snapshots}
        pieces: dict[int, dict[int, np.ndarray]] = {node: {} for node in lost}
        for row in range(self.size):
            data, holders = self.data_nodes(row), self.holders(row)
            missing = [node for node in data if node in lost]
            if not missing:
                continue
            blocks, numbers = [], []
            for number, node in enumerate(data):
                if node not in lost:
                    blocks.append(have[node][row])
                    numbers.append(number)
            for j, holder in enumerate(holders):
                if holder not in lost:
                    blocks.append(parities[(row, holder)])
                    numbers.append(self.k + j)
            decoded = _decode(blocks[: self.k], numbers[: self.k], self.k, self.size, size)
            for node in missing:
                pieces[node][row] = decoded[data.index(node)]
        return {
            node: np.concatenate([pieces[node][row] for row in self.rows_of(node)])[: lengths[node]]
            for node in lost
        }


def _parity(data: list[np.ndarray], m: int) -> list[np.ndarray]:
    if m == 1:
        out = data[0].copy()
        for block in data[1:]:
            np.bitwise_xor(_words(out), _words(block), out=_words(out))
        return [out]
    import zfec

    k = len(data)
    blocks = zfec.Encoder(k, k + m).encode(tuple(data), tuple(range(k, k + m)))
    return [np.frombuffer(block, dtype=np.uint8) for block in blocks]


def _decode(blocks: list, numbers: list[int], k: int, n: int, size: int) -> list[np.ndarray]:
    """The k data blocks of a row from any k of its n blocks, each at its own number."""
    if len(blocks) < k:
        raise ValueError(f"{len(blocks)} blocks of a row survive; {k} are needed")
    if n - k == 1:  # XOR: the one missing data block is the XOR of the k others
        present = dict(zip(numbers, blocks, strict=True))
        if all(i in present for i in range(k)):
            return [present[i] for i in range(k)]
        gone = next(i for i in range(k) if i not in present)
        out = np.zeros(size, dtype=np.uint8)
        for block in blocks:
            np.bitwise_xor(_words(out), _words(block), out=_words(out))
        return [present[i] if i != gone else out for i in range(k)]
    import zfec

    decoded = zfec.Decoder(k, n).decode(tuple(blocks), tuple(numbers))
    return [np.frombuffer(block, dtype=np.uint8) for block in decoded]


def _words(block: np.ndarray) -> np.ndarray:
    """The block as 8-byte words where it is whole words (8x fewer elements to XOR)."""
    return block.view(np.uint64) if block.size % 8 == 0 else block
