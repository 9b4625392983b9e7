"""Training metrics: throughput, FLOPs, memory; console progress, metrics.jsonl, wandb, plot.

FLOPs are the model FLOPs a step's plan ran (`trainer.pipeline.plan_flops`: 3 x the forward
matmuls of every block each microbatch's route visits, as its subnet says, and the output layer;
PaLM appendix B's convention), whatever the layout; the full plan runs `flops_per_token` x the
step's tokens. The running total is checkpointed with the trainer's counters. On CUDA the
achieved FLOP/s is reported as MFU against the GPU's dense bf16 peak; on CPU there is no
meaningful peak, so the achieved FLOP/s itself is reported.
"""

from __future__ import annotations

import json
import resource
import time
from itertools import takewhile
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from skipjack.atomic import replacing
from skipjack.trainer.engine import StepResult

METRICS, SUPERSEDED = "metrics.jsonl", "metrics.superseded.jsonl"

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Metrics:
    """Collects per-step numbers; only the process with `enabled=True` (rank 0) writes them."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        device: torch.device,
        enabled: bool,
        progress: bool,
        wandb_run=None,
    ):
        self.device = device
        self.enabled = enabled
        self.peak = peak_flops(device)
        self.flops_total = self.dense_total = 0.0
        self.tokens_total = 0
        self.history: list[dict] = []
        self.wandb_run = wandb_run
        self.run_dir = run_dir
        self._file = None  # opened by `begin`
        self._progress = None
        if enabled and progress:
            self._progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
                TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=total_steps, loss=float("nan"), tps=0.0
            )

    def begin(self, resumed: tuple[int, int, float, float] | None = None) -> None:
        """Open `metrics.jsonl` as this run's one history before the first step. `resumed`:
        (step, tokens, flops, dense_flops) of the checkpoint the run continues from, whose
        totals it carries on; None for a fresh start. The records of later steps, written by a
        timeline the restart abandoned (or, fresh, every record of an earlier run in this
        directory), move to `metrics.superseded.jsonl`: the history has one record per step,
        and the loss plot draws it whole, across restarts."""
        if resumed is not None:
            step, self.tokens_total, self.flops_total, self.dense_total = resumed
        if not self.enabled:
            return
        path = self.run_dir / METRICS
        records = read_metrics(self.run_dir) if path.exists() else []
        kept = [] if resumed is None else list(takewhile(lambda r: r["step"] <= step, records))
        if len(kept) < len(records):
            with open(self.run_dir / SUPERSEDED, "a") as out:
                out.writelines(json.dumps(r) + "\n" for r in records[len(kept) :])
        if path.exists():  # rewritten whole: also drops a torn last line
            with replacing(path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept
        self._file = open(path, "a")  # noqa: SIM115

    def step(
        self,
        step: int,
        tokens: int,
        seconds: float,
        result: StepResult | None = None,
        val_loss: float | None = None,
        log: bool = True,
        optimizer_state_bytes: int | None = None,
        regime: dict | None = None,
    ) -> dict:
        """Account one step of `tokens` that took `seconds`; write it when `log` or validated.
        `regime`: what a training regime kept this step (its rates), logged with the share of
        FLOPs its subnetworks saved so far."""
        record = {"step": step, "time": time.time()}  # wall clock (Unix seconds) at its end
        if result is not None:
            self.tokens_total += tokens
            self.flops_total += result.flops
            seconds = max(seconds, 1e-9)
            record.update(
                loss=result.loss,
                lr=result.lr,
                grad_norm=result.grad_norm,
                tokens=self.tokens_total,
                tokens_per_s=tokens / seconds,
                flops=result.flops,
                flops_total=self.flops_total,
                flops_per_s=result.flops / seconds,
                peak_memory_bytes=peak_memory_bytes(self.device),
                optimizer_state_bytes=optimizer_state_bytes,
            )
            if self.peak:
                record["mfu"] = record["flops_per_s"] / self.peak
            self.dense_total += result.dense_flops
            if regime is not None:
                record.update(regime=regime, flops_saved=1.0 - self.flops_total / self.dense_total)
        if val_loss is not None:
            record.update(val_loss=val_loss, val_ppl=_perplexity(val_loss))
        if self._progress is not None:
            fields = {}
            if result is not None:
                fields = {"loss": result.loss, "tps": record["tokens_per_s"]}
            self._progress.update(self._task, completed=step, **fields)
            if val_loss is not None:
                self._progress.console.print(
                    f"step {step}: val_loss {val_loss:.4f}  ppl {record['val_ppl']:.2f}"
                    + (_describe_regime(record) if "regime" in record else "")
                )
        if self.enabled and (log or val_loss is not None):
            self.history.append(record)
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=step)
        return record

    def close(self) -> None:
        """Stop the progress bar and close the outputs."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def plot(self, path: Path, title: str) -> Path:
        return plot_losses(self.history, path, title)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records a run wrote to `<run dir>/metrics.jsonl`, in order."""
    lines = [line for line in (Path(run_dir) / METRICS).read_text().splitlines() if line]
    records = [json.loads(line) for line in lines[:-1]]
    try:  # the last line may be torn: its writer killed in the middle of it
        return records + [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        return records


def _perplexity(loss: float) -> float:
    return float(torch.tensor(loss).exp()) if loss < 50 else float("inf")


def _ema(values, decay: float) -> list[float]:
    out, avg = [], values[0]
    for v in values:
        avg = decay * avg + (1 - decay) * v
        out.append(avg)
    return out


def plot_losses(history: list[dict], path: Path, title: str) -> Path:
    """Training and validation loss against step, written as PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
        ax.plot(
            steps,
            _ema(losses, 0.9),
            color="tab:blue",
            linewidth=1.6,
            label="train loss (moving average)",
        )
    if val:
        ax.plot(
            *zip(*val, strict=True),
            "o-",
            color="tab:orange",
            label="validation loss",
            linewidth=1.6,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def _describe_regime(record: dict) -> str:
    kept = "  ".join(f"{k} {v:.2f}" for k, v in record["regime"].items() if k != "stage")
    stage = f"stage {record['regime']['stage']}: " if "stage" in record["regime"] else ""
    return f"  | {stage}{kept}; FLOPs saved so far {100 * record['flops_saved']:.1f}%"
