"""GaLore / GaLore+ against their references: the galore-torch package, dense Adam, the exact
SVD, and the single-process run of the same model for every parallel layout."""

import copy
import dataclasses
import functools
import io
import math
import warnings

import pytest
import torch
import torch.distributed as dist

from skipjack.config import GaLoreConfig, OptimConfig
from skipjack.models.llama import Llama
from skipjack.optim.builder import build_optimizer, planned_state_bytes, state_bytes
from skipjack.optim.galore import GaLoreAdamW, randomized_subspace, top_subspace
from skipjack.optim.galore_plus import GaLorePlusAdamW, sampled_heads
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.shard_spec import HeadLayout, ShardSpec, set_spec
from skipjack.testing import run_ranks
from skipjack.testing.reference import (
    assert_same_history,
    checkpointed_run,
    tiny_config,
    train_reference,
)

with warnings.catch_warnings():  # galore-torch imports bitsandbytes, which talks on import
    warnings.simplefilter("ignore")
    from galore_torch import GaLoreAdamW as ReferenceGaLore


def _run(optimizer, param, grads):
    for g in grads:
        param.grad = g.clone()
        optimizer.step()
    return param.detach().clone()


def _grads(shape, steps=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


def _reference(params, proj_type, options):
    group = {"params": params, "proj_type": proj_type, **options}
    return ReferenceGaLore([group], lr=1e-2, eps=1e-12, no_deprecation_warning=True)


SHAPES = [(32, 16), (16, 32), (24, 24), (8, 20)]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
@pytest.mark.parametrize("rank", [4, 32], ids=["rank4", "rank>=min"])
def test_equals_galore_torch_step_for_step(proj_type, shape, rank):
    """Same seed, same gradients, refreshes at steps 0, 3, 6. eps is tiny because the two place
    it differently (torch's AdamW vs the Hugging Face formula the reference copies)."""
    w0, grads = torch.randn(*shape, generator=torch.Generator().manual_seed(1)), _grads(shape)
    options = {"rank": rank, "update_proj_gap": 3, "scale": 0.25}
    ours = torch.nn.Parameter(w0.clone())
    optimizer = GaLoreAdamW(
        [{"params": [ours], "proj_type": proj_type, **options}], 1e-2, eps=1e-12
    )
    got = _run(optimizer, ours, grads)
    ref_type = proj_type
    if proj_type == "reverse_std" and shape[0] < shape[1] and rank >= shape[0]:
        # the reference's known shape bug: project_back tests the low-rank shape, picks the
        # wrong product and fails; reverse_std on a wide matrix means "right"
        broken = torch.nn.Parameter(w0.clone())
        with pytest.raises(RuntimeError):
            _run(_reference([broken], proj_type, options), broken, grads)
        ref_type = "right"
    theirs = torch.nn.Parameter(w0.clone())
    want = _run(_reference([theirs], ref_type, options), theirs, grads)
    assert float((got - want).norm() / (want - w0).norm()) < 2e-5


def _galore(param, **options):
    group = {"params": [param], "rank": 4, "update_proj_gap": 3, **options}
    plus = {"heads", "cross_head", "density", "residual_warmup"} & options.keys()
    kind = GaLorePlusAdamW if plus else GaLoreAdamW
    return kind([group], lr=1e-2, weight_decay=0.1)


def test_state_dict_holds_tensors_and_resumes_bitwise():
    grads = _grads((24, 16), steps=10)
    w0 = torch.randn(24, 16)
    straight = torch.nn.Parameter(w0.clone())
    options = dict(svd="rsi", moments="rotate", density=0.1, residual_warmup=2, update_proj_gap=4)
    want = _run(_galore(straight, **options), straight, grads)

    first = torch.nn.Parameter(w0.clone())
    optimizer = _galore(first, **options)
    _run(optimizer, first, grads[:5])
    saved = optimizer.state_dict()
    assert all(isinstance(v, torch.Tensor) for s in saved["state"].values() for v in s.values())
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    second = torch.nn.Parameter(first.detach().clone())
    resumed = _galore(second, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # no pickled objects
    assert torch.equal(_run(resumed, second, grads[5:]), want)


def test_loading_keeps_every_state_dtype_for_bf16_weights():
    """torch's loader casts state to the parameter's dtype: bf16 step counters stop counting at
    256 and bf16 residual indices lose entries. Ours keeps what was saved."""
    p = torch.nn.Parameter(torch.randn(16, 12, dtype=torch.bfloat16))
    optimizer = _galore(p, density=0.1)
    _run(optimizer, p, [g.bfloat16() for g in _grads((16, 12), steps=2)])
    saved = copy.deepcopy(optimizer.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    resumed = _galore(q, density=0.1)
    resumed.load_state_dict(saved)
    for key, value in optimizer.state[p].items():
        assert resumed.state[q][key].dtype == value.dtype, key
        assert torch.equal(resumed.state[q][key], value), key
    assert resumed.state[q]["residual_index"].dtype == torch.int64
    assert resumed.state[q]["moment_step"].dtype == torch.float32


def test_a_sharded_weight_needs_its_process_group():
    spec = ShardSpec((32, 24), dim=0, num_shards=2, index=0)
    p = set_spec(torch.nn.Parameter(torch.zeros(16, 24)), spec)
    with pytest.raises(ValueError, match="groups=dims.groups"):
        GaLoreAdamW([{"params": [p], "rank": 4}])


def test_plain_groups_are_adamw_and_decay_is_decoupled():
    grads, w0 = _grads((6, 5)), torch.randn(6, 5)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    got = _run(GaLoreAdamW([ours], lr=1e-2, weight_decay=0.1), ours, grads)
    want = _run(torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1), theirs, grads)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # a zero gradient moves a GaLore matrix by its decay only
    p = torch.nn.Parameter(w0.clone())
    _run(_galore(p), p, [torch.zeros(6, 5)] * 3)
    torch.testing.assert_close(p.detach(), w0 * (1 - 1e-2 * 0.1) ** 3)


@pytest.mark.parametrize("rebuild", [False, True], ids=["fixed", "rebuilt"])
@pytest.mark.parametrize("rank", [0, 10], ids=["no-low-rank-part", "full-rank"])
def test_sparse_residual_with_full_density_is_dense_adam(rank, rebuild):
    """Every entry corrected: Adam's moments of the whole gradient, through basis changes (the
    refresh every 3 steps moves the low-rank moment's value into the residual moment; a rebuilt
    set keeps every entry and its moments)."""
    grads, w0 = _grads((12, 10)), torch.randn(12, 10)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    options = dict(rank=rank, density=1.0, residual_warmup=0, scale=1.0)
    options.update(residual_rebuild=rebuild)
    got = _run(_galore(ours, **options), ours, grads)
    want = _run(torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1), theirs, grads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_density_zero_is_galore():
    grads, w0 = _grads((16, 12)), torch.randn(16, 12)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    got = _run(_galore(ours, density=0.0, residual_warmup=2), ours, grads)
    assert torch.equal(got, _run(_galore(theirs), theirs, grads))


def _low_rank_gradients(shape, steps, seed=0):
    """A slowly turning rank-3 signal plus noise: what GaLore's projection mostly, not wholly,
    captures."""
    gen = torch.Generator().manual_seed(seed)
    left, right = torch.randn(shape[0], 3, generator=gen), torch.randn(3, shape[1], generator=gen)
    return [
        (left + 0.05 * t * torch.randn(shape[0], 3, generator=gen)) @ right
        + 0.3 * torch.randn(*shape, generator=gen)
        for t in range(steps)
    ]


def test_residual_entries_are_the_largest_accumulated_misses_and_stay_fixed():
    """Density 1/4 keeps every entry a candidate (4k), so the set is exactly the top-k of the
    residual magnitude summed over steps 0..warm-up, and it does not move after."""
    p = torch.nn.Parameter(torch.zeros(16, 12))
    optimizer = _galore(p, density=0.25, residual_warmup=3, update_proj_gap=100)
    grads = _low_rank_gradients((16, 12), steps=8)
    _run(optimizer, p, grads[:4])
    state = optimizer.state[p]
    basis = state["projector"]  # 12 x 4: a tall matrix projects its columns
    missed = sum((g - g @ basis @ basis.T).abs() for g in grads[:4]).flatten()
    k = math.ceil(0.25 * p.numel())
    assert torch.equal(state["residual_index"], missed.topk(k).indices.sort().values)
    chosen = state["residual_index"].clone()
    _run(optimizer, p, grads[4:])
    assert torch.equal(state["residual_index"], chosen)


def test_rebuilt_residual_set_follows_each_refresh_and_keeps_what_stays():
    """With residual_rebuild, the set is chosen again from the residual magnitude summed over
    the warm-up steps after each refresh (under the new basis); an entry that stays keeps its
    moments and step count, a new one starts from the low-rank moments (reset at the refresh
    here, so the two counts differ)."""
    gap, warmup, shape = 6, 2, (16, 12)
    p = torch.nn.Parameter(torch.zeros(shape))
    options = dict(density=0.25, residual_warmup=warmup, update_proj_gap=gap, moments="reset")
    optimizer = _galore(p, residual_rebuild=True, **options)
    grads = _low_rank_gradients(shape, steps=gap + warmup + 1, seed=3)
    _run(optimizer, p, grads[: gap + warmup])  # the first set, used up to the new one's step
    state = optimizer.state[p]
    before = {
        key: state[key].clone() for key in ("residual_index", "residual_avg", "residual_step")
    }
    assert torch.all(before["residual_step"] == gap + warmup)  # 2 seeded at step 2, 6 steps
    _run(optimizer, p, grads[gap + warmup :])  # step 8 = gap + warm-up: the set is re-chosen
    basis = state["projector"]  # chosen at step 6 from grads[6]
    missed = sum((g - g @ basis @ basis.T).abs() for g in grads[gap:]).flatten()
    k = math.ceil(0.25 * p.numel())
    index = state["residual_index"]
    assert torch.equal(index, missed.topk(k).indices.sort().values)
    stays = torch.isin(index, before["residual_index"])
    assert 0 < int(stays.sum()) < k
    old_at = torch.isin(before["residual_index"], index)
    assert torch.all(state["residual_step"][stays] == before["residual_step"][old_at] + 1)
    assert torch.all(state["residual_step"][~stays] == warmup + 1)  # low-rank steps 6, 7 + this
    avg = before["residual_avg"][old_at] * 0.9 + 0.1 * grads[-1].flatten()[index[stays]]
    torch.testing.assert_close(state["residual_avg"][stays], avg)


def test_corrected_moments_are_closer_to_adam_than_galore_on_the_entries():
    """On a fixed gradient sequence: Adam's bias-corrected moments on the chosen entries, against
    what GaLore holds there (its first moment projected back; its second moment through the
    basis's squared weights) and what GaLore+ holds (the entries' own moments, started from
    GaLore's when the set was fixed)."""
    shape, steps, (beta1, beta2) = (24, 16), 30, (0.9, 0.999)
    grads = _low_rank_gradients(shape, steps)
    p = torch.nn.Parameter(torch.zeros(shape))
    optimizer = _galore(p, rank=3, density=0.1, residual_warmup=4, update_proj_gap=10)
    _run(optimizer, p, grads)
    state = optimizer.state[p]
    m = sum((1 - beta1) * beta1 ** (steps - 1 - t) * g for t, g in enumerate(grads))
    v = sum((1 - beta2) * beta2 ** (steps - 1 - t) * g * g for t, g in enumerate(grads))
    m, v = m / (1 - beta1**steps), v / (1 - beta2**steps)
    basis, moment_step = state["projector"], int(state["moment_step"])  # right: 16 x 3
    galore_m = state["exp_avg"] @ basis.T / (1 - beta1**moment_step)
    galore_v = state["exp_avg_sq"] @ (basis * basis).T / (1 - beta2**moment_step)
    index, age = state["residual_index"], state["residual_step"]
    assert torch.all(age == steps)  # started at step 4 from the low-rank moments of steps 0-3
    ours_m = state["residual_avg"] / (1 - beta1**age)
    ours_v = state["residual_avg_sq"] / (1 - beta2**age)
    for adam, galore, ours in ((m, galore_m, ours_m), (v, galore_v, ours_v)):
        adam = adam.flatten()[index]
        galore_error = (galore.flatten()[index] - adam).norm() / adam.norm()
        ours_error = (ours - adam).norm() / adam.norm()
        assert ours_error < 0.5 * galore_error, (float(ours_error), float(galore_error))


def test_nonfinite_gradient_or_failed_svd_keeps_the_basis_and_warns_once(monkeypatch):
    p = torch.nn.Parameter(torch.randn(16, 8))
    optimizer = _galore(p, update_proj_gap=1)
    _run(optimizer, p, _grads((16, 8), steps=1))
    basis = optimizer.state[p]["projector"].clone()
    bad = torch.randn(16, 8)
    bad[3, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="keeping the previous projection basis") as caught:
        optimizer._refresh(p, bad, optimizer.param_groups[0], optimizer.state[p], 1)
        assert torch.equal(optimizer.state[p]["projector"], basis)

        def failing_svd(*args, **kwargs):
            raise torch.linalg.LinAlgError("did not converge")

        monkeypatch.setattr(torch.linalg, "svd", failing_svd)
        _run(optimizer, p, _grads((16, 8), steps=2))
    assert len(caught) == 1
    assert torch.equal(optimizer.state[p]["projector"], basis)
    assert torch.isfinite(p).all()


def test_moments_on_a_basis_change_keep_reset_or_rotate():
    """A new basis that is the old one with its directions permuted and negated: rotation must
    carry the moments along exactly (the same full-space momentum), reset zeroes them."""
    grads = _grads((10, 20), steps=3)
    for policy in ("keep", "reset", "rotate"):
        p = torch.nn.Parameter(torch.zeros(10, 20))
        optimizer = _galore(p, moments=policy, update_proj_gap=100)
        _run(optimizer, p, grads)
        state, group = optimizer.state[p], optimizer.param_groups[0]
        old = state["projector"].clone()  # 10 x 4: a wide matrix projects its rows
        m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        new = -old[:, [2, 0, 3, 1]]
        optimizer._change_basis(state, new, group, optimizer._projections[p], first=False)
        if policy == "keep":
            assert torch.equal(state["exp_avg"], m)
        elif policy == "reset":
            assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
            assert int(state["moment_step"]) == 0
        else:
            torch.testing.assert_close(new @ state["exp_avg"], old @ m)
            torch.testing.assert_close(state["exp_avg_sq"], v[[2, 0, 3, 1]])


def _principal_sines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(b - a @ (a.T @ b))  # sines of the principal angles


def test_randomized_subspace_iteration_recovers_the_top_subspace():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 120, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(200, 120, generator=gen)).Q
    a = u @ torch.diag(0.8 ** torch.arange(120.0)) @ v.T  # decaying spectrum
    exact = top_subspace(a, 16, "left")
    for power_iters, bound in ((0, 0.2), (1, 1e-2), (2, 1e-4)):
        got = randomized_subspace(a, 16, 8, power_iters, torch.Generator().manual_seed(1))
        torch.testing.assert_close(got.T @ got, torch.eye(16), atol=1e-5, rtol=0)
        assert float(_principal_sines(exact, got).max()) < bound
    right = top_subspace(a, 16, "right", "rsi", 8, 2, torch.Generator().manual_seed(1))
    assert float(_principal_sines(top_subspace(a, 16, "right"), right).max()) < 1e-4
    # failure modes: rank beyond the matrix, a rank-deficient matrix, a zero matrix
    assert randomized_subspace(torch.randn(6, 4), 10, 8, 2).shape == (6, 4)
    low = torch.randn(40, 3) @ torch.randn(3, 30)
    q = randomized_subspace(low, 8, 4, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(8), atol=1e-5, rtol=0)
    assert float(_principal_sines(q, top_subspace(low, 3, "left")).max()) < 1e-4
    assert torch.isfinite(randomized_subspace(torch.zeros(20, 10), 4, 2, 2)).all()
    # a spectrum over 12 decades: the sketch is too ill-conditioned for Cholesky QR in places
    steep = u[:, :40] @ torch.diag(10 ** -torch.linspace(0, 12, 40)) @ v[:, :40].T
    q = randomized_subspace(steep, 8, 8, 2, torch.Generator().manual_seed(2))
    torch.testing.assert_close(q.T @ q, torch.eye(8), atol=1e-5, rtol=0)
    assert float(_principal_sines(q, top_subspace(steep, 8, "left")).max()) < 1e-3


@pytest.mark.parametrize("heads_dim", [0, 1], ids=["query", "output"])
def test_head_side_basis_comes_from_the_drawn_head_and_projects_every_head(heads_dim):
    """4 heads of 8: a query weight (32 x 24, heads along the rows) or an output weight (24 x 32,
    along the columns). Rank 8 gives each head 2 coordinates in one 8 x 2 basis, the top
    subspace of the drawn head's block; the other heads' gradients do not change it; every
    head's update lies in that basis; the state is no larger than GaLore's at rank 8."""
    shape = (32, 24) if heads_dim == 0 else (24, 32)
    spec = ShardSpec(shape, heads=HeadLayout(heads_dim, 4, 8))
    p = set_spec(torch.nn.Parameter(torch.zeros(shape)), spec)
    options = dict(rank=8, heads=1, cross_head="head", svd="exact", update_proj_gap=100, scale=1.0)
    optimizer = _galore(p, **options)
    grad = torch.randn(shape)
    _run(optimizer, p, [grad])
    (drawn,) = sampled_heads(4, 1, optimizer._generator(p, 0)).tolist()

    def per_head(a):  # 8 (head_dim) x 4 (heads) x 24
        return a.unflatten(heads_dim, (4, 8)).movedim(heads_dim + 1, 0).movedim(heads_dim + 1, 1)

    blocks = per_head(grad)
    basis = optimizer.state[p]["projector"]
    assert basis.shape == (8, 2)
    expected = top_subspace(blocks[:, drawn].reshape(8, -1), 2, "left")
    assert float(_principal_sines(expected, basis).max()) < 1e-5
    moved = per_head(-p.detach() / 1e-2)
    for head in range(4):  # the update of every head lies in the span of the basis
        block = moved[:, head].reshape(8, -1)
        torch.testing.assert_close(basis @ (basis.T @ block), block, rtol=1e-4, atol=1e-5)
    other = torch.randn(shape).unflatten(heads_dim, (4, 8))
    other.select(heads_dim, drawn).copy_(grad.unflatten(heads_dim, (4, 8)).select(heads_dim, drawn))
    q = set_spec(torch.nn.Parameter(torch.zeros(shape)), spec)
    fresh = _galore(q, **options)
    fresh._names[q] = optimizer._names[p]
    _run(fresh, q, [other.flatten(heads_dim, heads_dim + 1)])
    assert torch.equal(fresh.state[q]["projector"], basis)
    plain = set_spec(torch.nn.Parameter(torch.zeros(shape)), spec)
    assert optimizer.planned_state_bytes() <= _galore(plain, rank=8).planned_state_bytes()


def test_model_side_basis_is_estimated_from_enough_heads_to_truncate():
    """cross_head=model: one basis along the model dimension for the whole matrix, from drawn
    heads holding rank + oversample rows (here 3 heads of 4 rows for rank 6 + 4), then cut to
    rank 6."""
    heads = HeadLayout(0, 8, 4)
    p = set_spec(torch.nn.Parameter(torch.zeros(32, 24)), ShardSpec((32, 24), heads=heads))
    optimizer = _galore(p, rank=6, heads=1, cross_head="model", oversample=4, svd="exact")
    grad = torch.randn(32, 24)
    _run(optimizer, p, [grad])
    chosen = sampled_heads(8, 3, optimizer._generator(p, 0))
    basis = optimizer.state[p]["projector"]
    assert basis.shape == (24, 6)
    rows = torch.cat([torch.arange(h * 4, h * 4 + 4) for h in chosen.tolist()])
    assert float(_principal_sines(top_subspace(grad[rows], 6, "right"), basis).max()) < 1e-5


def _attention_bases(tp: int) -> dict[str, torch.Tensor]:
    """One GaLore+ step (cross-head, RSI) of the tiny model at tp ranks; every attention basis."""
    dims = ParallelDims(dp=1, pp=1, tp=tp, rank=dist.get_rank()).build_groups()
    cfg = tiny_config()
    model = Llama(cfg, tp=dims.tensor_parallel()).init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    (model(tokens).float().pow(2).sum() * 1e-3).backward()  # each rank: its vocabulary shard
    optim = OptimConfig(name="galore_plus", galore=GaLoreConfig(rank=8, svd="rsi", heads=1))
    optimizer = build_optimizer(model, optim, torch.device("cpu"), cfg, dims.groups)
    optimizer.step()
    return {
        n: optimizer.state[p]["projector"]
        for n, p in model.named_parameters()
        if ".attention." in n
    }


def test_cross_head_basis_is_shared_by_every_head_on_every_tp_rank():
    """Each tp=2 rank holds half the heads; both hold the same model-side basis for a layer,
    the basis the single process computes from the same drawn heads."""
    (whole,) = run_ranks(_attention_bases, 1, 1)
    first, second = run_ranks(_attention_bases, 2, 2)
    assert whole.keys() == first.keys() and len(whole) == 8
    for name, basis in whole.items():
        assert torch.equal(first[name], second[name]), name
        assert basis.shape == (64, 8), name  # the model dimension: across every head
        assert float(_principal_sines(basis, first[name]).max()) < 1e-3, name


def test_memory_report_matches_the_state_and_the_formula():
    model = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), torch.nn.LayerNorm(48))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = GaLoreAdamW(
        [{"params": [model[0].weight], "rank": 8}, {"params": list(model[1].parameters())}]
    )
    planned = planned_state_bytes(optimizer)
    optimizer.step()
    assert planned == state_bytes(optimizer)
    m, n, r = 32, 48, 8  # the 48 x 32 weight is tall: basis over its 32 columns, moments 48 x 8
    matrix = 4 * (m * r + 2 * n * r) + 2 * 4  # + two step counters
    assert planned == matrix + 2 * (2 * 48 * 4 + 4)
    adamw = build_optimizer(model, OptimConfig(), torch.device("cpu"), tiny_config())
    assert planned_state_bytes(adamw) == sum(2 * p.numel() * 4 + 4 for p in model.parameters())


def test_builder_gives_low_rank_to_attention_and_mlp_only():
    cfg = tiny_config()
    model = Llama(cfg)
    opt = build_optimizer(model, OptimConfig(name="galore"), torch.device("cpu"), cfg)
    low = {opt._names[p] for p in opt._projections}
    assert low == {
        n for n, _ in model.named_parameters() if ".attention." in n or ".feed_forward." in n
    }
    assert opt.param_groups[0]["rank"] == cfg.dim // 4 and opt.param_groups[0]["scale"] == 0.25


# --- the trainer, in every layout --------------------------------------------------------------

STEPS = 5
OPTIMS = {
    "galore": OptimConfig(
        name="galore", lr=1e-3, warmup_steps=2, galore=GaLoreConfig(rank=8, update_proj_gap=2)
    ),
    "galore_plus-residuals": OptimConfig(
        name="galore_plus",
        lr=1e-3,
        warmup_steps=2,
        galore=GaLoreConfig(
            rank=8,
            update_proj_gap=2,
            proj_type="reverse_std",
            moments="rotate",
            density=0.05,
            residual_warmup=1,
            residual_rebuild=True,  # re-chosen after each refresh: at steps 1, 3
        ),
    ),
    "galore_plus-cross_head-rsi": OptimConfig(
        name="galore_plus",
        lr=1e-3,
        warmup_steps=2,
        galore=GaLoreConfig(rank=8, update_proj_gap=2, svd="rsi", heads=1),
    ),
}


@functools.cache
def single(optim: str, micro: int = 4):
    return _train(1, optim, micro)[0]


def _train(world: int, optim: str, micro: int, tp: int = 1, pp: int = 1) -> list:
    args = (tiny_config(), STEPS, 8, micro, 32, 0, tp, False, pp, "1f1b", 1, "none")
    return run_ranks(train_reference, world, *args, OPTIMS[optim])


@pytest.mark.parametrize(
    "optim,tp,pp",
    [
        ("galore", 2, 1),
        ("galore", 1, 2),
        ("galore", 1, 1),
        ("galore_plus-residuals", 2, 1),
        ("galore_plus-cross_head-rsi", 2, 1),
        ("galore_plus-cross_head-rsi", 1, 1),
    ],
    ids=[
        "galore-tp2",
        "galore-pp2",
        "galore-dp2",
        "residuals-tp2",
        "cross_head-tp2",
        "cross_head-dp2",
    ],
)
def test_layouts_match_the_single_process(optim, tp, pp):
    """Two ranks as tp, pp or dp: losses and gradients of every step equal the single process,
    so every update in between was the single process's."""
    micro = 4 // (2 // (tp * pp))
    for history in _train(2, optim, micro, tp, pp):
        assert_same_history(single(optim), history)


def test_gradient_accumulation_applies_one_update_per_step():
    """4 micro-batches of 2 accumulated equal one micro-batch of 8: same losses, same grads."""
    assert_same_history(single("galore_plus-residuals", 8), single("galore_plus-residuals", 2))


# --- through checkpoints --------------------------------------------------------------------------

# the residuals setting (reverse_std puts the bases of some tp=2 shards along their sharded side)
# with head-side cross-head projection (per-head moments sharded with the heads), refreshing at
# steps 1, 4 and 7 around a save at step 4
_RESIDUALS = OPTIMS["galore_plus-residuals"]
CHECKPOINTED = dataclasses.replace(
    _RESIDUALS,
    galore=dataclasses.replace(_RESIDUALS.galore, update_proj_gap=3, heads=1, cross_head="head"),
)


def _checkpointed(world, tp, pp, directory, interval, resume, until=8):
    args = (tiny_config(), 8, directory, interval, resume, tp, pp, "none", 8, 2, 32, until)
    return run_ranks(checkpointed_run, world, *args, CHECKPOINTED)[0]


@pytest.fixture(scope="module")
def galore_tp2_run(tmp_path_factory):
    """tp=2 with GaLore+ for 8 steps, saving at step 4: its losses and checkpoint root."""
    root = tmp_path_factory.mktemp("galore")
    return _checkpointed(2, 2, 1, str(root / "ckpt"), 4, "none"), root / "ckpt"


def test_resume_through_a_checkpoint_is_bitwise(galore_tp2_run, tmp_path):
    """Bases, low-rank and residual moments and residual entries all come back: steps 5-8 after
    a resume (including the refresh at step 7) equal the straight run bit for bit."""
    straight, root = galore_tp2_run
    resumed = _checkpointed(2, 2, 1, str(tmp_path), 0, str(root / "step-0000004"))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == straight[s] for s in resumed), (straight, resumed)


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 1, 2)], ids=["tp1", "pp2"])
def test_reshard_the_optimizer_state_to_another_layout(galore_tp2_run, tmp_path, world, tp, pp):
    """Saved at tp=2 (bases sharded on some weights, moments on others), resumed whole or
    per stage: the same losses as the tp=2 run within rounding."""
    straight, root = galore_tp2_run
    resumed = _checkpointed(world, tp, pp, str(tmp_path), 0, str(root / "step-0000004"))
    for step, loss in resumed.items():
        assert abs(loss - straight[step]) <= 1e-5 * abs(straight[step]), (step, straight, resumed)
