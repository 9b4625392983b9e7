"""`skipjack eval`: the validation loss and perplexity of a checkpoint, in any layout and on any
data config, optionally with stages or layers of the model omitted (each omitted block the
identity on the residual stream): how robust a SkipPipe-trained model is to partial pipelines.

`checkpoint.resume` names what to evaluate (a run directory, its newest complete checkpoint, or
a step directory); only the weights are read, resharded to this job's layout. `eval.stages`
keeps those stages of the checkpoint's run (its `parallel.pp`, or `eval.num_stages`, split
evenly); `eval.layers` keeps those layers. The result is printed and written to the run
directory's `eval.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from skipjack.atomic import write_text
from skipjack.checkpoint.persistent import resume_candidates
from skipjack.checkpoint.sharded import load_model
from skipjack.checkpoint.state import ModelState
from skipjack.config import ConfigError, TrainJobConfig
from skipjack.models.subnet import Subnet
from skipjack.parallel.pipeline.partition import even_partition
from skipjack.parallel.pipeline.plan import StepPlan
from skipjack.trainer.engine import NativeEngine
from skipjack.trainer.trainer import agree_run_dir, checked_job, job_data, job_dims


def evaluate(cfg: DictConfig, device: torch.device) -> dict:
    """Evaluate as this rank of the default process group; returns what eval.json holds."""
    run_dir = agree_run_dir(cfg)
    job, _ = checked_job(cfg, dist.get_world_size())
    source = _checkpoint(job)
    kept = kept_layers(job, source)
    dims = job_dims(job, device)
    batches = job.eval.batches or job.train.val_batches
    loader, val_batches = job_data(job, dims, batches)
    engine = NativeEngine(job, dims, loader.accumulation_steps, device)
    state = {"model": ModelState(engine.model, dims)}
    load_model(state, job.model, str(source), dims.group("checkpoint"))
    skip = {layer: Subnet(skip=True) for layer in range(job.model.n_layers) if layer not in kept}
    plan = StepPlan(engine.full_plan().routes, skip)
    loss = engine.evaluate(val_batches, plan)
    result = {
        "checkpoint": str(source),
        "layers": sorted(kept),
        "of_layers": job.model.n_layers,
        "batches": batches,
        "val_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
    }
    if dist.get_rank() == 0:
        write_text(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
        print(
            f"skipjack eval: {source}: {len(kept)} of {job.model.n_layers} layers, "
            f"{batches} validation batches: val_loss {loss:.4f}  "
            f"perplexity {result['perplexity']:.2f}"
        )
        print(f"  result   {run_dir / 'eval.json'}")
    return result


def _checkpoint(job: TrainJobConfig) -> Path:
    resume = job.checkpoint.resume
    if resume in ("auto", "none"):
        raise ConfigError(
            "checkpoint.resume", "name the run directory or step-* directory to evaluate"
        )
    found, _ = resume_candidates(resume, Path(job.checkpoint.dir))
    return found[0]


def kept_layers(job: TrainJobConfig, source: Path) -> set[int]:
    """The layers `eval` keeps of the checkpoint at `source`."""
    e, n_layers = job.eval, job.model.n_layers
    if e.layers:
        return set(e.layers)
    if not e.stages:
        return set(range(n_layers))
    stages = e.num_stages or _trained_pp(source) or job.parallel.pp
    bad = [s for s in e.stages if not 0 <= s < stages]
    if bad:
        raise ConfigError("eval.stages", f"{bad} are not stages of {stages}; see eval.num_stages")
    parts = even_partition(n_layers, stages)
    return {layer for s in e.stages for layer in parts[s]}


def _trained_pp(source: Path) -> int | None:
    """parallel.pp of the run that saved `source` (run dir/checkpoints/step-*), if recorded."""
    saved = source.parent.parent / "config.yaml"
    if not saved.is_file():
        return None
    return int(OmegaConf.load(saved).parallel.pp)
