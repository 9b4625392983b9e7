"""GaLore AdamW (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", ICML 2024).

For each weight matrix in a low-rank group, Adam's two moments live in a rank-r subspace of the
gradient: the gradient G is projected onto r orthonormal directions (P^T G, or G Q), Adam runs
there, and the normalised step is projected back and scaled by alpha. The weight stays full rank.
The basis is refreshed every `update_proj_gap` steps from the current gradient, by exact SVD or by
randomized subspace iteration.

What differs from the `galore-torch` reference (tests/optim checks the rest step for step):
- the state is tensors only (`projector`, `exp_avg`, `exp_avg_sq`, `step`, `moment_step`), so
  `state_dict()` round-trips exactly and DCP checkpoints store and reshard it;
- a refresh that meets NaN/Inf or an SVD that fails keeps the previous basis (a seeded random one
  on the very first step) and warns once;
- on a basis change the moments are kept (as the reference does), reset, or rotated into the new
  basis (`moments`);
- `reverse_std` on a wide matrix with rank >= its height no longer picks the wrong product;
- weight decay is AdamW's (decoupled, applied to the weight before the update) and Adam's epsilon
  is torch's (added to the bias-corrected root), so groups without `rank` are exactly AdamW.
One update per `step()` call: with gradient accumulation the trainer calls it once per optimizer
step, after all micro-batches.

Distributed (docs/optimizers.md): gradients are synchronised over data-parallel replicas before
the step, and any randomness is seeded by (parameter name, step), so every replica computes the
same basis. For a tensor-parallel shard the basis is the one of the whole matrix: the gradient is
gathered over the shard group at a refresh, the group's first rank computes the basis and
broadcasts it. If the projected side is the unsharded one, every rank holds the whole basis and
its moments are sharded like the weight; if it is the sharded side, every rank holds its rows of
the basis, the projected gradient is summed over the group and the moments are replicated.
Either way each rank's update is exactly its shard of the single-process update.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from skipjack.config import GALORE_CHOICES, GaLoreConfig
from skipjack.parallel.shard_spec import ShardSpec, all_gather_full, spec_of

# the options of a low-rank parameter group, with their defaults from the config schema
_SCHEMA = GaLoreConfig()
_OPTIONS = ("update_proj_gap", "scale", "proj_type", "moments", "svd", "oversample", "power_iters")
LOW_RANK_DEFAULTS = {key: getattr(_SCHEMA, key) for key in _OPTIONS}


def top_subspace(
    a: torch.Tensor,
    rank: int,
    side: str,
    method: str = "exact",
    oversample: int = 8,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Orthonormal basis of the top-`rank` singular subspace of `a` (m, n): the left one (m, rank)
    or the right one (n, rank), by exact SVD or randomized subspace iteration. With `rsi`, a
    rank covering the shorter side keeps all of a's column (row) space, so a QR gives it; and
    when rank + oversample covers the shorter side the sketch would be the whole matrix, so an
    exact SVD is cheaper. (`exact` always takes the SVD's singular vectors, as galore-torch.)"""
    a = a.float()
    whole = a if side == "left" else a.T
    if method == "rsi" and rank >= min(a.shape):
        return torch.linalg.qr(whole).Q[:, :rank]
    if method == "exact" or rank + oversample >= min(a.shape):
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank] if side == "left" else vh[:rank].T
    return randomized_subspace(whole, rank, oversample, power_iters, generator)


def group_subspace(a: torch.Tensor, rank: int, side: str, group: dict, gen) -> torch.Tensor:
    """`top_subspace` of `a` by the method and sketch sizes of a low-rank parameter group."""
    return top_subspace(a, rank, side, group["svd"], group["oversample"], group["power_iters"], gen)


def randomized_subspace(
    a: torch.Tensor,
    rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-`rank` left singular subspace of `a` (m, n) by randomized subspace iteration (Halko,
    Martinsson & Tropp 2011, alg. 4.4): a Gaussian sketch of rank + `oversample` columns of a's
    range, `power_iters` rounds of a^T then a with a QR after every half-step (so the smaller
    singular directions are not lost to rounding), then the top `rank` directions within the
    sketch: eigenvectors of the small k x k Gram matrix of q^T a, formed in float64 so squaring
    the singular values loses nothing that matters (a third of the cost of an SVD of q^T a)."""
    m, n = a.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator).to(a)
    q = _orthonormal(a @ omega)
    for _ in range(power_iters):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    b = (q.T @ a).double()
    top = torch.linalg.eigh(b @ b.T).eigenvectors[:, k - rank :].flip(-1)  # descending
    return q @ top.to(q.dtype)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns by Cholesky QR in float64, twice (CholeskyQR2: the
    second pass removes what the first lost to y's conditioning); each pass is a k x k Gram
    matrix and a triangular solve, much faster than Householder QR for a tall y. Householder QR
    when y is too ill-conditioned for a Cholesky factor."""
    q = y.double()
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(q.T @ q, upper=True)
        if info.item() != 0:
            return torch.linalg.qr(y).Q
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q.to(y.dtype)


def adam_moments(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """Fold `grad` into Adam's moments (in place) for step `step` (1-based; or a float tensor
    of one count per entry); return the denominator sqrt(v_hat) + eps and 1 / (1 - beta1^step):
    the direction is exp_avg / denominator times that factor, torch's AdamW arithmetic."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if torch.is_tensor(step):  # the corrections in double, as Python's floats are
        step = step.double()
        root, factor = (1 - beta2**step).sqrt().float(), (1 / (1 - beta1**step)).float()
    else:
        root, factor = math.sqrt(1 - beta2**step), 1 / (1 - beta1**step)
    return (exp_avg_sq.sqrt() / root).add_(eps), factor


def adam_direction(grad, exp_avg, exp_avg_sq, step, betas, eps) -> torch.Tensor:
    """Adam's bias-corrected direction m_hat / (sqrt(v_hat) + eps) after folding in `grad`."""
    denom, factor = adam_moments(grad, exp_avg, exp_avg_sq, step, betas, eps)
    return exp_avg.div(denom).mul_(factor)


@dataclass(frozen=True)
class Projection:
    """How one parameter is projected. `side`: left projects the rows (basis m x r, moments
    r x n), right the columns (basis n x r, moments m x r); `rank` is clamped to min(m, n) of the
    global matrix. `spec` is the parameter's shard spec."""

    side: str
    rank: int
    spec: ShardSpec

    @property
    def basis_dim(self) -> int:
        return 0 if self.side == "left" else 1

    @property
    def sharded_basis(self) -> bool:
        """The basis runs along the sharded dimension: each rank holds its rows of it."""
        return self.spec.sharded and self.spec.dim == self.basis_dim

    def basis_shape(self) -> tuple[int, int]:
        """The shape of the whole basis (every rank's rows of it together)."""
        return self.spec.global_shape[self.basis_dim], self.rank

    def moments_shape(self, local: tuple[int, int]) -> tuple[int, int]:
        """The shape of the low-rank moments of a parameter shard of shape `local`."""
        m, n = local
        return (self.rank, n) if self.side == "left" else (m, self.rank)

    def project(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Coordinates of `grad` in this rank's rows of the basis (a partial sum over the shard
        group when the basis is sharded)."""
        return basis.T @ grad if self.side == "left" else grad @ basis

    def back(self, low: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return basis @ low if self.side == "left" else low @ basis.T

    def back_at(self, low, basis, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """`back(low, basis)` at the entries (rows[i], cols[i]) only: k dot products."""
        if self.side == "left":
            return (basis[rows] * low[:, cols].T).sum(1)
        return (low[rows] * basis[cols]).sum(1)

    def rotate(self, moment: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """`moment` with its coordinates mapped by `mix` (r x r: new basis^T old basis)."""
        return mix @ moment if self.side == "left" else moment @ mix.T


def projection_side(proj_type: str, shape: tuple[int, int]) -> str:
    """The side galore-torch projects for `proj_type` on a global matrix of `shape`: std
    keeps the moments on the longer side (right for tall or square), reverse_std the other."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _local_rows(basis: torch.Tensor, proj: Projection) -> torch.Tensor:
    """This rank's rows of a global basis that runs along the sharded dimension (else all)."""
    if not proj.sharded_basis:
        return basis
    size = basis.shape[0] // proj.spec.num_shards
    return basis[proj.spec.index * size : (proj.spec.index + 1) * size]


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with a `rank` key are GaLore groups (options: LOW_RANK_DEFAULTS).

    `names` (parameter -> global name) seeds randomized refreshes by name and step, so replicas
    and layouts agree; `groups` (process groups by name) is needed for tensor-parallel shards.
    """

    low_rank_defaults = LOW_RANK_DEFAULTS

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        names: dict[torch.Tensor, str] | None = None,
        groups: dict[str, dist.ProcessGroup] | None = None,
    ):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self._groups = groups or {}
        everything = [p for g in self.param_groups for p in g["params"]]
        self._names = {p: (names or {}).get(p, f"param{i}") for i, p in enumerate(everything)}
        self._projections: dict[torch.Tensor, Projection] = {}
        for group in self.param_groups:
            if "rank" not in group:
                continue
            for key, value in self.low_rank_defaults.items():
                group.setdefault(key, value)
            for key in GALORE_CHOICES:  # plain strings: a state dict loads with weights_only
                group[key] = str(group[key])
            self._check(group)
            for p in group["params"]:
                self._projections[p] = self._projection(p, group)
        self._warned = False

    def _check(self, group: dict) -> None:
        for key, allowed in GALORE_CHOICES.items():
            if group[key] not in allowed:
                raise ValueError(f"GaLore {key}={group[key]!r}: use one of {', '.join(allowed)}")
        if group["rank"] < 0 or group["update_proj_gap"] < 1:
            raise ValueError("GaLore needs rank >= 0 and update_proj_gap >= 1")

    def _projection(self, p: torch.Tensor, group: dict) -> Projection:
        spec = spec_of(p)
        if spec.sharded and spec.group not in self._groups:
            raise ValueError(
                f"GaLore: {self._names[p]} is sharded over the {spec.group!r} group; pass the "
                "process groups (groups=dims.groups) so the basis is the whole matrix's"
            )
        if len(spec.global_shape) != 2:
            raise ValueError(
                f"GaLore projects matrices; {self._names[p]} has shape {spec.global_shape}"
            )
        side = projection_side(group["proj_type"], spec.global_shape)
        return Projection(side, min(group["rank"], *spec.global_shape), spec)

    def projection_of(self, p: torch.Tensor) -> Projection | None:
        """How `p` is projected (None: a plain AdamW parameter)."""
        return self._projections.get(p)

    # --- state ------------------------------------------------------------------------------

    def _shapes(
        self, p: torch.Tensor, group: dict
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every state tensor of `p` (nothing allocated)."""
        scalar = ((), torch.float32)
        if p not in self._projections:
            return {"step": scalar, "exp_avg": (p.shape, p.dtype), "exp_avg_sq": (p.shape, p.dtype)}
        proj = self._projections[p]
        rows, r = proj.basis_shape()
        if proj.sharded_basis:
            rows //= proj.spec.num_shards
        low, f32 = proj.moments_shape(tuple(p.shape)), torch.float32
        return {
            "step": scalar,
            "moment_step": scalar,
            "projector": ((rows, r), f32),
            "exp_avg": (low, f32),
            "exp_avg_sq": (low, f32),
        }

    def planned_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds once every parameter has stepped: for a
        GaLore matrix 4 * (m*r + 2*n*r) (the basis along the projected side m, two r-sized
        moments) plus two step counters; GaLore+ adds 68 bytes per sparse residual entry."""
        return sum(
            math.prod(shape) * dtype.itemsize
            for group in self.param_groups
            for p in group["params"]
            for shape, dtype in self._shapes(p, group).values()
        )

    def state_shard_dim(self, p: torch.Tensor, key: str) -> int | None:
        """Which dimension of state tensor `key` of `p` is split like the parameter over its
        shard group (None: the same on every rank of it). Checkpoints store it accordingly."""
        spec = spec_of(p)
        if not spec.sharded or p not in self._projections:
            return spec.dim if spec.sharded and key in ("exp_avg", "exp_avg_sq") else None
        proj = self._projections[p]
        if key == "projector":
            return 0 if proj.sharded_basis else None
        if key in ("exp_avg", "exp_avg_sq"):
            return None if proj.sharded_basis else spec.dim
        return None

    def state_dim(self, p: torch.Tensor, key: str, dim: int) -> int | None:
        """Which dimension of state tensor `key` of `p` runs along the parameter's dimension
        `dim` (None: none does, or it mixes that dimension). A projected weight's moments keep
        the side it does not project: rows for the right projection, columns for the left."""
        if key not in ("exp_avg", "exp_avg_sq"):
            return None
        if p not in self._projections:
            return dim
        kept = 0 if self._projections[p].side == "right" else 1
        return dim if dim == kept else None

    def _init_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        for key, (shape, dtype) in self._shapes(p, group).items():
            state[key] = torch.zeros(
                shape, dtype=dtype, device="cpu" if key.endswith("step") else p.device
            )

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps its saved dtype (torch casts all but `step`
        to the parameter's: bf16 step counters, bases and moments, float residual indices) and
        the step counters stay on the CPU."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    device = "cpu" if key.endswith("step") else p.device
                    self.state[p][key] = value.to(device=device, copy=True)

    # --- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, group, state)
                lr, decay = group["lr"], group["weight_decay"]
                if p in self._projections:
                    update = self._low_rank_update(p, group, state)
                    if decay:
                        p.mul_(1 - lr * decay)
                    p.add_(update.to(p.dtype), alpha=-lr)
                    continue
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                denom, factor = adam_moments(
                    p.grad, m, v, int(state["step"]), group["betas"], group["eps"]
                )
                if decay:
                    p.mul_(1 - lr * decay)
                p.addcdiv_(m, denom, value=-lr * factor)
        return loss

    def _low_rank_update(self, p: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        proj, grad = self._projections[p], p.grad.float()
        step = int(state["step"])
        if step % group["update_proj_gap"] == 0:
            self._refresh(p, grad, group, state, step)
        low = self._project(grad, state["projector"], proj)
        state["moment_step"] += 1
        direction = adam_direction(
            low, state["exp_avg"], state["exp_avg_sq"], int(state["moment_step"]),
            group["betas"], group["eps"],
        )  # fmt: skip
        update = proj.back(direction, state["projector"]).mul_(group["scale"])
        update = self._add_residual(p, grad, low, group, state, update)
        state["step"] += 1
        return update

    def _add_residual(self, p, grad, low, group, state, update) -> torch.Tensor:
        """GaLore+ adds its sparse residual update here; GaLore has none."""
        return update

    def _project(self, grad: torch.Tensor, basis: torch.Tensor, proj: Projection) -> torch.Tensor:
        low = proj.project(grad, basis)
        if proj.sharded_basis:  # each rank holds its rows of the basis: a partial sum
            dist.all_reduce(low, group=self._groups[proj.spec.group])
        return low

    # --- refreshing the basis ---------------------------------------------------------------

    def _generator(self, p: torch.Tensor, step: int) -> torch.Generator:
        """Seeded by parameter name and step: the same on every replica and in every layout."""
        return torch.Generator().manual_seed(zlib.crc32(f"{self._names[p]}@{step}".encode()))

    def _estimate(self, full: torch.Tensor, group: dict, proj: Projection, gen) -> torch.Tensor:
        """The new global basis from the whole gradient `full`."""
        return group_subspace(full, proj.rank, proj.side, group, gen)

    def _refresh(self, p, grad, group: dict, state: dict, step: int) -> None:
        proj = self._projections[p]
        spec = proj.spec
        pg = self._groups[spec.group] if spec.sharded else None
        full = all_gather_full(grad, spec, self._groups)
        if pg is None or dist.get_rank(pg) == 0:
            basis = self._checked_estimate(p, full, group, proj, step)
        else:
            basis = torch.empty(proj.basis_shape(), device=grad.device)
        if pg is not None:
            dist.broadcast(basis, src=dist.get_global_rank(pg, 0), group=pg)
        basis = _local_rows(basis, proj)
        if not torch.isfinite(basis).all():  # the estimate failed: keep the basis we have
            self._warn(p, step)
            if step > 0:
                return
            basis = self._random_basis(p, proj, step)
        self._change_basis(state, basis.to(grad.device), group, proj, first=step == 0)

    def _checked_estimate(self, p, full, group, proj, step) -> torch.Tensor:
        """The estimate, or NaNs when the gradient is not finite or the SVD fails."""
        failed = torch.full(proj.basis_shape(), float("nan"), device=full.device)
        if not torch.isfinite(full).all():
            return failed
        try:
            basis = self._estimate(full, group, proj, self._generator(p, step))
        except RuntimeError:  # LinAlgError, out of memory: never leave the group waiting
            return failed
        return basis.contiguous() if torch.isfinite(basis).all() else failed

    def _random_basis(self, p, proj: Projection, step: int) -> torch.Tensor:
        """A seeded random orthonormal basis (the same on every rank), this rank's part of it."""
        gen = self._generator(p, step)
        return _local_rows(torch.linalg.qr(torch.randn(proj.basis_shape(), generator=gen)).Q, proj)

    def _warn(self, p, step: int) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"GaLore: the gradient of {self._names[p]} at step {step} is not finite or its SVD "
                "failed; keeping the previous projection basis (warned once)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _change_basis(self, state: dict, new: torch.Tensor, group: dict, proj, first: bool) -> None:
        """Install `new`; treat the moments as `group['moments']` says (keep, reset, rotate)."""
        old = state["projector"]
        if not first and group["moments"] == "reset":
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["moment_step"].zero_()
        elif not first and group["moments"] == "rotate":
            # coordinates in the old basis -> the new one: R = new^T old (r x r); the second
            # moment is carried with R*R, which keeps it non-negative (exact for permutations)
            rot = new.T @ old
            if proj.sharded_basis:
                dist.all_reduce(rot, group=self._groups[proj.spec.group])
            for key, mix in (("exp_avg", rot), ("exp_avg_sq", rot * rot)):
                state[key].copy_(proj.rotate(state[key], mix))
        old.copy_(new)
