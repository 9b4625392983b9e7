"""Erasure coding round trip: every loss pattern up to the parity rebuilds exactly."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skipjack.checkpoint.erasure import Group


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(2, 6),
    parity=st.integers(1, 3),
    lengths=st.lists(st.integers(0, 3000), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_every_loss_pattern_up_to_the_parity_rebuilds_exactly(size, parity, lengths, seed):
    parity = min(parity, size - 1)
    group = Group(size, parity)
    rng = np.random.default_rng(seed)
    snapshots = {n: rng.integers(0, 256, lengths[n], dtype=np.uint8) for n in range(size)}
    if not any(len(s) for s in snapshots.values()):
        snapshots[0] = rng.integers(0, 256, 1, dtype=np.uint8)
    parities = group.encode_all(snapshots)
    lengths = {n: len(s) for n, s in snapshots.items()}
    for count in range(1, parity + 1):
        for lost in itertools.combinations(range(size), count):
            lost = set(lost)
            survivors = {n: s for n, s in snapshots.items() if n not in lost}
            held = {key: b for key, b in parities.items() if key[1] not in lost}
            rebuilt = group.rebuild(lost, survivors, held, lengths)
            assert set(rebuilt) == lost
            for node in lost:
                assert np.array_equal(rebuilt[node], snapshots[node])


def test_layout_no_node_holds_parity_of_its_own_data_and_memory_is_m_over_k():
    for size, parity in [(3, 1), (4, 1), (4, 2), (6, 3)]:
        group = Group(size, parity)
        for row in range(size):
            assert not set(group.holders(row)) & set(group.data_nodes(row))
        for node in range(size):
            assert len(group.rows_of(node)) == group.k  # k stripes, one per row it feeds
            assert sum(node in group.holders(r) for r in range(size)) == parity


def test_losing_more_than_the_parity_is_refused():
    group = Group(4, 1)
    with pytest.raises(ValueError, match="2 nodes lost of a group with parity 1"):
        group.rebuild({0, 1}, {}, {}, {n: 10 for n in range(4)})
    with pytest.raises(ValueError, match="1 to 2 parity"):
        Group(3, 3)
