import pytest

from skipjack.config import ConfigError
from skipjack.parallel.pipeline.partition import (
    even_partition,
    explicit_partition,
    redistribute_partition,
)


def sizes(ranges):
    return [len(r) for r in ranges]


def test_even_partition_is_contiguous_and_balanced():
    parts = even_partition(10, 4)
    assert sizes(parts) == [3, 3, 2, 2]
    assert [i for r in parts for i in r] == list(range(10))
    with pytest.raises(ConfigError, match="at least as many layers"):
        even_partition(3, 4)


def test_explicit_partition_checks_its_counts():
    assert sizes(explicit_partition([1, 3], 4, 2)) == [1, 3]
    with pytest.raises(ConfigError, match="parallel.layers_per_stage"):
        explicit_partition([2, 3], 4, 2)


def test_redistribute_moves_layers_off_the_last_stage_as_the_vocabulary_grows():
    d, s = 256, 512
    layer = 24 * d * d + 4 * s * d
    small_vocab = redistribute_partition(16, 4, layer, 0.0, 2 * d * 1000)
    assert sizes(small_vocab) == [4, 4, 4, 4]
    big_vocab = redistribute_partition(16, 4, layer, 0.0, 2 * d * 128_000)
    assert sizes(big_vocab)[-1] < 4 and sum(sizes(big_vocab)) == 16
    # no stage costs more than the even split's last stage
    worst = max(
        n * layer + (2 * d * 128_000 if i == 3 else 0) for i, n in enumerate(sizes(big_vocab))
    )
    assert worst < 4 * layer + 2 * d * 128_000
