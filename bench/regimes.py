"""Training regimes against full training, side by side in one run, through the CLI.

    python bench/regimes.py [--steps 300] [--continued 150] [--continual-lr 2e-4]
                            [--est k=v,... ... | --no-est | --base STEP_DIR] [--sat k=v ...]
                            [--json F] [--plot F]

1. **Pre-training from scratch** on the built-in corpus (the default job: `tiny`, 8 x 256 tokens
   a step, AdamW): the full model, then EST with each `--est` setting (overrides of
   `regime.est`; default: the shipped defaults).
2. **Continual pre-training** from the full run's last checkpoint (`model.init_from`, another
   data seed, `--continued` steps, a fresh LR schedule that warms up to `--continual-lr`,
   default the default job's final LR: re-warmed to the pre-training's peak, the full model's
   loss jumps by 10% and the run spends its steps recovering, not continuing): the full model,
   then SAT with each `--sat` setting (overrides of `regime.sat`). `--base`: from that
   checkpoint instead (a step directory of a run of the default job), without part 1.

Per run: training FLOPs (what the plans computed), FLOPs saved, training seconds (the steps
alone, validation excluded), tokens/s, and the final validation loss with its excess over the
full run of the same part. `--plot` draws validation loss against training FLOPs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from skipjack.atomic import replacing
from skipjack.trainer.metrics import read_metrics


def train(run_dir: Path, steps: int, overrides: list[str]) -> list[dict]:
    command = [
        sys.executable, "-m", "skipjack.cli", "train", f"train.steps={steps}",
        f"train.val_interval={max(steps // 10, 1)}", "train.val_batches=8",
        "logging.interval=1", "logging.progress=false", "logging.plot=false",
        "logging.wandb=false", f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return read_metrics(run_dir)


def summary(name: str, records: list[dict]) -> dict:
    steps = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    per_step = steps[0]["tokens"]  # tokens of one step (the run starts at step 1)
    seconds = sum(per_step / r["tokens_per_s"] for r in steps)
    return {
        "run": name,
        "flops": steps[-1]["flops_total"],
        "flops_saved": steps[-1].get("flops_saved", 0.0),
        "train_seconds": seconds,
        "tokens_per_s": steps[-1]["tokens"] / seconds,
        "val_loss": val[-1]["val_loss"],
        "curve": [(r.get("flops_total", 0.0), r["val_loss"]) for r in val],
    }


def plot(parts: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), dpi=120, squeeze=False)
    for ax, (part, rows) in zip(axes[0], parts.items(), strict=True):
        for row in rows:
            flops, losses = zip(*row["curve"], strict=True)
            ax.plot([f / 1e12 for f in flops], losses, "o-", label=row["run"], linewidth=1.4)
        ax.set_xlabel("training TFLOPs")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(part)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    with replacing(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--continued", type=int, default=150, help="0: no continual part")
    parser.add_argument("--continual-lr", type=float, default=2e-4, help="peak LR of part 2")
    parser.add_argument("--est", action="append", default=None, help="k=v,... of regime.est")
    parser.add_argument(
        "--no-est", action="store_true", help="part 1 trains only the full model (part 2's base)"
    )
    parser.add_argument("--sat", action="append", default=None, help="k=v;... of regime.sat")
    parser.add_argument(
        "--base", type=Path, help="part 2 starts from this checkpoint (step dir); no part 1"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    parts: dict[str, list[dict]] = {"pre-training": [], "continual pre-training": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        saved = ["checkpoint=sharded", f"checkpoint.interval={args.steps}"]
        pre = parts["pre-training"]
        if args.base is None:
            pre.append(summary("full", train(runs / "full", args.steps, saved)))
        for i, setting in enumerate([] if args.no_est or args.base else args.est or [""]):
            overrides = ["regime=est"] + [f"regime.est.{kv}" for kv in setting.split(",") if kv]
            name = f"EST {setting}" if setting else "EST (defaults)"
            pre.append(summary(name, train(runs / f"est{i}", args.steps, overrides)))
        base = args.base or runs / "full" / "checkpoints" / f"step-{args.steps:07d}"
        start = [f"model.init_from={base}", "train.seed=4321", f"optim.lr={args.continual_lr}"]
        continued = parts["continual pre-training"]
        if args.continued:
            continued.append(summary("full", train(runs / "cont", args.continued, start)))
        for i, setting in enumerate(args.sat or [""] if args.continued else []):
            overrides = ["regime=sat"] + [f"regime.sat.{kv}" for kv in setting.split(";") if kv]
            name = f"SAT {setting}" if setting else "SAT (defaults)"
            continued.append(
                summary(name, train(runs / f"sat{i}", args.continued, start + overrides))
            )
    parts = {part: rows for part, rows in parts.items() if rows}
    for part, rows in parts.items():
        full = rows[0]
        print(f"\n{part}")
        print(f"{'run':44s} {'TFLOPs':>8s} {'saved':>6s} {'train s':>8s} {'time':>6s} "
              f"{'tok/s':>7s} {'val loss':>8s} {'excess':>7s}")  # fmt: skip
        for row in rows:
            row["val_excess"] = row["val_loss"] / full["val_loss"] - 1.0
            row["time_ratio"] = row["train_seconds"] / full["train_seconds"]
            print(
                f"{row['run']:44s} {row['flops'] / 1e12:8.3f} {100 * row['flops_saved']:5.1f}% "
                f"{row['train_seconds']:8.1f} {row['time_ratio']:6.3f} {row['tokens_per_s']:7.0f} "
                f"{row['val_loss']:8.4f} {100 * row['val_excess']:+6.2f}%"
            )
    if args.json:
        with replacing(args.json) as tmp:
            tmp.write_text(json.dumps(parts, indent=2))
    if args.plot:
        plot(parts, args.plot)


if __name__ == "__main__":
    main()
