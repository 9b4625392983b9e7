"""Llama family: RMSNorm, RoPE (theta; Llama-3, linear or YaRN scaling), SwiGLU, grouped-query
attention (kv heads split over tp, or replicated when tp exceeds them).

A model is built per pipeline stage: `Llama(cfg, stage)` allocates only the blocks in
`stage.layers` (keyed by their global index), the embedding on the first stage and the final norm
and output layer on the last. Parameters are created on the meta device and materialised by
`init_weights`, which draws every tensor from a generator seeded by (seed, parameter name). The
values therefore do not depend on which stage, rank or layout builds them: any partition of the
model holds exactly the slices of the single-process model.

Under vocabulary parallelism the stages hold neither embedding nor output layer: `VocabShards`
holds this rank's rows of both, split over all pipeline x tensor ranks of a replica, and
`parallel/pipeline/vocab.py` runs them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from skipjack.config import (
    ConfigError,
    ModelConfig,
    head_dim,
    parameter_shape,
    validate_model,
    validate_tensor_parallel,
)
from skipjack.models.kernels import rms_norm
from skipjack.models.rope import apply_rope, rope_cos_sin
from skipjack.models.subnet import Subnet, complement, head_rows, kv_heads_used
from skipjack.parallel.shard_spec import HeadLayout, ShardSpec, replicated, set_spec, spec_of
from skipjack.parallel.tensor import (
    TensorParallel,
    VocabParallelEmbedding,
    enter_tp,
    leave_tp,
    padded_vocab_size,
)

PRESETS = (
    "tiny",
    "llama_60m",
    "llama_130m",
    "llama_350m",
    "llama_1b",
    "tinyllama_1_1b",
    "llama3_8b",
)


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset (the YAML in configs/model/ is the one source)."""
    if name not in PRESETS:
        raise ConfigError("model", f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    text = resources.files("skipjack.configs.model").joinpath(f"{name}.yaml").read_text()
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(text), overrides)
    cfg = OmegaConf.to_object(merged)
    validate_model(cfg)
    return cfg


@dataclass(frozen=True)
class Stage:
    """Which part of the model one pipeline stage owns."""

    layers: range
    first: bool
    last: bool

    @staticmethod
    def whole(n_layers: int) -> Stage:
        return Stage(range(n_layers), True, True)


class RMSNorm(nn.Module):
    """Replicated over tp; under sequence parallelism each rank sees its sequence shard only, so
    its weight's gradient is partial and summed over tp (ShardSpec.partial_grad)."""

    def __init__(self, dim: int, eps: float, tp: TensorParallel):
        super().__init__()
        self.eps = eps
        self.kernel = "torch"  # or "apex" (models/kernels.py; use_norm_kernel)
        self.weight = nn.Parameter(torch.empty(dim))
        set_spec(self.weight, replicated((dim,), partial_grad=tp.sequence_parallel and tp.size > 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.kernel)


def use_norm_kernel(model: nn.Module, kernel: str) -> None:
    """Run every RMSNorm of `model` with `kernel` (torch | apex)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernel = kernel


def column_parallel(
    in_features: int,
    out_features: int,
    tp: TensorParallel,
    heads: HeadLayout | None = None,
    num_shards: int | None = None,
    true_rows: int | None = None,
) -> nn.Linear:
    """A linear layer holding this rank's rows (output features) of the global weight, split
    into `num_shards` (default: tp) shards; `true_rows` of the `out_features` are real (the
    rest pad a vocabulary)."""
    layer = nn.Linear(in_features, out_features // (num_shards or tp.size), bias=False)
    true_shape = None if true_rows is None else (true_rows, in_features)
    spec = tp.shard_spec((out_features, in_features), 0, heads, num_shards, true_shape)
    set_spec(layer.weight, spec)
    return layer


def row_parallel(
    in_features: int, out_features: int, tp: TensorParallel, heads: HeadLayout | None = None
) -> nn.Linear:
    """A linear layer holding this rank's columns (input features); outputs are partial sums."""
    layer = nn.Linear(in_features // tp.size, out_features, bias=False)
    set_spec(layer.weight, tp.shard_spec((out_features, in_features), 1, heads))
    return layer


def document_causal_mask(documents: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean mask: query i sees key j when j <= i and both tokens belong
    to the same document (`documents`: (batch, seq) ids)."""
    seq = documents.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
    same = documents[:, :, None] == documents[:, None, :]
    return (same & causal)[:, None]


class Attention(nn.Module):
    """Heads split over tp: each rank holds n_heads/tp query and n_kv_heads/tp kv heads. With
    tp > n_kv_heads, rank r holds kv head r // (tp / n_kv_heads), the one its query heads use,
    and the ranks sharing it sum their gradients of it (ShardSpec.replicas)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        hd = self.head_dim = head_dim(cfg)
        kv_shards = min(tp.size, cfg.n_kv_heads)
        self.n_heads, self.n_kv_heads = cfg.n_heads // tp.size, cfg.n_kv_heads // kv_shards
        q_heads, kv_heads = HeadLayout(0, cfg.n_heads, hd), HeadLayout(0, cfg.n_kv_heads, hd)
        self.wq = column_parallel(cfg.dim, cfg.n_heads * hd, tp, q_heads)
        self.wk = column_parallel(cfg.dim, cfg.n_kv_heads * hd, tp, kv_heads, kv_shards)
        self.wv = column_parallel(cfg.dim, cfg.n_kv_heads * hd, tp, kv_heads, kv_shards)
        self.wo = row_parallel(cfg.n_heads * hd, cfg.dim, tp, HeadLayout(1, cfg.n_heads, hd))
        # called in training forwards with (per-head outputs (b, s, heads, hd), the output
        # weight's columns of those heads, the local heads or None): a regime's importance
        self.observer: Callable | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        heads: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """Causal attention; `mask` (batch, 1, seq, seq), where given, says which keys each
        query may see instead (packed documents). `heads`: only these local query heads (and
        the kv heads they use) run, on the slices of the weights they own. `cache`: the keys
        and values of the positions before these (generation); these are added to it."""
        b, s, _ = x.shape
        hd = self.head_dim
        if heads is None:
            wq, wk, wv, wo = (m.weight for m in (self.wq, self.wk, self.wv, self.wo))
            n_q, n_kv, kv_of = self.n_heads, self.n_kv_heads, None
        else:
            heads = heads.to(x.device)
            group = self.n_heads // self.n_kv_heads
            kv_used = kv_heads_used(heads, self.n_heads, self.n_kv_heads)
            kv_of = None
            if len(heads) != len(kv_used) * group:  # a group cut: one kv copy per query head
                kv_of = torch.searchsorted(kv_used, heads // group)
            q_rows, kv_rows = head_rows(heads, hd), head_rows(kv_used, hd)
            wq = self.wq.weight.index_select(0, q_rows)
            wk, wv = (m.weight.index_select(0, kv_rows) for m in (self.wk, self.wv))
            wo = self.wo.weight.index_select(1, q_rows)
            n_q, n_kv = len(heads), len(kv_used)
        q = apply_rope(F.linear(x, wq).view(b, s, n_q, hd), rope)
        k = apply_rope(F.linear(x, wk).view(b, s, n_kv, hd), rope)
        v = F.linear(x, wv).view(b, s, n_kv, hd)
        if kv_of is not None:
            k, v, n_kv = k.index_select(2, kv_of), v.index_select(2, kv_of), n_q
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        causal = mask is None
        if cache is not None:
            k, v = cache.extend(k, v)
            mask, causal = cache.mask(s, x.device), cache.start == 0
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal, enable_gqa=n_kv != n_q
        )
        if self.observer is not None and torch.is_grad_enabled():
            self.observer(out.detach().transpose(1, 2), wo.detach(), heads)
        return F.linear(out.transpose(1, 2).reshape(b, s, -1), wo)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); hidden neurons split over tp."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.w1 = column_parallel(cfg.dim, cfg.ffn_dim, tp)
        self.w3 = column_parallel(cfg.dim, cfg.ffn_dim, tp)
        self.w2 = row_parallel(cfg.ffn_dim, cfg.dim, tp)
        # called in training forwards with (hidden activations (b, s, neurons), the down
        # projection's columns of those neurons, the local neurons or None)
        self.observer: Callable | None = None

    def forward(self, x: torch.Tensor, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """`neurons`: only these local hidden neurons run (rows of w1 and w3, columns of w2)."""
        if neurons is None:
            w1, w3, w2 = self.w1.weight, self.w3.weight, self.w2.weight
        else:
            neurons = neurons.to(x.device)
            w1, w3 = (m.weight.index_select(0, neurons) for m in (self.w1, self.w3))
            w2 = self.w2.weight.index_select(1, neurons)
        hidden = F.silu(F.linear(x, w1)) * F.linear(x, w3)
        if self.observer is not None and torch.is_grad_enabled():
            self.observer(hidden.detach(), w2.detach(), neurons)
        return F.linear(hidden, w2)


FULL = Subnet()  # every head and neuron, unscaled


class KVCache:
    """The keys and values (after RoPE) of every position a generation has run, per layer, so
    that each new token costs one forward of one position: (batch, kv heads, capacity, head
    dim) per layer, filled up to `length`."""

    def __init__(self, model: Llama, batch: int, capacity: int):
        attention = next(iter(model.layers.values())).attention
        weight = attention.wk.weight
        shape = (batch, attention.n_kv_heads, capacity, attention.head_dim)
        self.capacity, self.length = capacity, 0
        self.tensors = {
            int(i): (weight.new_zeros(shape), weight.new_zeros(shape)) for i in model.layers
        }

    def layer(self, index: int) -> LayerCache:
        return LayerCache(*self.tensors[index], self.length)


@dataclass
class LayerCache:
    """One layer's part of a `KVCache`, for a forward that starts at position `start`."""

    keys: torch.Tensor
    values: torch.Tensor
    start: int

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the keys and values of the new positions (batch, kv heads, seq, head dim);
        returns those of every position so far."""
        end = self.start + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"the cache holds {self.keys.shape[2]} positions, not {end}")
        self.keys[:, :, self.start : end] = k
        self.values[:, :, self.start : end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def mask(self, seq: int, device: torch.device) -> torch.Tensor | None:
        """Which cached keys the new queries see: all before them and their own causal part
        (None: all, for one query; the plain causal mask from position 0)."""
        if seq == 1 or self.start == 0:
            return None
        keys = torch.arange(self.start + seq, device=device)
        return keys[None, :] <= self.start + torch.arange(seq, device=device)[:, None]


class Block(nn.Module):
    """Pre-norm block; the residual stream is replicated over tp (sequence-sharded under sp)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, tp)
        self.attention = Attention(cfg, tp)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, tp)
        self.feed_forward = FeedForward(cfg, tp)

    def inactive(self, subnet: Subnet) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
        """(parameter, dim, indices) of every slice of this block's weights that `subnet`
        leaves out: rows of wq for inactive heads, of wk and wv for kv heads no active head
        uses, columns of wo; rows of w1 and w3 and columns of w2 for inactive neurons. (A
        skipped block's parameters get no gradient at all.)"""
        a, ff, slices = self.attention, self.feed_forward, []
        if subnet.heads is not None:
            heads = subnet.heads.to(a.wq.weight.device)
            off = complement(heads, a.n_heads)
            off_kv = complement(kv_heads_used(heads, a.n_heads, a.n_kv_heads), a.n_kv_heads)
            rows, kv_rows = head_rows(off, a.head_dim), head_rows(off_kv, a.head_dim)
            slices += [(a.wq.weight, 0, rows), (a.wo.weight, 1, rows)]
            slices += [(a.wk.weight, 0, kv_rows), (a.wv.weight, 0, kv_rows)]
        if subnet.neurons is not None:
            off = complement(subnet.neurons.to(ff.w1.weight.device), ff.w1.weight.shape[0])
            slices += [(ff.w1.weight, 0, off), (ff.w3.weight, 0, off), (ff.w2.weight, 1, off)]
        return [(p, dim, index) for p, dim, index in slices if len(index)]

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        subnet: Subnet | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """The block on the residual stream `x`; with `subnet`, only its active heads and
        neurons (outputs scaled as it says), or nothing at all when it skips the block; with
        `cache`, after the positions it holds (generation)."""
        tp, sub = self.tp, subnet or FULL
        if sub.skip:
            return x
        normed = enter_tp(self.attention_norm(x), tp)
        attended = self.attention(normed, rope, mask, sub.heads, cache)
        if sub.head_scale != 1.0:
            attended = attended * sub.head_scale
        h = x + leave_tp(attended, tp)
        hidden = self.feed_forward(enter_tp(self.ffn_norm(h), tp), sub.neurons)
        if sub.neuron_scale != 1.0:
            hidden = hidden * sub.neuron_scale
        return h + leave_tp(hidden, tp)


class Llama(nn.Module):
    """One pipeline stage of a Llama model (the whole model when `stage` is omitted).

    forward(tokens) on the first stage, forward(hidden) on the others; the last stage returns
    this rank's vocabulary shard of the logits (all of them without tensor parallelism), the
    others hidden states (sequence shards under sequence parallelism). With `vocab_parallel` the
    embedding and output layer live in `VocabShards` instead: the first stage takes embeddings
    and the last returns its normed hidden states.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        stage: Stage | None = None,
        tp: TensorParallel | None = None,
        vocab_parallel: bool = False,
    ):
        super().__init__()
        validate_model(cfg)
        self.tp = tp = tp or TensorParallel()
        validate_tensor_parallel(cfg, tp.size)
        self.cfg = cfg
        self.stage = stage or Stage.whole(cfg.n_layers)
        if self.stage.layers.stop > cfg.n_layers:
            raise ValueError(f"stage layers {self.stage.layers} exceed n_layers={cfg.n_layers}")
        self.vocab_parallel = vocab_parallel
        if cfg.tie_embeddings and not vocab_parallel and not (self.stage.first and self.stage.last):
            raise ConfigError(
                "model.tie_embeddings", "tied embeddings need the embedding and output on one stage"
            )
        vocab = padded_vocab_size(cfg.vocab_size, tp.size)
        with torch.device("meta"):
            self.tok_embeddings = (
                VocabParallelEmbedding(cfg.vocab_size, cfg.dim, tp)
                if self.stage.first and not vocab_parallel
                else None
            )
            self.layers = nn.ModuleDict({str(i): Block(cfg, tp) for i in self.stage.layers})
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps, tp) if self.stage.last else None
            self.output = (
                column_parallel(cfg.dim, vocab, tp, true_rows=cfg.vocab_size)
                if self.stage.last and not (cfg.tie_embeddings or vocab_parallel)
                else None
            )
        self.register_buffer("rope", torch.empty(0), persistent=False)

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.cfg.tie_embeddings else self.output.weight

    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        subnets: Mapping[int, Subnet | None] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """`inputs`: token ids on the first stage, hidden states on the others; `positions` and
        `documents` (batch, seq) as in `MicroBatch` for packed sequences; `subnets`: per global
        layer index, the part of the block to run (absent or None: all of it); `cache`: the
        keys and values of the positions already run (generation: `inputs` come after them)."""
        h = self.tok_embeddings(inputs) if self.tok_embeddings is not None else inputs
        rope = self.rope if positions is None else self.rope[positions]
        if cache is not None:
            rope = self.rope[cache.length :]
        mask = None if documents is None else document_causal_mask(documents)
        subnets = subnets or {}
        for index, block in self.layers.items():
            subnet = subnets.get(int(index))
            if cache is not None:
                h = block(h, rope, mask, subnet, cache.layer(int(index)))
            elif self.cfg.activation_checkpointing and self.training:
                h = checkpoint(block, h, rope, mask, subnet, use_reentrant=False)
            else:
                h = block(h, rope, mask, subnet)
        if cache is not None:
            cache.length += inputs.shape[1]
        if not self.stage.last:
            return h
        if self.vocab_parallel:
            return self.norm(h)
        return F.linear(enter_tp(self.norm(h), self.tp), self.output_weight())

    def init_weights(self, seed: int, device: torch.device | str = "cpu") -> Llama:
        """Materialise on `device` with the same values in every layout (see initialise)."""
        initialise(self, self.cfg, seed, device)
        self.rope = rope_cos_sin(self.cfg, device)
        return self


class VocabShards(nn.Module):
    """This rank's rows of the input embedding and of the output layer under vocabulary
    parallelism: the padded vocabulary split evenly over the `vocab` group (the pp x tp ranks of a
    replica), rank `index` holding rows [index x rows, (index + 1) x rows). Tied embeddings share
    one tensor, which works here at any pp because both layers are split the same way."""

    def __init__(self, cfg: ModelConfig, index: int, num_shards: int):
        super().__init__()
        self.cfg = cfg
        padded = padded_vocab_size(cfg.vocab_size, num_shards)
        self.rows = padded // num_shards
        self.start = index * self.rows
        true_shape = (cfg.vocab_size, cfg.dim)
        spec = ShardSpec((padded, cfg.dim), 0, "vocab", num_shards, index, true_shape=true_shape)
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(self.rows, cfg.dim)
            self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, self.rows, bias=False)
        for layer in (self.tok_embeddings, self.output):
            if layer is not None:
                set_spec(layer.weight, spec)

    def output_weight(self) -> torch.Tensor:
        return (self.output or self.tok_embeddings).weight

    def init_weights(self, seed: int, device: torch.device | str = "cpu") -> VocabShards:
        initialise(self, self.cfg, seed, device)
        return self


@torch.no_grad()
def initialise(module: nn.Module, cfg: ModelConfig, seed: int, device: torch.device | str) -> None:
    """Materialise `module` on `device`, filling every parameter with its slice of the global
    initial tensor drawn from (seed, its global name): the same values in every layout."""
    specs = {name: spec_of(p) for name, p in module.named_parameters()}
    module.to_empty(device=device)  # new Parameter objects: the specs are attached again
    for name, param in module.named_parameters():
        spec = specs[name]
        param.copy_(spec.shard(initial_value(cfg, name, seed)))  # padded vocabulary rows: zeros
        set_spec(param, spec)


def _init_std(cfg: ModelConfig, name: str) -> float:
    """Normal(0, init_std); residual projections scaled by 1/sqrt(2 n_layers) (GPT-2 style)."""
    if name.endswith(("wo.weight", "w2.weight")):
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


def initial_value(cfg: ModelConfig, name: str, seed: int) -> torch.Tensor:
    """The full (unsharded) initial tensor of parameter `name`, the same in every layout."""
    shape = parameter_shape(cfg, name)
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(shape, generator=gen) * _init_std(cfg, name)


def block_parameters(cfg: ModelConfig) -> int:
    """Parameters of one transformer block (attention, SwiGLU MLP, two norms)."""
    attn = cfg.dim * head_dim(cfg) * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    return attn + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim


def num_parameters(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Parameter count of the whole model (computed, no allocation)."""
    emb = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * block_parameters(cfg) + cfg.dim + (emb if embeddings else 0)


def block_flops(cfg: ModelConfig, seq_len: int, subnet: Subnet | None = None, tp: int = 1) -> float:
    """Forward FLOPs per token of one block's shard on one of `tp` tensor-parallel ranks (the
    whole block at tp=1), running `subnet` of it: 2 per multiply-add of the query, key, value,
    output, gate, up and down projections it runs, plus the attention score and value matmuls
    (4 x seq_len x head width per query head; causal masking not discounted). Norms,
    activations and the softmax are not counted (PaLM's convention, appendix B). The one FLOP
    count of skipjack: metrics, MFU and the pipeline's cost model all come from it."""
    sub = subnet or FULL
    if sub.skip:
        return 0.0
    hd = head_dim(cfg)
    n_q, n_kv = cfg.n_heads // tp, max(cfg.n_kv_heads // tp, 1)
    q, kv, neurons = n_q, n_kv, cfg.ffn_dim // tp
    if sub.heads is not None:
        q, kv = len(sub.heads), len(kv_heads_used(sub.heads, n_q, n_kv))
    if sub.neurons is not None:
        neurons = len(sub.neurons)
    projections = cfg.dim * hd * (2 * q + 2 * kv) + 3 * cfg.dim * neurons
    return 2.0 * projections + 4.0 * seq_len * q * hd


def output_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of the output layer (the embedding lookup is no matmul)."""
    return 2.0 * cfg.dim * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the whole model, forward and backward (3 x forward): every
    block (`block_flops`) and the output layer."""
    return 3.0 * (cfg.n_layers * block_flops(cfg, seq_len) + output_flops(cfg))
