"""Structured config schema: every knob of a skipjack job, with its default and its check.

The dataclasses are registered in Hydra's ConfigStore; the YAML tree in `skipjack/configs/` fills
them. `validate()` runs before any work starts and raises `ConfigError` naming the field and the
fix, so a bad value costs seconds, not a queued job.
"""

from __future__ import annotations  # the schema's Optional[...] stays: OmegaConf 2.3 needs it

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value that cannot work. The message names the field and says what to do."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field_name = field_name


ROPE_TYPES = ("llama3", "linear", "yarn")


@dataclass
class RopeScalingConfig:
    """Scaling of RoPE's frequencies for contexts longer than pre-training's, as Hugging Face's
    `rope_scaling` (docs/model.md): `llama3` (wavelength-dependent), `linear` (every frequency
    divided by `factor`) or `yarn` (NTK-by-parts between `beta_fast` and `beta_slow` rotations,
    cos/sin scaled by `attention_factor`, derived from `factor` and `mscale*` when None)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True


@dataclass
class ModelConfig:
    """A Llama-family architecture. Presets live in configs/model/<name>.yaml."""

    name: str = MISSING
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int = MISSING
    # width of one attention head; None: dim / n_heads (Llama's rule, which some models break)
    head_dim: Optional[int] = None
    ffn_dim: int = MISSING
    vocab_size: int = MISSING
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    tie_embeddings: bool = False
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # start from these weights (a Hugging Face directory or a skipjack step-* directory); the
    # architecture fields above are then taken from it
    init_from: Optional[str] = None
    # the tokenizer's special ids, kept from a Hugging Face import so that its export has them
    bos_token_id: Optional[int] = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: Optional[int] = None
    # the dtype (bf16, fp16, fp32) of the Hugging Face weights the model came from: an export
    # writes it unless told otherwise (None: the checkpoint's own)
    hf_dtype: Optional[str] = None


@dataclass
class DataConfig:
    """Where tokens come from.

    `kind=builtin` trains on the Python standard library's source (on every machine, cached after
    first use). `kind=indexed` reads Megatron indexed datasets made by `skipjack preprocess`:
    `paths` is a blend, either prefixes alone or alternating weight and prefix.
    """

    kind: str = "builtin"
    paths: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    tokenizer: Optional[str] = None
    tokenizer_vocab_size: int = 4096
    cache_dir: str = "${oc.env:SKIPJACK_CACHE,'~/.cache/skipjack'}"


@dataclass
class ParallelConfig:
    """Parallel degrees. `dp=-1` means world size / (pp x tp)."""

    dp: int = -1
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    schedule: str = "1f1b"
    partition: str = "even"
    layers_per_stage: list[int] = field(default_factory=list)
    vocab_parallel: str = "none"
    # micro-batches per step and replica (what flows through the pipeline); 0: from
    # train.micro_batch_size (`auto` there: enough to fill the pipeline, see derive_micro_batches)
    microbatches: int = 0
    sequence_parallel: bool = False
    bucket_mb: float = 25.0


@dataclass
class GaLoreConfig:
    """Low-rank optimizer states for the attention and MLP matrices (docs/optimizers.md); read
    when optim.name is galore or galore_plus. `rank`: None takes the GaLore paper's rank for the
    model preset (a quarter of dim for other models)."""

    rank: Optional[int] = None
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"  # std | reverse_std | left | right
    moments: str = "keep"  # on a basis change: keep | reset | rotate
    svd: str = "exact"  # exact | rsi (randomized subspace iteration)
    oversample: int = 8
    power_iters: int = 1
    # GaLore+ only: heads sampled for a shared attention basis (0: off); sparse residuals
    heads: int = 0
    density: float = 0.0
    residual_warmup: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | galore | galore_plus
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    galore: GaLoreConfig = field(default_factory=GaLoreConfig)


@dataclass
class CheckpointConfig:
    """Sharded persistent checkpoints (docs/checkpoints.md). `interval`: steps between saves,
    0 for none. `resume`: auto (the newest complete checkpoint in `dir`, if any), none, or the
    path of a run directory or of one step-* directory."""

    interval: int = 0
    dir: str = "${train.output_dir}/checkpoints"
    keep_last: int = 3
    resume: str = "auto"


@dataclass
class LoggingConfig:
    interval: int = 1
    progress: bool = True
    plot: bool = True
    wandb: bool = True
    wandb_mode: str = "offline"
    wandb_project: str = "skipjack"


@dataclass
class LaunchConfig:
    """How the job is started (docs/launch.md). `local`: in this process, or as one rank of a
    launcher that set the ranks (torchrun, srun, Ray). `torchrun`: start torchrun for the user.
    `slurm`: write (and submit) a batch script running srun + torchrun, one task per node.
    `ray`: run the trainer as a Ray Train TorchTrainer job."""

    name: str = "local"
    nproc_per_node: int = 1
    nodes: int = 1
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous (multi-node torchrun)
    max_restarts: int = 0
    # slurm: the batch script's resources; `submit=false` only writes the script
    partition: str = ""
    account: str = ""
    time: str = ""
    gpus_per_node: int = 0
    cpus_per_task: int = 0
    extra_sbatch: list[str] = field(default_factory=list)
    submit: bool = True
    # ray: a Ray Train job on the cluster at `address` (empty: start a local one)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str = ""
    max_failures: int = 0


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16
    micro_batch_size: Union[int, str] = "auto"  # sequences per forward; auto: derived
    seq_len: int = 128
    val_interval: int = 50
    val_batches: int = 4
    device: str = "auto"
    dtype: str = "bf16"
    seed: int = 1234
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class PreprocessConfig:
    """`skipjack preprocess`: text/jsonl files -> Megatron indexed dataset (.bin/.idx)."""

    inputs: list[str] = field(default_factory=list)
    output_prefix: str = MISSING
    json_key: str = "text"
    tokenizer: Optional[str] = None
    tokenizer_vocab_size: int = 4096
    cache_dir: str = "${oc.env:SKIPJACK_CACHE,'~/.cache/skipjack'}"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJobConfig)
    cs.store(name="preprocess_schema", node=PreprocessConfig)


_DATA_KINDS = ("builtin", "indexed")
_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("fp32", "bf16")
_WANDB_MODES = ("offline", "online", "disabled")


OPTIMIZERS = ("adamw", "galore", "galore_plus")
GALORE_CHOICES = {
    "proj_type": ("std", "reverse_std", "left", "right"),
    "moments": ("keep", "reset", "rotate"),
    "svd": ("exact", "rsi"),
}


def _validate_galore(g: GaLoreConfig, plus: bool) -> None:
    for name, allowed in GALORE_CHOICES.items():
        if getattr(g, name) not in allowed:
            raise ConfigError(
                f"optim.galore.{name}",
                f"unknown value {getattr(g, name)!r}; use one of {', '.join(allowed)}",
            )
    if g.rank is not None and g.rank < 0:
        raise ConfigError("optim.galore.rank", f"must be >= 0 (or null: by preset), got {g.rank}")
    if g.rank == 0 and not (plus and g.density > 0):
        raise ConfigError(
            "optim.galore.rank",
            "0 leaves the attention and MLP matrices without updates; use rank >= 1 (rank 0 "
            "only makes sense with optim=galore_plus and optim.galore.density > 0)",
        )
    _positive("optim.galore.update_proj_gap", g.update_proj_gap)
    for name in ("oversample", "power_iters", "heads", "residual_warmup"):
        if getattr(g, name) < 0:
            raise ConfigError(f"optim.galore.{name}", f"must be >= 0, got {getattr(g, name)}")
    if not 0.0 <= g.density <= 1.0:
        raise ConfigError("optim.galore.density", f"must be in [0, 1], got {g.density}")
    if not plus and (g.heads or g.density):
        raise ConfigError(
            "optim.galore.heads" if g.heads else "optim.galore.density",
            "cross-head projection and sparse residuals are GaLore+; use optim=galore_plus",
        )


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(name, f"must be > 0, got {value}")


def head_dim(m: ModelConfig) -> int:
    """The width of one attention head (model.head_dim, or dim / n_heads when it is unset)."""
    return m.head_dim if m.head_dim is not None else m.dim // m.n_heads


def parameter_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The global shape (vocabulary unpadded) of Llama parameter `name` under config `cfg`: what
    a checkpoint of `cfg` holds, whatever the layout."""
    hd = head_dim(cfg)
    leaf = name.split(".")[-2]
    shapes = {
        "tok_embeddings": (cfg.vocab_size, cfg.dim),
        "output": (cfg.vocab_size, cfg.dim),
        "wq": (cfg.n_heads * hd, cfg.dim),
        "wk": (cfg.n_kv_heads * hd, cfg.dim),
        "wv": (cfg.n_kv_heads * hd, cfg.dim),
        "wo": (cfg.dim, cfg.n_heads * hd),
        "w1": (cfg.ffn_dim, cfg.dim),
        "w3": (cfg.ffn_dim, cfg.dim),
        "w2": (cfg.dim, cfg.ffn_dim),
    }
    if leaf in shapes:
        return shapes[leaf]
    if name.endswith("norm.weight"):
        return (cfg.dim,)
    raise KeyError(f"no parameter named {name!r} in a Llama model")


def validate_model(m: ModelConfig) -> None:
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        _positive(f"model.{name}", getattr(m, name))
    if m.head_dim is None and m.dim % m.n_heads:
        raise ConfigError(
            "model.n_heads",
            f"dim={m.dim} is not divisible by n_heads={m.n_heads}; pick a divisor or set "
            "model.head_dim",
        )
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            "model.n_kv_heads",
            f"n_heads={m.n_heads} is not divisible by n_kv_heads={m.n_kv_heads}; pick a divisor",
        )
    if head_dim(m) <= 0 or head_dim(m) % 2:
        raise ConfigError(
            "model.head_dim" if m.head_dim is not None else "model.dim",
            f"head dim {head_dim(m)} must be even and positive for RoPE",
        )
    if m.rope_scaling is not None:
        _validate_rope_scaling(m.rope_scaling)


def _validate_rope_scaling(s: RopeScalingConfig) -> None:
    if s.rope_type not in ROPE_TYPES:
        raise ConfigError(
            "model.rope_scaling.rope_type",
            f"unknown {s.rope_type!r}; skipjack supports {', '.join(ROPE_TYPES)} (or "
            "rope_scaling=null)",
        )
    _positive("model.rope_scaling.factor", s.factor)
    _positive(
        "model.rope_scaling.original_max_position_embeddings", s.original_max_position_embeddings
    )
    if s.rope_type == "llama3" and s.high_freq_factor <= s.low_freq_factor:
        raise ConfigError(
            "model.rope_scaling.high_freq_factor",
            f"{s.high_freq_factor} must exceed low_freq_factor={s.low_freq_factor}",
        )


def validate_tensor_parallel(m: ModelConfig, tp: int) -> None:
    """What tensor parallelism of degree `tp` needs of the architecture. With tp > n_kv_heads
    each kv head is replicated on tp / n_kv_heads ranks (Megatron's way); a checkpoint then takes
    an equal part of the head's rows from each of them, so the head dim must split that way."""
    if m.n_heads % tp:
        raise ConfigError("parallel.tp", f"n_heads={m.n_heads} is not divisible by tp={tp}")
    if m.n_kv_heads % tp and tp % m.n_kv_heads:
        raise ConfigError(
            "parallel.tp",
            f"n_kv_heads={m.n_kv_heads} and tp={tp}: one must divide the other (kv heads are "
            "split over the tp ranks, or each replicated on tp / n_kv_heads of them)",
        )
    if tp > m.n_kv_heads and head_dim(m) % (tp // m.n_kv_heads):
        raise ConfigError(
            "parallel.tp",
            f"head dim {head_dim(m)} is not divisible by tp / n_kv_heads = "
            f"{tp // m.n_kv_heads}, which replicated kv heads need",
        )
    if m.ffn_dim % tp:
        raise ConfigError("parallel.tp", f"model.ffn_dim={m.ffn_dim} is not divisible by tp={tp}")


_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
_PARTITIONS = ("even", "redistribute")
_VOCAB_PARALLEL = ("none", "alg1", "alg2")
_LAUNCHERS = ("local", "torchrun", "slurm", "ray")


def validate_pipeline(cfg: TrainJobConfig, world_size: int) -> None:
    p, t = cfg.parallel, cfg.train
    if p.schedule not in _SCHEDULES:
        raise ConfigError("parallel.schedule", f"unknown {p.schedule!r}; use one of {_SCHEDULES}")
    if p.partition not in _PARTITIONS:
        raise ConfigError(
            "parallel.partition", f"unknown {p.partition!r}; use one of {_PARTITIONS}"
        )
    if (p.vpp > 1) != (p.schedule == "interleaved_1f1b"):
        raise ConfigError(
            "parallel.vpp", "vpp > 1 goes with parallel.schedule=interleaved_1f1b, and only with it"
        )
    stages = p.pp * p.vpp
    if cfg.model.n_layers < stages:
        raise ConfigError("parallel.pp", f"pp x vpp = {stages} stages need n_layers >= {stages}")
    if p.layers_per_stage and (
        len(p.layers_per_stage) != stages or sum(p.layers_per_stage) != cfg.model.n_layers
    ):
        raise ConfigError(
            "parallel.layers_per_stage",
            f"needs {stages} counts summing to n_layers={cfg.model.n_layers}",
        )
    if p.vocab_parallel not in _VOCAB_PARALLEL:
        raise ConfigError(
            "parallel.vocab_parallel", f"unknown {p.vocab_parallel!r}; use one of {_VOCAB_PARALLEL}"
        )
    if p.vocab_parallel != "none":
        if p.pp == 1:
            raise ConfigError(
                "parallel.vocab_parallel",
                "needs pp > 1 (with pp=1, tensor parallelism already splits the vocabulary)",
            )
        if p.partition == "redistribute" or p.layers_per_stage:
            raise ConfigError(
                "parallel.partition",
                "vocab_parallel spreads the vocabulary layers over every stage, so the layers are "
                "split evenly; use parallel.partition=even and no layers_per_stage",
            )
    elif p.pp > 1 and cfg.model.tie_embeddings:
        raise ConfigError(
            "model.tie_embeddings",
            "tied embeddings need pp=1 or parallel.vocab_parallel (embedding and output together)",
        )
    if p.schedule == "interleaved_1f1b":
        dp = resolve_dp(p, world_size)
        microbatches = t.global_batch_size // max(1, dp * t.micro_batch_size)
        if microbatches % p.pp:
            raise ConfigError(
                "train.micro_batch_size",
                f"interleaved 1F1B needs the micro-batches per replica ({microbatches}) "
                f"to be a multiple of pp={p.pp}; set train.micro_batch_size=auto or "
                f"parallel.microbatches to a multiple of {p.pp}",
            )


def validate(cfg: TrainJobConfig, world_size: int) -> str | None:
    """Check a resolved train config against the world it will run in, after deriving
    train.micro_batch_size (derive_micro_batches). Raises ConfigError; returns a notice for the
    user when the derived split cannot fill the pipeline."""
    notice = derive_micro_batches(cfg, world_size)
    validate_model(cfg.model)
    t, p = cfg.train, cfg.parallel
    for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len", "val_interval"):
        _positive(f"train.{name}", getattr(t, name))
    if t.val_batches < 0:
        raise ConfigError("train.val_batches", f"must be >= 0, got {t.val_batches}")
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            "train.seq_len",
            f"{t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; shorten it",
        )
    if t.device not in _DEVICES:
        raise ConfigError("train.device", f"unknown device {t.device!r}; use one of {_DEVICES}")
    if t.dtype not in _DTYPES:
        raise ConfigError("train.dtype", f"unknown dtype {t.dtype!r}; use one of {_DTYPES}")

    _positive("parallel.tp", p.tp)
    _positive("parallel.pp", p.pp)
    _positive("parallel.bucket_mb", p.bucket_mb)
    _positive("parallel.pp", p.pp)
    _positive("parallel.vpp", p.vpp)
    validate_pipeline(cfg, world_size)
    validate_tensor_parallel(cfg.model, p.tp)
    if p.sequence_parallel and t.seq_len % p.tp:
        raise ConfigError(
            "train.seq_len",
            f"{t.seq_len} is not divisible by tp={p.tp}, which sequence parallelism needs",
        )
    dp = resolve_dp(p, world_size)
    if t.global_batch_size % (dp * t.micro_batch_size):
        raise ConfigError(
            "train.global_batch_size",
            f"{t.global_batch_size} is not divisible by dp x micro_batch_size = "
            f"{dp} x {t.micro_batch_size}; make it a multiple of {dp * t.micro_batch_size}",
        )

    o = cfg.optim
    if o.name not in OPTIMIZERS:
        raise ConfigError(
            "optim.name", f"unknown optimizer {o.name!r}; use one of {', '.join(OPTIMIZERS)}"
        )
    if o.name != "adamw":
        _validate_galore(o.galore, plus=o.name == "galore_plus")
        if p.tp > cfg.model.n_kv_heads:
            raise ConfigError(
                "optim.name",
                f"{o.name} with kv heads replicated over tp (tp={p.tp} > n_kv_heads="
                f"{cfg.model.n_kv_heads}) is not supported; use optim=adamw or tp <= n_kv_heads",
            )
    _positive("optim.lr", o.lr)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.grad_clip < 0:
        raise ConfigError("optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")

    validate_data(cfg.data)
    c = cfg.checkpoint
    if c.interval < 0:
        raise ConfigError("checkpoint.interval", f"must be >= 0 (0: no saves), got {c.interval}")
    _positive("checkpoint.keep_last", c.keep_last)
    if c.resume not in ("auto", "none") and not Path(c.resume).expanduser().exists():
        raise ConfigError(
            "checkpoint.resume",
            f"{c.resume} does not exist; give a run directory, a step-* directory, auto or none",
        )
    lg = cfg.logging
    _positive("logging.interval", lg.interval)
    if lg.wandb_mode not in _WANDB_MODES:
        raise ConfigError(
            "logging.wandb_mode", f"unknown mode {lg.wandb_mode!r}; use one of {_WANDB_MODES}"
        )
    la = cfg.launch
    if la.name not in _LAUNCHERS:
        raise ConfigError("launch.name", f"unknown launcher {la.name!r}; use one of {_LAUNCHERS}")
    _positive("launch.nproc_per_node", la.nproc_per_node)
    _positive("launch.nodes", la.nodes)
    _positive("launch.num_workers", la.num_workers)
    for name in ("max_restarts", "max_failures"):
        if getattr(la, name) < 0:
            raise ConfigError(f"launch.{name}", f"must be >= 0, got {getattr(la, name)}")
    if la.name == "torchrun" and la.nodes > 1 and ":" not in la.rdzv_endpoint:
        raise ConfigError(
            "launch.rdzv_endpoint",
            "multi-node torchrun needs the rendezvous host:port (the same on every node)",
        )
    return notice


def validate_data(d: DataConfig) -> None:
    if d.kind not in _DATA_KINDS:
        raise ConfigError("data.kind", f"unknown kind {d.kind!r}; use one of {_DATA_KINDS}")
    if d.kind == "indexed":
        if not d.paths:
            raise ConfigError(
                "data.paths", "data.kind=indexed needs dataset prefixes (from skipjack preprocess)"
            )
        for prefix in parse_blend(d.paths)[0]:
            for suffix in (".bin", ".idx"):
                if not os.path.exists(os.path.expanduser(prefix) + suffix):
                    raise ConfigError(
                        "data.paths",
                        f"{prefix}{suffix} does not exist; run `skipjack preprocess` to make it",
                    )
    if d.tokenizer is not None and not os.path.exists(os.path.expanduser(d.tokenizer)):
        raise ConfigError(
            "data.tokenizer", f"{d.tokenizer} does not exist; give a tokenizer.json or null"
        )
    split = [s for s in d.split.split(",") if s.strip()]
    try:
        parts = [float(s) for s in split]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[1] <= 0:
        raise ConfigError(
            "data.split", f"{d.split!r} must be 'train,valid,test' weights with valid > 0"
        )


def parse_blend(paths: list[str]) -> tuple[list[str], list[float] | None]:
    """A blend written as `[w1, p1, w2, p2, ...]` or `[p1, p2, ...]` -> (prefixes, weights)."""
    weighted = len(paths) % 2 == 0 and all(_is_number(p) for p in paths[0::2])
    if weighted:
        return list(paths[1::2]), [float(w) for w in paths[0::2]]
    return list(paths), None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def derive_micro_batches(cfg: TrainJobConfig, world_size: int) -> str | None:
    """Set train.micro_batch_size: from `parallel.microbatches` when that is set, as given when
    it is a number, else (`auto`) from the global batch, dp and the schedule. Without a pipeline
    that is one micro-batch per replica; a pipeline gets at least 2 x pp micro-batches where the
    batch allows (a multiple of pp for interleaved 1F1B), else the most it allows, with the
    notice returned."""
    p, t = cfg.parallel, cfg.train
    explicit = t.micro_batch_size != "auto"
    if explicit and not isinstance(t.micro_batch_size, int):
        raise ConfigError(
            "train.micro_batch_size", f"{t.micro_batch_size!r} is neither a number nor auto"
        )
    dp = resolve_dp(p, world_size)
    _positive("train.global_batch_size", t.global_batch_size)
    if p.microbatches:
        _positive("parallel.microbatches", p.microbatches)
        per_step = dp * p.microbatches
        if t.global_batch_size % per_step:
            raise ConfigError(
                "parallel.microbatches",
                f"train.global_batch_size={t.global_batch_size} does not split into dp x "
                f"microbatches = {per_step} micro-batches; change either",
            )
        if explicit and t.micro_batch_size != t.global_batch_size // per_step:
            raise ConfigError(
                "train.micro_batch_size",
                f"{t.micro_batch_size} contradicts parallel.microbatches={p.microbatches} "
                f"(which gives {t.global_batch_size // per_step}); set only one of them",
            )
        t.micro_batch_size = t.global_batch_size // per_step
        return None
    if explicit:
        return None
    if t.global_batch_size % dp:
        raise ConfigError(
            "train.global_batch_size",
            f"{t.global_batch_size} does not split over dp={dp} replicas; make it a multiple "
            f"of {dp}",
        )
    per_replica = t.global_batch_size // dp
    interleaved = p.schedule == "interleaved_1f1b"
    counts = [m for m in range(1, per_replica + 1) if per_replica % m == 0]
    counts = [m for m in counts if not interleaved or m % p.pp == 0] if p.pp > 1 else [1]
    if not counts:
        raise ConfigError(
            "train.global_batch_size",
            f"{t.global_batch_size} gives {per_replica} sequences per replica, which do not "
            f"split into a multiple of pp={p.pp} micro-batches (interleaved 1F1B); make it a "
            f"multiple of dp x pp = {dp * p.pp}",
        )
    fill = 2 * p.pp if p.pp > 1 else 1
    chosen = next((m for m in counts if m >= fill), counts[-1])
    t.micro_batch_size = per_replica // chosen
    if chosen < fill:
        return (
            f"skipjack: {chosen} micro-batches per replica (train.global_batch_size="
            f"{t.global_batch_size} over dp={dp}) cannot fill a pipeline of pp={p.pp}, which "
            f"wants {fill}; raise train.global_batch_size to {fill * dp} or more"
        )
    return None


def resolve_dp(p: ParallelConfig, world_size: int) -> int:
    model_parallel = p.tp * p.pp
    if p.dp == -1:
        if world_size % model_parallel:
            raise ConfigError(
                "parallel.tp",
                f"world size {world_size} is not divisible by pp x tp = {model_parallel}",
            )
        return world_size // model_parallel
    _positive("parallel.dp", p.dp)
    if p.dp * model_parallel != world_size:
        raise ConfigError(
            "parallel.dp",
            f"dp x pp x tp = {p.dp} x {p.pp} x {p.tp} != world size {world_size}; "
            "set parallel.dp=-1 to derive it or launch that many processes",
        )
    return p.dp
