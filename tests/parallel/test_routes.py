"""Partial and reordered routes within one replica: the runtime against a single process whose
model runs the layers of each microbatch's route in the route's stage order."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from skipjack.batch import IGNORE_INDEX, MicroBatch
from skipjack.models.llama import Llama, Stage, document_causal_mask
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.comm import P2P
from skipjack.parallel.pipeline.partition import even_partition
from skipjack.parallel.pipeline.runtime import PipelineRuntime
from skipjack.parallel.pipeline.schedule import Action, Schedule
from skipjack.parallel.pipeline.simulate import CostModel, simulate
from skipjack.testing import run_ranks
from skipjack.testing.reference import SyntheticSamples, tiny_config
from skipjack.trainer.pipeline import cross_entropy

PP, SEED, SEQ_LEN = 4, 0, 16
CFG = tiny_config(n_layers=4)
LAYERS = even_partition(CFG.n_layers, PP)  # one block per stage
# per case, the route of each microbatch: full, partial, reordered, and all of them in one step
CASES = {
    "full": [[0, 1, 2, 3]] * 2,
    "partial": [[0, 2, 3]] * 2,
    "reordered": [[0, 2, 1, 3]] * 2,
    "mixed": [[0, 1, 2, 3], [0, 2, 3], [0, 2, 1, 3], [0, 3]],
}


def routed_schedule(routes: list[list[int]]) -> Schedule:
    """GPipe over `routes`: each rank runs the forwards of the microbatches that visit its stage,
    then their backwards, both in microbatch order (deadlock-free for any routes)."""
    actions = [
        [Action(kind, mb) for kind in "FB" for mb, route in enumerate(routes) if rank in route]
        for rank in range(PP)
    ]
    return Schedule("routes", PP, len(routes), actions, routes=routes)


def microbatches(count: int) -> list[MicroBatch]:
    """Two sequences per microbatch; about 10% of the targets ignored. Odd microbatches are
    packed: two documents per row (7 and 9 tokens), positions restarting at the second."""
    data = SyntheticSamples(2 * count, SEQ_LEN, CFG.vocab_size)
    samples = [data[i] for i in range(2 * count)]
    micro = []
    for pair in zip(samples[::2], samples[1::2], strict=True):
        tokens = torch.stack([s["tokens"] for s in pair])
        labels = torch.stack([s["labels"] for s in pair])
        mask = torch.stack([s["loss_mask"] for s in pair])
        batch = MicroBatch(tokens, labels.masked_fill(mask == 0, IGNORE_INDEX))
        if len(micro) % 2:
            batch.positions = torch.cat([torch.arange(7), torch.arange(9)]).expand(2, -1)
            batch.documents = torch.tensor([0] * 7 + [1] * 9).expand(2, -1)
        micro.append(batch)
    return micro


def scale_of(micro) -> torch.Tensor:
    return torch.tensor(float(sum(batch.targets for batch in micro)))


def pipelined(cases: dict[str, list[list[int]]]) -> dict[str, tuple[float, dict]]:
    """On each of PP ranks: per case, the loss and every gradient of one forward-backward."""
    dims = ParallelDims(dp=1, pp=PP, rank=dist.get_rank()).build_groups()
    rank, device = dims.pp_rank, torch.device("cpu")
    results = {}
    for name, routes in cases.items():
        stage = Stage(LAYERS[rank], rank == 0, rank == PP - 1)
        chunk = Llama(CFG, stage).init_weights(SEED, device)
        p2p = P2P(dims.group("pp"), PP, device)
        loss_fn = cross_entropy(chunk.tp, CFG.vocab_size)
        runtime = PipelineRuntime(routed_schedule(routes), [chunk], rank, p2p, device, loss_fn)
        micro = microbatches(len(routes))
        loss = runtime.run(micro, scale_of(micro))
        dist.all_reduce(loss, group=dims.group("pp"))  # held by the last stage's rank
        grads = {n: p.grad for n, p in chunk.named_parameters() if p.grad is not None}
        every = [None] * PP
        dist.all_gather_object(every, grads, group=dims.group("pp"))
        results[name] = (float(loss), {k: v for g in every for k, v in g.items()})
    return results


def single_process(routes: list[list[int]]) -> tuple[float, dict]:
    """One whole model; each microbatch runs the blocks of its route's stages in route order."""
    model = Llama(CFG).init_weights(SEED)
    micro = microbatches(len(routes))
    scale = scale_of(micro)
    total = 0.0
    for batch, route in zip(micro, routes, strict=True):
        h = model.tok_embeddings(batch.tokens)
        rope = model.rope if batch.positions is None else model.rope[batch.positions]
        mask = None if batch.documents is None else document_causal_mask(batch.documents)
        for stage in route:
            for layer in LAYERS[stage]:
                h = model.layers[str(layer)](h, rope, mask)
        logits = F.linear(model.norm(h), model.output_weight())
        labels = batch.labels.flatten()
        loss = F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum") / scale
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@functools.cache
def runtime_results() -> dict[str, tuple[float, dict]]:
    return run_ranks(pipelined, PP, CASES)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_routes_match_single_process_in_route_order(case):
    routes = CASES[case]
    schedule = routed_schedule(routes)
    schedule.check()
    simulate(schedule, CostModel.uniform(PP))  # deadlock-free
    loss, grads = runtime_results()[case]
    ref_loss, ref_grads = single_process(routes)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    # what no route visits gets no gradient, in both
    visited = {layer for route in routes for stage in route for layer in LAYERS[stage]}
    names = {n for n, _ in Llama(CFG).named_parameters()}
    unvisited = {
        n for n in names if n.split(".")[0] == "layers" and int(n.split(".")[1]) not in visited
    }
    assert set(grads) == set(ref_grads) == names - unvisited
    for name, g in ref_grads.items():
        err = float((grads[name] - g).norm() / g.norm())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
