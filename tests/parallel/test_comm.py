"""Point-to-point links: shape and dtype travel once per link, then receives are posted early."""

import time

import torch
import torch.distributed as dist

from skipjack.parallel.pipeline.comm import P2P, Emulator
from skipjack.parallel.pipeline.network import uniform
from skipjack.parallel.pipeline.schedule import BACKWARD, FORWARD
from skipjack.testing import run_ranks

MESSAGES = [  # (mb, stage, direction, shape, dtype): two links, with their own layouts
    (0, 1, FORWARD, (2, 5, 3), torch.float32),
    (1, 1, FORWARD, (2, 5, 3), torch.float32),
    (0, 0, BACKWARD, (4, 7), torch.bfloat16),
    (2, 1, FORWARD, (2, 5, 3), torch.float32),
    (1, 0, BACKWARD, (4, 7), torch.bfloat16),
]


def value(mb, stage, direction, shape, dtype):
    return torch.full(shape, 100.0 * mb + 10 * stage + direction).to(dtype)


def exchange():
    rank = dist.get_rank()
    p2p = P2P(dist.group.WORLD, num_places=2, device=torch.device("cpu"))
    received, prefetched = [], 0
    for i, (mb, stage, direction, shape, dtype) in enumerate(MESSAGES):
        if rank == 0:
            p2p.send(value(mb, stage, direction, shape, dtype), 1, mb, stage, direction)
            p2p.flush()
        else:
            got = p2p.recv(0, mb, stage, direction)
            received.append(bool(torch.equal(got, value(mb, stage, direction, shape, dtype))))
            if i + 1 < len(MESSAGES):  # post the next receive early, as the runtime does
                nxt = MESSAGES[i + 1]
                p2p.flush((0, nxt[0], nxt[1], nxt[2]))
                prefetched += (0, *nxt[:3]) in p2p._posted
    p2p.wait_all()
    return received, prefetched, len(p2p._described), len(p2p._layouts)


def test_layouts_are_sent_once_per_link_and_later_receives_are_posted_early():
    sender, receiver = run_ranks(exchange, 2)
    assert sender[2] == 2  # one metadata message per link
    received, prefetched, _, layouts = receiver
    assert received == [True] * len(MESSAGES) and layouts == 2
    # the first message of each link waits for its layout; the other three were posted ahead
    assert prefetched == 3


def delayed(latency_ms: float):
    """Rank 0 sends rank 1 three messages over an emulated link; rank 1 times their arrival."""
    links = uniform(2, latency_ms / 1e3, 1e9)
    rank = dist.get_rank()
    p2p = P2P(dist.group.WORLD, 2, torch.device("cpu"), Emulator(links, lambda r: r, rank))
    start = time.perf_counter()
    got = []
    for mb in range(3):
        if rank == 0:
            p2p.send(value(mb, 1, FORWARD, (4, 3), torch.float32), 1, mb, 1, FORWARD)
            p2p.flush()
        else:
            got.append(
                bool(
                    torch.equal(
                        p2p.recv(0, mb, 1, FORWARD), value(mb, 1, FORWARD, (4, 3), torch.float32)
                    )
                )
            )
    p2p.wait_all()
    return got, time.perf_counter() - start


def test_emulated_links_delay_messages_and_keep_them():
    _, (got, seconds) = run_ranks(delayed, 2, 200.0)
    assert got == [True] * 3
    assert seconds >= 0.2  # the first message (after its layout) waits out the latency
