"""Step plans within one replica: partial and reordered routes, and subnets of blocks, run by the
pipeline runtime against a single process whose model runs the layers of each microbatch's route
in the route's stage order, each block as its subnet says."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from skipjack.batch import IGNORE_INDEX, MicroBatch
from skipjack.models.llama import Llama, Stage, document_causal_mask
from skipjack.models.subnet import Subnet
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.comm import P2P
from skipjack.parallel.pipeline.partition import even_partition
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.runtime import PipelineRuntime
from skipjack.parallel.pipeline.schedule import build_schedule, schedule_from_routes
from skipjack.parallel.pipeline.simulate import CostModel, simulate
from skipjack.testing import run_ranks
from skipjack.testing.reference import SyntheticSamples, tiny_config
from skipjack.trainer.pipeline import cross_entropy

PP, SEED, SEQ_LEN = 4, 0, 16
CFG = tiny_config(n_layers=4)
LAYERS = even_partition(CFG.n_layers, PP)  # one block per stage
MIXED = [[0, 1, 2, 3], [0, 2, 3], [0, 2, 1, 3], [0, 3]]
SUBNETS = {  # block 1: two heads of different kv groups, a third of the neurons; block 2 skipped
    1: Subnet(torch.tensor([0, 3]), torch.arange(0, 128, 3), head_scale=2.0, neuron_scale=3.0),
    2: Subnet(skip=True),
}
# per case, the route of each microbatch and the subnets: full, partial, reordered, all of them
# in one step, and that step with subnets
CASES = {
    "full": ([[0, 1, 2, 3]] * 2, {}),
    "partial": ([[0, 2, 3]] * 2, {}),
    "reordered": ([[0, 2, 1, 3]] * 2, {}),
    "mixed": (MIXED, {}),
    "mixed-subnets": (MIXED, SUBNETS),
}


def plan_of(routes: list[list[int]], subnets: dict) -> StepPlan:
    return StepPlan([[[(0, stage) for stage in route] for route in routes]], subnets)


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
    for name, (routes, subnets) in cases.items():
        stage = Stage(LAYERS[rank], rank == 0, rank == PP - 1)
        chunk = Llama(CFG, stage).init_weights(SEED, device)
        p2p = P2P(dims.group("pp"), PP, device)
        loss_fn = cross_entropy(chunk.tp, CFG.vocab_size)
        full = build_schedule("1f1b", PP, len(routes))
        runtime = PipelineRuntime(full, [chunk], rank, p2p, device, loss_fn)
        micro = microbatches(len(routes))
        loss = runtime.run(micro, scale_of(micro), plan=plan_of(routes, subnets))
        dist.all_reduce(loss, group=dims.group("pp"))  # held by the last stage's rank
        grads = {n: p.grad for n, p in chunk.named_parameters() if p.grad is not None}
        every = [None] * PP
        dist.all_gather_object(every, grads, group=dims.group("pp"))
        results[name] = (float(loss), {k: v for g in every for k, v in g.items()})
    return results


def single_process(routes: list[list[int]], subnets: dict) -> tuple[float, dict]:
    """One whole model; each microbatch runs the blocks of its route's stages in route order,
    each as its subnet says."""
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
                h = model.layers[str(layer)](h, rope, mask, subnets.get(layer))
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
def test_plans_match_single_process_in_route_order(case):
    routes, subnets = CASES[case]
    simulate(schedule_from_routes(PP, routes), CostModel.uniform(PP))  # deadlock-free
    loss, grads = runtime_results()[case]
    ref_loss, ref_grads = single_process(routes, subnets)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    # what no route visits and a skipped block get no gradient, in both
    skipped = {layer for layer, subnet in subnets.items() if subnet.skip}
    visited = {layer for route in routes for stage in route for layer in LAYERS[stage]} - skipped
    names = {n for n, _ in Llama(CFG).named_parameters()}
    unvisited = {
        n for n in names if n.split(".")[0] == "layers" and int(n.split(".")[1]) not in visited
    }
    assert set(grads) == set(ref_grads) == names - unvisited
    for name, g in ref_grads.items():
        err = float((grads[name] - g).norm() / g.norm())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_a_route_that_skips_the_first_or_last_stage_or_leaves_the_replica_is_refused():
    with pytest.raises(ValueError, match="microbatch 1 visits \\[0, 2\\]"):
        schedule_from_routes(PP, [[0, 1, 2, 3], [0, 2]])
    plan = StepPlan([[[(0, 0), (1, 1), (0, 2), (0, 3)]], [[(1, s) for s in range(4)]]])
    with pytest.raises(ValueError, match="replica 0 visits \\(1, 1\\): routes across"):
        plan.stage_routes(0)
