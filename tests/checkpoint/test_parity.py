"""The agents' parity exchange in one process: each node's files served over TCP as its agent
serves them, nodes' snapshots published, striped and encoded; a lost node rebuilt from the
others byte for byte."""

import shutil

import pytest
import torch

from skipjack.checkpoint.memory import rebuild_plan
from skipjack.checkpoint.parity import NodeGroup
from skipjack.checkpoint.slots import Slots
from skipjack.checkpoint.transport import Remote, Server


def snapshot(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {"model/w": torch.randn(50 + 7 * rank, generator=g), "trainer/step": step}


def connected(roots: list, nodes: int, per_node: int, parity: int):
    """Every node's group view and its agent's server; node n's files under roots[n] (one root
    for all: nodes of one machine; one each: nodes of different machines)."""
    groups = [NodeGroup(roots[n], n, nodes, per_node, nodes, parity) for n in range(nodes)]
    servers = [Server(g.files, lambda: "token").start() for g in groups]
    peers = {"token": "token", "nodes": [("127.0.0.1", s.port) for s in servers]}
    for group in groups:
        group.connect(peers)
    return groups, servers


@pytest.mark.parametrize("nodes,per_node,parity,machines", [(3, 1, 1, 1), (4, 2, 2, 4)])
def test_lost_nodes_are_rebuilt_byte_for_byte(tmp_path, nodes, per_node, parity, machines):
    roots = [tmp_path / f"machine{n % machines}" for n in range(nodes)]
    groups, servers = connected(roots, nodes, per_node, parity)
    states = [{} for _ in groups]
    for step in (1, 2):
        for group in groups:
            for rank in group.files.ranks:
                Slots(group.files.directory, rank).write(step, snapshot(rank, step))
        for _ in range(3):  # publish, stripe, encode: a few looks each
            for group, state in zip(groups, states, strict=True):
                group.advance(state)
    lost = set(range(parity))
    for n in lost:  # the node's machine is gone: its agent and its files
        servers[n].shutdown()
        servers[n].server_close()
        shutil.rmtree(groups[n].files.directory)
    steps = [sorted(Slots(groups[r // per_node].files.directory, r).steps())
             for r in range(nodes * per_node)]  # fmt: skip
    assert rebuild_plan(groups[-1], steps) == (2, sorted(lost))
    for n in lost:
        groups[n].rebuild(2, lost)
        for rank in groups[n].files.ranks:
            slots = Slots(groups[n].files.directory, rank)
            target = {"model/w": torch.zeros(50 + 7 * rank), "trainer/step": 0}
            slots.read(2, target)
            assert torch.equal(target["model/w"], snapshot(rank, 2)["model/w"])
            assert target["trainer/step"] == 2
    too_many = set(range(parity + 1))
    assert not groups[-1].rebuildable(2, too_many)


def test_a_step_whose_stripes_never_left_its_node_is_not_rebuildable(tmp_path):
    groups, _ = connected([tmp_path] * 3, 3, 1, 1)
    for group in groups:
        Slots(group.files.directory, group.node).write(1, snapshot(group.node, 1))
    groups[0].advance({})  # only node 0 published: no lengths from the others
    assert not groups[0].rebuildable(1, {1})


def test_an_agent_refuses_requests_without_the_jobs_token_and_paths_outside_its_files(tmp_path):
    groups, servers = connected([tmp_path] * 3, 3, 1, 1)
    groups[1].files.directory.mkdir(parents=True)
    address = ("127.0.0.1", servers[1].port)
    assert not Remote(address, "guess").put("parity/l1.n0", b"1")
    honest = Remote(address, "token")
    assert honest.put("parity/l1.n0", b"1")
    for path in ("../../escape", "/etc/passwd", "rank1.json", "parity/../../x"):
        assert not honest.put(path, b"x") and honest.get(path) is None
    assert Remote(("127.0.0.1", 1), "token").get("parity/l1.n0") is None  # nobody there
