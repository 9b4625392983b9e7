"""Step plans within one replica: partial and reordered routes, and subnets of blocks, run by the
pipeline runtime against a single process whose model runs the layers of each microbatch's route
in the route's stage order, each block as its subnet says."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from skipjack.batch import IGNORE_INDEX, MicroBatch
from skipjack.models.llama import (
    Llama,
    Stage,
    block_flops,
    document_causal_mask,
    flops_per_token,
)
from skipjack.models.subnet import Subnet
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.comm import P2P, Emulator
from skipjack.parallel.pipeline.network import load_links
from skipjack.parallel.pipeline.partition import even_partition
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.parallel.pipeline.runtime import PipelineRuntime
from skipjack.parallel.pipeline.schedule import build_schedule, schedule_from_routes
from skipjack.parallel.pipeline.simulate import CostModel, simulate
from skipjack.testing import run_ranks
from skipjack.testing.reference import SyntheticSamples, tiny_config
from skipjack.trainer.pipeline import cross_entropy, plan_flops

SEED, SEQ_LEN = 0, 16
CFG = tiny_config(n_layers=4)
MIXED = [[0, 1, 2, 3], [0, 2, 3], [0, 2, 1, 3], [0, 3]]
SUBNETS = {  # block 1: two heads of different kv groups, a third of the neurons; block 2 skipped
    1: Subnet(torch.tensor([0, 3]), torch.arange(0, 128, 3), head_scale=2.0, neuron_scale=3.0),
    2: Subnet(skip=True),
}


def within(*routes: list[int]) -> list[list[list[tuple[int, int]]]]:
    """Routes of one replica's microbatches, given as their stages."""
    return [[[(0, stage) for stage in route] for route in routes]]


# per layout (dp, pp, head: the loss on the data node), per case: the hops of every microbatch
# of every replica, and the subnets
CASES = {
    (1, 4, False): {  # within one replica: full, partial, reordered, all of them, with subnets
        "full": (within(*[[0, 1, 2, 3]] * 2), {}),
        "partial": (within(*[[0, 2, 3]] * 2), {}),
        "reordered": (within(*[[0, 2, 1, 3]] * 2), {}),
        "mixed": (within(*MIXED), {}),
        "mixed-subnets": (within(*MIXED), SUBNETS),
    },
    (2, 2, False): {  # each replica's second microbatch ends on the other replica's last stage
        "across": (
            [[[(0, 0), (0, 1)], [(0, 0), (1, 1)]], [[(1, 0), (0, 1)], [(1, 0), (1, 1)]]],
            {},
        ),
    },
    (2, 4, False): {  # across replicas, stages skipped, stages 1 and 2 swapped; with subnets
        "across-mixed": (
            [
                [[(0, 0), (1, 1), (1, 2), (0, 3)], [(0, 0), (0, 2), (0, 3)]],
                [[(1, 0), (0, 2), (1, 1), (1, 3)], [(1, 0), (1, 2), (0, 3)]],
            ],
            SUBNETS,
        ),
        "across-full": ([[[(r, s) for s in range(4)]] * 2 for r in range(2)], {}),
    },
    (2, 3, True): {  # SkipPipe's paths: back to the data node's head (stage 3) for the loss
        "head-full": ([[[(r, s) for s in range(4)]] * 2 for r in range(2)], {}),
        "head-paths": (
            [
                [[(0, 0), (1, 2), (0, 3)], [(0, 0), (0, 1), (0, 3)], [(0, 0), (0, 3)]],
                [[(1, 0), (0, 2), (1, 1), (1, 3)], [(1, 0), (0, 1), (1, 3)], [(1, 0), (1, 3)]],
            ],
            SUBNETS,
        ),
    },
}


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


def pipelined(dp: int, pp: int, head: bool, cases: dict, network: str = "none") -> dict:
    """On each of dp x pp ranks: per case, the loss of the global batch and every gradient
    this rank's chunk got from one forward-backward along the case's plan, over links that
    emulate `network`."""
    dims = ParallelDims(dp=dp, pp=pp, rank=dist.get_rank()).build_groups()
    rank, replica, device = dims.pp_rank, dims.dp_rank, torch.device("cpu")
    layers = even_partition(CFG.n_layers, pp)
    results = {}
    for name, (routes, subnets) in cases.items():
        stages = [Stage(layers[rank], rank == 0, rank == pp - 1 and not head)]
        if head and rank == 0:
            stages.append(Stage(range(0), False, True))
        chunks = [Llama(CFG, stage).init_weights(SEED, device) for stage in stages]
        links = load_links(network, dp * pp)
        emulator = Emulator.over(links, dims.pipe_ranks(), dist.get_rank())
        p2p = P2P(dims.group("pipe"), dp * (pp + head), device, emulator)
        loss_fn = cross_entropy(chunks[0].tp, CFG.vocab_size)
        per_replica = len(routes[0])
        if head:
            full = StepPlan.full(1, per_replica, pp + 1).places(pp + 1)
            full = schedule_from_routes(pp, full, head=True)
        else:
            full = build_schedule("1f1b", pp, per_replica)
        runtime = PipelineRuntime(
            full, chunks, rank, p2p, device, loss_fn, replica=replica, ranks=dims.pipe_ranks()
        )
        every_batch = microbatches(dp * per_replica)
        micro = every_batch[replica * per_replica : (replica + 1) * per_replica]
        loss = runtime.run(micro, scale_of(every_batch), plan=StepPlan(routes, subnets))
        dist.all_reduce(loss)  # held by the ranks of the routes' last stages
        grads = {n: p.grad for c in chunks for n, p in c.named_parameters() if p.grad is not None}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, grads)
        summed: dict[str, torch.Tensor] = {}  # over the replicas of each stage
        for got in every:
            for n, g in got.items():
                summed[n] = summed[n] + g if n in summed else g
        results[name] = (float(loss), summed)
    return results


def single_process(pp: int, routes: list, subnets: dict) -> tuple[float, dict]:
    """One whole model; each microbatch runs the blocks of its route's stages in route order
    (whatever replica a hop is on), each as its subnet says."""
    layers = even_partition(CFG.n_layers, pp)
    model = Llama(CFG).init_weights(SEED)
    stage_routes = [[stage for _, stage in hops] for replica in routes for hops in replica]
    micro = microbatches(len(stage_routes))
    scale = scale_of(micro)
    total = 0.0
    for batch, route in zip(micro, stage_routes, strict=True):
        h = model.tok_embeddings(batch.tokens)
        rope = model.rope if batch.positions is None else model.rope[batch.positions]
        mask = None if batch.documents is None else document_causal_mask(batch.documents)
        for stage in route:
            for layer in layers[stage] if stage < pp else []:  # stage pp: the head
                h = model.layers[str(layer)](h, rope, mask, subnets.get(layer))
        logits = F.linear(model.norm(h), model.output_weight())
        labels = batch.labels.flatten()
        loss = F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum") / scale
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@functools.cache
def runtime_results(dp: int, pp: int, head: bool) -> dict[str, tuple[float, dict]]:
    return run_ranks(pipelined, dp * pp, dp, pp, head, CASES[(dp, pp, head)])[0]


@pytest.mark.parametrize(
    "layout,case", [(layout, case) for layout, cases in CASES.items() for case in cases]
)
def test_plans_match_single_process_in_route_order(layout, case):
    dp, pp, head = layout
    routes, subnets = CASES[layout][case]
    places = StepPlan(routes).places(pp + head)
    schedule = schedule_from_routes(pp, places, replicas=dp, head=head)
    simulate(schedule, CostModel.uniform(pp + head))  # no deadlock
    loss, grads = runtime_results(dp, pp, head)[case]
    ref_loss, ref_grads = single_process(pp, routes, subnets)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    # what no route visits and a skipped block get no gradient, in both
    layers = even_partition(CFG.n_layers, pp)
    skipped = {layer for layer, subnet in subnets.items() if subnet.skip}
    stages = [place % (pp + head) for p in places for place in p]
    visited = {layer for s in stages if s < pp for layer in layers[s]} - skipped
    names = {n for n, _ in Llama(CFG).named_parameters()}
    unvisited = {
        n for n in names if n.split(".")[0] == "layers" and int(n.split(".")[1]) not in visited
    }
    assert set(grads) == set(ref_grads) == names - unvisited
    for name, g in ref_grads.items():
        err = float((grads[name] - g).norm() / g.norm())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_network_emulation_changes_timing_not_results():
    """Across replicas under the geo profile (links of 3 to 130 ms): losses and gradients
    bitwise equal to the run without delays."""
    emulated = run_ranks(pipelined, 4, 2, 2, False, CASES[(2, 2, False)], "geo")[0]
    for case, (loss, grads) in runtime_results(2, 2, False).items():
        assert emulated[case][0] == loss
        assert all(torch.equal(emulated[case][1][n], g) for n, g in grads.items())


def test_a_route_that_skips_the_first_or_last_stage_or_starts_on_another_replica_is_refused():
    with pytest.raises(ValueError, match="microbatch 1 visits \\[0, 2\\]"):
        schedule_from_routes(4, [[0, 1, 2, 3], [0, 2]])
    plan = StepPlan([[[(0, s) for s in range(4)]], [[(0, 0), (1, 1), (1, 2), (1, 3)]]])
    with pytest.raises(ValueError, match="microbatch 0 of replica 1 starts at \\(0, 0\\)"):
        plan.places(4)
    with pytest.raises(ValueError, match="visits \\(2, 1\\): there are 2 replica"):
        StepPlan([[[(0, 0), (2, 1), (0, 3)]], [[(1, 0), (1, 3)]]]).places(4)


def test_schedules_from_routes_keep_the_in_flight_limit_and_pair_order():
    """Routes across two replicas with swaps: at every limit the routes allow, no node holds
    more microbatches than the limit (simulated), every pair of nodes receives in the order it
    sends (check), and a limit the routes cannot meet is refused naming a node."""
    routes = StepPlan(CASES[(2, 4, False)]["across-mixed"][0]).places(4)
    routes = routes + [[0, 2, 1, 3], [0, 1, 2, 7], [4, 6, 5, 3]]
    for limit in (1, 2, 3):
        schedule = schedule_from_routes(4, routes, replicas=2, in_flight=limit)
        result = simulate(schedule, CostModel.uniform(4))
        assert max(result.peak_activations) <= limit
    bad = schedule_from_routes(4, routes, replicas=2)
    bad.actions[3] = bad.actions[3][::-1]
    with pytest.raises(ValueError, match="node"):
        bad.check()


def test_plan_flops_count_what_the_routes_and_subnets_run():
    """The full plan runs flops_per_token x tokens, at tp=1 and tp=2; a route that skips a stage
    saves that stage's blocks, a skipped block all of it, a subnet its share of the block."""
    cfg, seq, tokens, layers = CFG, SEQ_LEN, 2 * SEQ_LEN, even_partition(CFG.n_layers, 4)
    full = StepPlan.full(2, 3, 4)
    expected = 6 * tokens * flops_per_token(cfg, seq)
    for tp in (1, 2):
        assert plan_flops(cfg, seq, layers, full, tokens, tp) == pytest.approx(expected)
    block = 3 * tokens * block_flops(cfg, seq)
    partial = StepPlan([[[(0, 0), (0, 2), (0, 3)]] + full.routes[0][1:], full.routes[1]])
    assert plan_flops(cfg, seq, layers, partial, tokens) == pytest.approx(expected - block)
    skipped = StepPlan(full.routes, {2: Subnet(skip=True)})
    assert plan_flops(cfg, seq, layers, skipped, tokens) == pytest.approx(expected - 6 * block)
    half = Subnet(torch.arange(cfg.n_heads // 2), torch.arange(cfg.ffn_dim // 2))
    halved = StepPlan(full.routes, {1: half})
    saved = 6 * 3 * tokens * (block_flops(cfg, seq) - block_flops(cfg, seq, half))
    assert plan_flops(cfg, seq, layers, halved, tokens) == pytest.approx(expected - saved)
    assert block_flops(cfg, seq, half) < block_flops(cfg, seq)
