"""The trainer: build (config, layout, data, engine, metrics, checkpoints), loop, finish.

Batch sizes are in sequences: `global_batch_size` per optimizer step, `micro_batch_size` per
forward; the accumulation steps follow from them and the dp degree, so changing the layout never
changes the math. The engine (trainer/engine.py) does forward-backward, the optimizer step and
evaluation; the loop asks it for a step, logs, and calls the checkpoint policy between steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from skipjack.atomic import write_text
from skipjack.batch import MicroBatch
from skipjack.checkpoint.convert import init_model_config
from skipjack.checkpoint.manager import CheckpointManager
from skipjack.checkpoint.state import Progress, RNGState, State
from skipjack.config import ConfigError, TrainJobConfig, prepare, resolve_dp
from skipjack.data.loader import ShardedLoader
from skipjack.data.source import build_datasets
from skipjack.models.llama import num_parameters
from skipjack.optim.builder import planned_state_bytes, state_bytes
from skipjack.optim.regime import Regime, build_regime
from skipjack.parallel.dims import ParallelDims
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.trainer.engine import Engine, NativeEngine, StepResult
from skipjack.trainer.faults import inject_fault
from skipjack.trainer.metrics import Metrics


def training_state(engine: Engine, loader: ShardedLoader, regime: Regime | None = None) -> State:
    """Everything a checkpoint holds: the engine's parts, the data position, the trainer's
    counters, the random generator and the training regime's state, if any."""
    state = {**engine.state(), "loader": loader, "trainer": Progress(), "rng": RNGState()}
    return state if regime is None else {**state, "regime": regime}


def step_plan(engine: Engine, regime: Regime | None, step: int) -> StepPlan:
    """The plan of optimizer step `step`, made once per step and the same on every replica: the
    engine's routes (SkipPipe's paths, or the full pipeline) with the regime's subnets (this
    tensor-parallel shard's part of them)."""
    plan = engine.plan(step)
    return plan if regime is None else replace(plan, subnets=regime.subnets(step))


def build_engine(
    job: TrainJobConfig, dims: ParallelDims, accumulation: int, device: torch.device
) -> Engine:
    """The engine `train.engine` names: skipjack's own, or DeepSpeed's ZeRO."""
    if job.train.engine == "deepspeed":
        from skipjack.trainer.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(job, dims, accumulation, device)
    return NativeEngine(job, dims, accumulation, device)


def train_step(
    engine: Engine,
    loader: ShardedLoader,
    step: int,
    checkpoints: CheckpointManager | None = None,
    state: State | None = None,
    plan: StepPlan | None = None,
    regime: Regime | None = None,
) -> StepResult:
    """Optimizer step `step` along `plan` (default: the full plan) on the loader's next global
    batch, the counters of `state` advanced, then the saves of `state` that are due (started,
    written in the background). Parameters change only after the saves in flight hold their
    copies."""
    micro = loader.next()
    before_update = checkpoints.before_update if checkpoints is not None else None
    result = engine.step(micro, before_update, plan)
    if regime is not None:
        regime.after_step()
    if state is not None:
        progress = state["trainer"]
        progress.step, progress.tokens = step, loader.consumed_samples * micro[0].tokens.shape[1]
        progress.flops += result.flops
        progress.dense_flops += result.dense_flops
    if checkpoints is not None and checkpoints.due(step):
        checkpoints.save(step, state)
    return result


def agree_run_dir(cfg: DictConfig) -> Path:
    """Make rank 0's run directory (absolute) `train.output_dir` on every rank, before anything
    derived from it (checkpoint.dir, logs, metrics, plots) is resolved: a launcher's other ranks
    may have composed their own (torchrun's or srun's ranks > 0 run with `hydra.run.dir=.`), and
    a path that differs between ranks splits one checkpoint over two directories."""
    chosen = [str(Path(cfg.train.output_dir).resolve()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    cfg.train.output_dir = chosen[0]
    run_dir = Path(chosen[0])
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _wandb_run(cfg: TrainJobConfig, run_dir: Path, resolved: dict):
    if not cfg.logging.wandb or cfg.logging.wandb_mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=cfg.logging.wandb_project,
        mode=cfg.logging.wandb_mode,
        dir=str(run_dir),
        config=resolved,
        name=run_dir.name,
        settings=wandb.Settings(silent=True),
    )


def checked_job(cfg: DictConfig, world: int) -> tuple[TrainJobConfig, str | None]:
    """The typed job of `cfg` for a world of `world` ranks, derived and checked (raises
    ConfigError), and the notice of the derivation if any."""
    job: TrainJobConfig = OmegaConf.to_object(cfg)
    if job.model.init_from:
        job.model = init_model_config(job.model)
    return job, prepare(job, world)


def job_dims(job: TrainJobConfig, device: torch.device) -> ParallelDims:
    """The job's layout over the default process group, its process groups built."""
    return ParallelDims(
        dp=resolve_dp(job.parallel, dist.get_world_size()),
        pp=job.parallel.pp,
        tp=job.parallel.tp,
        rank=dist.get_rank(),
    ).build_groups(device.type)


def job_data(
    job: TrainJobConfig, dims: ParallelDims, val_batches: int
) -> tuple[ShardedLoader, list[list[MicroBatch]]]:
    """This replica's training loader and its micro-batches of the first `val_batches`
    validation global batches."""
    t = job.train
    total_val = val_batches * t.global_batch_size
    train_set, val_set, tokenizer = build_datasets(
        job.data, t.seq_len, t.seed, (t.steps * t.global_batch_size, total_val),
        job.model.init_from,
    )  # fmt: skip
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{job.model.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size}; raise it or shrink the tokenizer",
        )
    loader = ShardedLoader(
        train_set, t.global_batch_size, t.micro_batch_size, dims.dp_rank, dims.dp
    )
    val_loader = ShardedLoader(
        val_set, t.global_batch_size, t.micro_batch_size, dims.dp_rank, dims.dp
    )
    return loader, [val_loader.batch_at(b * t.global_batch_size) for b in range(val_batches)]


class Trainer:
    """One training job as this rank of the default process group (the launcher started it,
    launch/local.py) on `device`: `Trainer(cfg, device).run()` builds, loops and finishes."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.lead = dist.get_rank() == 0
        self.run_dir = agree_run_dir(cfg)
        self.job, notice = checked_job(cfg, dist.get_world_size())  # paths from rank 0's dir
        if self.lead:
            _write_config(cfg, self.run_dir)
            if notice:
                print(notice)
        self._build()

    def _build(self) -> None:
        job, t = self.job, self.job.train
        self.dims = dims = job_dims(job, self.device)
        self.loader, self.val_batches = job_data(job, dims, t.val_batches)
        torch.manual_seed(t.seed)
        self.engine: Engine = build_engine(job, dims, self.loader.accumulation_steps, self.device)
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        self.wandb_run = _wandb_run(job, self.run_dir, resolved) if self.lead else None
        self.metrics = Metrics(
            self.run_dir,
            t.steps,
            self.device,
            enabled=self.lead,
            progress=job.logging.progress,
            wandb_run=self.wandb_run,
        )
        if self.lead:
            sp = " (sp)" if job.parallel.sequence_parallel else ""
            print(
                f"skipjack: {job.model.name} ({num_parameters(job.model) / 1e6:.1f}M parameters) "
                f"dp={dims.dp} pp={dims.pp} tp={dims.tp}{sp} on {self.device}, "
                f"{t.steps} steps x {t.global_batch_size} sequences x {t.seq_len} tokens, "
                f"accumulation {self.loader.accumulation_steps}; run dir {self.run_dir}"
            )
            print(
                f"skipjack: optimizer {job.optim.name}: "
                f"{planned_state_bytes(self.engine.optimizer) / 2**20:.2f} MiB of state on rank 0; "
                f"{self.engine.kernels.describe(self.device, job.optim.name)}; "
                f"{self.engine.describe()}"
            )
        self.regime = build_regime(job, dims, self.engine.blocks())
        if self.lead and self.regime is not None:
            print(f"skipjack: regime {self.regime.describe()}")
        self.state = training_state(self.engine, self.loader, self.regime)
        self.checkpoints = CheckpointManager.for_job(job.checkpoint, job.model, dims, self.lead)
        started = time.perf_counter()
        restored = self.checkpoints.restore(self.state)
        restore_seconds = time.perf_counter() - started
        self.start, self.restored = 0, restored is not None
        memory = self.checkpoints.tier("memory")
        if restored is None and memory is not None and memory.held and self.lead:
            print(
                "skipjack: the memory tier holds no snapshot every rank has or can rebuild "
                "(nodes lost beyond the parity?) and no persistent checkpoint was found: "
                "starting fresh"
            )
        if restored is not None:
            self.start = self.state["trainer"].step
            if self.lead:
                print(
                    f"skipjack: resumed from {self.checkpoints.restored_from} "
                    f"(step {self.start}) of the {self.checkpoints.restored_tier} tier, "
                    f"restored in {restore_seconds:.2f} s{steps_lost(self.run_dir, self.start)}"
                )
                for note in self.checkpoints.tier(self.checkpoints.restored_tier).notes:
                    print(f"skipjack: {note}")
        elif job.model.init_from:
            self.engine.load_weights(job.model.init_from)
            if self.lead:
                print(f"skipjack: weights from {job.model.init_from}")
        if self.lead and getattr(self.engine, "skippipe", None) is not None:
            print(f"skipjack: {self.engine.skippipe.describe()}")  # the paths it runs
        progress = self.state["trainer"]
        self.metrics.begin(
            (self.start, progress.tokens, progress.flops, progress.dense_flops)
            if self.restored
            else None
        )

    @property
    def _snapshots(self) -> Path | None:
        """This rank's node's snapshot directory, under the memory tier."""
        memory = self.checkpoints.tier("memory")
        return memory.directory if memory is not None else None

    def _settle(self) -> None:
        """Every rank's saves complete, parity included (collective)."""
        self.checkpoints.settle()
        dist.barrier(group=self.dims.group("checkpoint"))

    def run(self) -> dict:
        """The loop, then the end of the run; returns a summary (run dir, first/last validation
        loss, outputs)."""
        val_losses = self._loop()
        return self._finish(val_losses)

    def plan(self, step: int) -> StepPlan:
        return step_plan(self.engine, self.regime, step)

    def _loop(self) -> list[float]:
        job, t, engine = self.job, self.job.train, self.engine
        val_losses = []
        if self.val_batches and not self.restored:
            val_losses.append(engine.evaluate(self.val_batches))
            self.metrics.step(0, 0, 0.0, val_loss=val_losses[-1])
        step_tokens = t.global_batch_size * t.seq_len
        for step in range(self.start + 1, t.steps + 1):
            started = time.perf_counter()
            inject_fault(self.dims.rank, step, self._snapshots, self._settle)
            plan = self.plan(step)
            result = train_step(
                engine, self.loader, step, self.checkpoints, self.state, plan, self.regime
            )
            seconds = time.perf_counter() - started
            val_loss = None
            if self.val_batches and (step % t.val_interval == 0 or step == t.steps):
                val_loss = engine.evaluate(self.val_batches)
                val_losses.append(val_loss)
            self.metrics.step(
                step,
                step_tokens,
                seconds,
                result,
                val_loss,
                log=step % job.logging.interval == 0 or step == t.steps,
                optimizer_state_bytes=state_bytes(engine.optimizer),
                regime=self.regime.rates(step) if self.regime is not None else None,
            )
            if self.lead:
                write_text(self.run_dir / REACHED, json.dumps({"step": step}))
        return val_losses

    def _finish(self, val_losses: list[float]) -> dict:
        self.checkpoints.close()
        self.metrics.close()
        run_dir, lead = self.run_dir, self.lead
        summary = {
            "run_dir": str(run_dir),
            "val_losses": val_losses,
            "config": str(run_dir / "config.yaml"),
            "metrics": str(run_dir / "metrics.jsonl"),
        }
        if lead and self.job.logging.plot and self.metrics.history:
            title = f"skipjack {self.job.model.name}"
            summary["plot"] = str(self.metrics.plot(run_dir / "loss.png", title))
        if lead:
            print(
                f"skipjack: done. val_loss {val_losses[0]:.4f} -> {val_losses[-1]:.4f}"
                if val_losses
                else "skipjack: done."
            )
            for name in ("config", "metrics", "plot"):
                if name in summary:
                    print(f"  {name:8s} {summary[name]}")
            if self.wandb_run is not None:
                print(f"  wandb    {run_dir / 'wandb'} (sync with `wandb sync`)")
        dist.destroy_process_group()
        return summary


REACHED = "reached.json"  # the last step the run finished, rewritten after every step


def steps_lost(run_dir: Path, restored: int) -> str:
    """How many finished steps a resume from step `restored` runs again, for the log ("" when
    this run directory has no record of the step it reached: a new run from another's
    checkpoint)."""
    try:
        reached = json.loads((run_dir / REACHED).read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return ""
    lost = max(reached - restored, 0)
    return f"; {lost} step{'s' if lost != 1 else ''} lost (the run had reached step {reached})"


def train(cfg: DictConfig, device: torch.device) -> dict:
    """Run a training job (see Trainer); returns its summary."""
    return Trainer(cfg, device).run()
