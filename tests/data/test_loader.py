import torch

from skipjack.batch import IGNORE_INDEX
from skipjack.data.loader import ShardedLoader
from skipjack.testing.reference import SyntheticSamples

DATA = SyntheticSamples(64, 8, 100)


def flatten(batch):
    return torch.cat([micro.tokens for micro in batch])


def test_resumed_loader_reads_exactly_the_uninterrupted_batches():
    straight = ShardedLoader(DATA, 8, 2, 0, 1)
    expected = [flatten(straight.next()) for _ in range(6)]
    first = ShardedLoader(DATA, 8, 2, 0, 1)
    got = [flatten(first.next()) for _ in range(3)]
    resumed = ShardedLoader(DATA, 8, 2, 0, 1)
    resumed.load_state_dict(first.state_dict())
    got += [flatten(resumed.next()) for _ in range(3)]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_replica_shards_partition_the_global_batch():
    whole = ShardedLoader(DATA, 8, 4, 0, 1)
    shards = [ShardedLoader(DATA, 8, 2, r, 2) for r in range(2)]
    for _ in range(3):
        expected = flatten(whole.next())
        got = torch.cat([flatten(s.next()) for s in shards])
        assert torch.equal(expected, got)
    assert shards[0].accumulation_steps == 2 and whole.accumulation_steps == 2


def test_position_is_global_so_another_dp_degree_continues_at_the_same_sample():
    one = ShardedLoader(DATA, 8, 2, 0, 1)
    one.next()
    two = [ShardedLoader(DATA, 8, 2, r, 2) for r in range(2)]
    for loader in two:
        loader.load_state_dict(one.state_dict())
    assert torch.equal(flatten(one.next()), torch.cat([flatten(s.next()) for s in two]))


def test_masked_targets_become_ignore_index():
    labels = ShardedLoader(DATA, 8, 8, 0, 1).next()[0].labels
    expected = torch.stack([DATA[i]["loss_mask"] for i in range(8)]) == 0
    assert torch.equal(labels == IGNORE_INDEX, expected)
