import pytest
import torch
import torch.distributed as dist

from skipjack.config import ParallelConfig, TrainConfig, TrainJobConfig
from skipjack.models.llama import Llama
from skipjack.models.subnet import Subnet
from skipjack.optim.builder import build_optimizer
from skipjack.parallel.data_parallel import GradientSync
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.testing import run_ranks
from skipjack.testing.cli import compose_job
from skipjack.testing.reference import (
    CPU,
    assert_same_history,
    build_run,
    tiny_config,
    train_reference,
)

STEPS = 5


def run(world_size, micro_batch_size):
    return run_ranks(train_reference, world_size, tiny_config(), STEPS, 8, micro_batch_size)


def test_dp2_matches_single_process_in_loss_and_gradients():
    (single,) = run(1, 4)
    replicas = run(2, 2)
    for replica in replicas:
        assert_same_history(single, replica)
    # both replicas hold identical gradients after the all-reduce
    for name, g in replicas[0][0]["grads"].items():
        assert torch.equal(g, replicas[1][0]["grads"][name])


def test_gradient_accumulation_does_not_change_the_math():
    (one_micro,) = run(1, 8)
    (four_micro,) = run(1, 2)
    assert_same_history(one_micro, four_micro)


def _steps_skipping_layer_1(optim_name: str) -> dict:
    """Two optimizer steps of a tiny Llama in the current group (one replica per rank) whose
    forward skips layer 1 on every replica and runs layer 0's attention on rank 0 only; what
    happened to the weights and optimizer state of each."""
    cfg = tiny_config()
    dims = ParallelDims(dp=dist.get_world_size(), rank=dist.get_rank()).build_groups()
    model = Llama(cfg, tp=dims.tensor_parallel()).init_weights(0)
    optim = compose_job(f"optim={optim_name}", "optim.weight_decay=0.1").optim
    optimizer = build_optimizer(torch.nn.ModuleList([model]), optim, CPU, cfg, dims.groups)
    sync = GradientSync(model.parameters(), dims.group("dp"), bucket_mb=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    block = model.layers["0"]
    for _ in range(2):
        h = model.tok_embeddings(tokens)
        if dims.dp_rank == 0:
            h = h + block.attention(block.attention_norm(h), model.rope)
        h = h + block.feed_forward(block.ffn_norm(h))
        model.output(model.norm(h)).float().pow(2).mean().backward()
        sync.all_reduce()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        n: (torch.equal(p, before[n]), bool(optimizer.state.get(p)))
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("optim_name", ["adamw", "galore"])
def test_parameters_no_replica_computed_a_gradient_for_are_left_alone(optim_name):
    """A block no replica ran keeps its weights bitwise and gets no optimizer state (no update,
    no weight decay, no moment decay), at dp=1 as at dp=2; one that only some replicas ran is
    updated on all of them alike."""
    (single,) = run_ranks(_steps_skipping_layer_1, 1, optim_name)
    replicas = run_ranks(_steps_skipping_layer_1, 2, optim_name)
    for outcome in (single, *replicas):
        skipped = {n: v for n, v in outcome.items() if n.startswith("layers.1.")}
        assert skipped and all(v == (True, False) for v in skipped.values()), skipped
        assert outcome["layers.0.attention.wq.weight"] == (False, True)
    attention = {n: v for n, v in single.items() if ".attention." in n and "layers.0" in n}
    assert all(replicas[1][n] == v for n, v in attention.items())


def _steps_with_a_subnet(optim_name: str) -> dict:
    """One full step, then two engine steps of a plan whose block 0 runs head 0 and neurons
    0-31 only, in the current group (one replica per rank): which slices of block 0's weights
    and of their moments moved during the plan's steps."""
    dp = dist.get_world_size()
    job = TrainJobConfig(
        model=tiny_config(),
        parallel=ParallelConfig(bucket_mb=0.05),
        optim=compose_job(
            f"optim={optim_name}", "optim.weight_decay=0.1", "optim.galore.rank=8"
        ).optim,
        train=TrainConfig(steps=4, global_batch_size=8, micro_batch_size=2, seq_len=32),
    )
    _, loader, engine = build_run(job, 0)
    subnet = Subnet(torch.tensor([0]), torch.arange(32))
    plan = StepPlan(StepPlan.full(dp, loader.accumulation_steps, 1).routes, {0: subnet})
    block = engine.model[0].layers["0"]
    wq, w2 = block.attention.wq.weight, block.feed_forward.w2.weight
    head_dim = wq.shape[0] // 4
    engine.step(loader.next())  # every slice gets moments
    # (weight, dimension, first inactive index): rows of wq's other heads, w2's other columns;
    # their moments: Adam's are shaped like the weights, GaLore's keep the side it does not
    # project (wq square: projected on the right, moments (rows, rank); w2 wide: on the left,
    # moments (rank, columns))
    sliced = {"wq": (wq, 0, head_dim), "w2": (w2, 1, 32)}
    keys = ("exp_avg", "exp_avg_sq")
    state = engine.optimizer.state
    before = {n: [t.detach().clone() for t in (p, *(state[p][k] for k in keys))]
              for n, (p, _, _) in sliced.items()}  # fmt: skip
    for _ in range(2):
        engine.step(loader.next(), plan=plan)
    outcome = {}
    for name, (p, dim, start) in sliced.items():
        for tensor, old, what in zip((p, *(state[p][k] for k in keys)), before[name],
                                     ("weight", *keys), strict=True):  # fmt: skip
            off = tensor.narrow(dim, start, tensor.shape[dim] - start)
            outcome[f"{name} {what} off"] = torch.equal(off, old.narrow(dim, start, off.shape[dim]))
            outcome[f"{name} {what} on"] = not torch.equal(
                tensor.narrow(dim, 0, start), old.narrow(dim, 0, start)
            )
    return outcome


@pytest.mark.parametrize("optim_name", ["adamw", "galore"])
def test_slices_a_subnet_leaves_out_keep_their_values_and_moments(optim_name):
    """Rows of inactive heads and columns of inactive neurons keep their values bitwise (no
    update, no weight decay) and their moments stay zero (no moment decay), at dp=1 and dp=2,
    with AdamW and with GaLore (rank 8; its low-rank moments keep the unprojected side)."""
    for outcome in (*run_ranks(_steps_with_a_subnet, 1, optim_name),
                    *run_ranks(_steps_with_a_subnet, 2, optim_name)):  # fmt: skip
        assert all(outcome.values()), outcome
