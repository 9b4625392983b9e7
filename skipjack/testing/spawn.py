"""Run a function on N real processes joined in a gloo process group (rendezvous on localhost)."""

from __future__ import annotations

import io
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(fn: Callable, rank: int, world_size: int, port: int, queue, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # as launchers set them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        # bytes, not tensors: a tensor in a queue is a handle to shared memory of this process,
        # which is gone once it exits
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """fn(*args) on `world_size` spawned ranks; returns their results in rank order.

    `fn` must be importable (a module-level function). A failure on any rank raises with that
    rank's traceback; a hang raises after `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    # this process serves the rendezvous store on a port the OS picks: no port can be taken
    # between choosing and binding it
    server = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)
    port = server.port
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, ok, value = queue.get()
        if ok:
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{value}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        raise RuntimeError(f"ranks {missing} gave no result within {timeout:.0f}s (hung or died)")
    return [results[r] for r in range(world_size)]
