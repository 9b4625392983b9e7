"""The whole job: the sections together, Hydra's registration, deriving the values left to
skipjack (`derive_micro_batches`) and the checks that span sections (`validate`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from skipjack.config.checkpoint import CheckpointConfig, validate_checkpoint
from skipjack.config.data import DataConfig, PreprocessConfig, validate_data
from skipjack.config.errors import ConfigError, positive
from skipjack.config.evaluate import EvalConfig, validate_eval
from skipjack.config.generate import GenerateConfig
from skipjack.config.launch import LAUNCHERS, LaunchConfig, RayLaunch, validate_launch
from skipjack.config.logs import LoggingConfig, validate_logging
from skipjack.config.model import ModelConfig, validate_model, validate_tensor_parallel
from skipjack.config.optim import OptimConfig, validate_optim
from skipjack.config.parallel import ParallelConfig, resolve_dp, validate_parallel
from skipjack.config.regime import RegimeConfig, validate_regime
from skipjack.config.train import TrainConfig, validate_train


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainJobConfig)
    cs.store(name="preprocess_schema", node=PreprocessConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    for name, schema in LAUNCHERS.items():  # launch/<name>.yaml starts from it
        cs.store(name=f"launch_{name}_schema", node=schema)


def prepare(cfg: TrainJobConfig, world_size: int) -> str | None:
    """Derive what the job leaves to skipjack, then check it all, for a world of `world_size`
    ranks: the two steps every entry point takes before any work. Returns the derivation's
    notice for the user, if any; raises ConfigError."""
    notice = derive_micro_batches(cfg, world_size)
    validate(cfg, world_size)
    return notice


def validate(cfg: TrainJobConfig, world_size: int) -> None:
    """Check a resolved, derived job against the world it will run in: every section, then
    what spans sections. Raises ConfigError naming the field and the fix."""
    t, p, m = cfg.train, cfg.parallel, cfg.model
    if not isinstance(t.micro_batch_size, int):
        raise ConfigError(
            "train.micro_batch_size",
            f"{t.micro_batch_size!r} is not derived yet; call prepare() (derive_micro_batches)",
        )
    validate_model(m)
    validate_train(t, m.max_seq_len)
    validate_eval(cfg.eval, m.n_layers)
    validate_parallel(p)
    validate_pipeline(cfg, world_size)
    validate_tensor_parallel(m, p.tp)
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
    validate_optim(cfg.optim)
    validate_regime(cfg.regime)
    if cfg.optim.name != "adamw" and p.tp > m.n_kv_heads:
        raise ConfigError(
            "optim.name",
            f"{cfg.optim.name} with kv heads replicated over tp (tp={p.tp} > n_kv_heads="
            f"{m.n_kv_heads}) is not supported; use optim=adamw or tp <= n_kv_heads",
        )
    validate_data(cfg.data)
    validate_checkpoint(cfg.checkpoint)
    validate_logging(cfg.logging)
    validate_launch(cfg.launch)
    memory = cfg.checkpoint.memory
    if memory.interval and memory.agent == "launcher" and isinstance(cfg.launch, RayLaunch):
        raise ConfigError(
            "checkpoint.memory.agent",
            "launch=ray runs no skipjack process on each machine to keep the snapshot agents; "
            "use checkpoint.memory.agent=trainer (or launch=torchrun / slurm)",
        )
    if t.engine == "deepspeed":
        validate_deepspeed(cfg)


def validate_deepspeed(cfg: TrainJobConfig) -> None:
    """What `train.engine=deepspeed` (data parallelism through ZeRO) can run with; every refusal
    names the engine that can."""
    p, ds = cfg.parallel, cfg.train.deepspeed
    if ds.zero_stage not in (1, 2, 3):
        raise ConfigError("train.deepspeed.zero_stage", f"must be 1, 2 or 3, got {ds.zero_stage}")
    if ds.config and not os.path.isfile(os.path.expanduser(ds.config)):
        raise ConfigError("train.deepspeed.config", f"{ds.config} is not a file (a JSON config)")
    native = "train.engine=native runs it"
    refused = [
        ("parallel.tp", p.tp > 1, f"tensor parallelism (tp={p.tp})"),
        ("parallel.pp", p.pp > 1, f"pipeline parallelism (pp={p.pp})"),
        ("parallel.vocab_parallel", p.vocab_parallel != "none", "vocabulary parallelism"),
        ("parallel.skippipe.enabled", p.skippipe.enabled, "SkipPipe"),
        ("optim.name", cfg.optim.name != "adamw",
         f"{cfg.optim.name} (low-rank projection of ZeRO's flattened partitions)"),
        ("regime.name", cfg.regime.name != "none", f"the {cfg.regime.name} regime's subnetworks"),
        ("checkpoint.memory.interval", cfg.checkpoint.memory.interval > 0, "memory snapshots"),
    ]  # fmt: skip
    for field_name, on, what in refused:
        if on:
            raise ConfigError(
                field_name, f"train.engine=deepspeed (ZeRO data parallelism) cannot run {what}; "
                f"{native}",
            )  # fmt: skip


def validate_pipeline(cfg: TrainJobConfig, world_size: int) -> None:
    """What the pipeline needs of the model and the batch."""
    p, t = cfg.parallel, cfg.train
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
    positive("train.global_batch_size", t.global_batch_size)
    if p.microbatches:
        positive("parallel.microbatches", p.microbatches)
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
