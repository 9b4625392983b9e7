"""The agents' parity exchange, without processes: nodes' snapshots published, striped and
encoded through their directories; a lost node rebuilt from the others byte for byte."""

import shutil

import pytest
import torch

from skipjack.checkpoint.memory import rebuild_plan
from skipjack.checkpoint.parity import NodeGroup
from skipjack.checkpoint.slots import Slots


def snapshot(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {"model/w": torch.randn(50 + 7 * rank, generator=g), "trainer/step": step}


@pytest.mark.parametrize("nodes,per_node,parity", [(3, 1, 1), (4, 2, 2)])
def test_lost_nodes_are_rebuilt_byte_for_byte(tmp_path, nodes, per_node, parity):
    groups = [NodeGroup(tmp_path, n, nodes, per_node, nodes, parity) for n in range(nodes)]
    states = [{} for _ in groups]
    for step in (1, 2):
        for group in groups:
            for rank in group.ranks(group.node):
                Slots(group.directory(group.node), rank).write(step, snapshot(rank, step))
        for _ in range(3):  # publish, stripe, encode: a few looks each
            for group, state in zip(groups, states, strict=True):
                group.advance(state)
    lost = set(range(parity))
    for n in lost:
        shutil.rmtree(groups[n].directory(n))
    steps = [sorted(Slots(groups[r // per_node].directory(r // per_node), r).steps())
             for r in range(nodes * per_node)]  # fmt: skip
    assert rebuild_plan(groups[-1], steps) == (2, sorted(lost))
    for n in lost:
        groups[n].rebuild(2, lost)
        for rank in groups[n].ranks(n):
            slots = Slots(groups[n].directory(n), rank)
            target = {"model/w": torch.zeros(50 + 7 * rank), "trainer/step": 0}
            slots.read(2, target)
            assert torch.equal(target["model/w"], snapshot(rank, 2)["model/w"])
            assert target["trainer/step"] == 2
    too_many = set(range(parity + 1))
    assert not groups[-1].rebuildable(2, too_many)


def test_a_step_whose_stripes_never_left_its_node_is_not_rebuildable(tmp_path):
    groups = [NodeGroup(tmp_path, n, 3, 1, 3, 1) for n in range(3)]
    for group in groups:
        Slots(group.directory(group.node), group.node).write(1, snapshot(group.node, 1))
    groups[0].advance({})  # only node 0 published: no lengths from the others
    assert not groups[0].rebuildable(1, {1})
