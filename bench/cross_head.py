"""GaLore+'s two readings of cross-head projection on real gradients, against GaLore.

    python bench/cross_head.py [--models tiny,llama_60m] [--at 0,100,300] [--quality-steps 300]
                               [--quality-60m-steps 100] [--coverage-steps 0] [--gap 40]
                               [--set optim.galore.update_proj_gap=50] [--json out.json]

1. Approximation: a model trains with AdamW on the built-in corpus (the default job's data,
   batch 8 x 256); at the steps `--at` the gradient of every attention weight (wq, wk, wv, wo of
   every layer) is taken, and each optimizer's own first refresh (the code the trainer runs)
   gives its projection at the preset's GaLore rank: GaLore (exact SVD of the whole matrix),
   GaLore+ `cross_head=model` (one model-side basis from drawn heads, RSI) and GaLore+
   `cross_head=head` (one head-side basis from one drawn head, RSI, applied to every head).
   Reported: the gradient energy each misses, of the whole matrix and per head (the mean over
   heads of |G_h - approx_h|^2 / |G_h|^2), and each one's state bytes.
2. Quality: the default job (`tiny`) and a short `llama_60m` run through the CLI with optim=galore,
   optim=galore_plus under each reading with sparse residuals off, and galore_plus as shipped
   (`--runs` picks some; `--set` adds overrides to every run): final validation loss,
   relative to GaLore's.
3. Residual set (`--coverage-steps` > 0): on the attention gradients of every step of the
   AdamW run, GaLore+ as shipped refreshing every `--gap` steps, with the sparse residual
   entries fixed after the first warm-up or re-chosen after each refresh
   (`residual_rebuild`): the share of the residual's energy |G - back(project(G))|^2 that the
   entries hold, averaged over the steps before the first refresh and over those after it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tables import markdown  # bench/tables.py

from skipjack.batch import IGNORE_INDEX
from skipjack.config import OptimConfig
from skipjack.data.indexed import sample_batch
from skipjack.data.source import build_datasets
from skipjack.models.llama import Llama
from skipjack.optim.builder import galore_rank, low_rank_options
from skipjack.optim.galore import GaLoreAdamW
from skipjack.optim.galore_plus import GaLorePlusAdamW
from skipjack.parallel.shard_spec import set_spec, spec_of
from skipjack.testing.cli import compose_job
from skipjack.trainer.metrics import read_metrics

READINGS = {  # name -> (optimizer, its group options)
    "GaLore (exact SVD)": (GaLoreAdamW, {"svd": "exact"}),
    **{
        f"GaLore+ cross_head={side}": (
            GaLorePlusAdamW,
            {"svd": "rsi", "heads": 1, "cross_head": side},
        )
        for side in ("model", "head")
    },
}
BATCH, SEQ = 8, 256


def attention_gradients(name: str, at: list[int], lr: float):
    """Gradients of every attention weight at the steps `at` of an AdamW run on the corpus
    ({step: {name: gradient}}), and the model."""
    job = compose_job(f"model={name}")
    train, _, _ = build_datasets(job.data, SEQ, job.train.seed, (BATCH * (max(at) + 1), BATCH))
    torch.manual_seed(0)
    model = Llama(job.model).init_weights(job.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    captured = {}
    for step in range(max(at) + 1):
        batch = sample_batch(train, range(step * BATCH, (step + 1) * BATCH))
        logits = model(batch.tokens)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        if step in at:
            captured[step] = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if ".attention." in n and n.endswith(".weight")
            }
            print(f"{name}: gradients of step {step} (loss {loss.item():.3f})", flush=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return captured, model


def _missed(grad: torch.Tensor, approx: torch.Tensor, heads) -> tuple[float, float]:
    """(whole-matrix, mean per-head) share of the gradient energy the approximation misses."""
    whole = float((grad - approx).norm() ** 2 / grad.norm() ** 2)
    g = grad.unflatten(heads.dim, (heads.n_heads, heads.head_dim))
    a = approx.unflatten(heads.dim, (heads.n_heads, heads.head_dim))
    other = (1, 2) if heads.dim == 0 else (0, 2)
    per_head = (g - a).pow(2).sum(other) / g.pow(2).sum(other).clamp_min(1e-30)
    return whole, float(per_head.mean())


def approximation(name: str, at: list[int], lr: float) -> list[dict]:
    captured, model = attention_gradients(name, at, lr)
    specs = {n: spec_of(p) for n, p in model.named_parameters()}
    rank = galore_rank(OptimConfig().galore, compose_job(f"model={name}").model)
    rows = []
    for step, grads in captured.items():
        for reading, (kind, options) in READINGS.items():
            whole, per_head, state = [], [], 0
            for weight, grad in grads.items():
                p = set_spec(torch.nn.Parameter(torch.zeros_like(grad)), specs[weight])
                optimizer = kind([{"params": [p], "rank": rank, **options}], names={p: weight})
                p.grad = grad
                optimizer.step()
                proj, basis = optimizer.projection_of(p), optimizer.state[p]["projector"]
                approx = proj.back(proj.project(grad, basis), basis)
                w, h = _missed(grad, approx, specs[weight].heads)
                whole.append(w)
                per_head.append(h)
                state += optimizer.planned_state_bytes()
            rows.append(
                {
                    "model": name,
                    "step": step,
                    "rank": rank,
                    "reading": reading,
                    "missed_whole": sum(whole) / len(whole),
                    "missed_per_head": sum(per_head) / len(per_head),
                    "state_mib": state / 2**20,
                }
            )
            print(rows[-1], flush=True)
    return rows


QUALITY = {  # label -> optimizer overrides
    "GaLore": ["optim=galore"],
    "GaLore+ cross_head=model": [
        "optim=galore_plus", "optim.galore.cross_head=model", "optim.galore.density=0",
    ],
    "GaLore+ cross_head=head": [
        "optim=galore_plus", "optim.galore.cross_head=head", "optim.galore.density=0",
    ],
    "GaLore+ as shipped": ["optim=galore_plus"],  # cross_head=model with sparse residuals
    "GaLore+ residuals rebuilt": ["optim=galore_plus", "optim.galore.residual_rebuild=true"],
}  # fmt: skip


def residual_coverage(name: str, steps: int, gap: int, lr: float) -> list[dict]:
    captured, model = attention_gradients(name, list(range(steps)), lr)
    specs = {n: spec_of(p) for n, p in model.named_parameters()}
    job = compose_job(f"model={name}", "optim=galore_plus")
    options = {**low_rank_options(job.optim, job.model), "update_proj_gap": gap}
    warmup, rows = options["residual_warmup"], []
    for rebuild in (False, True):
        phases = {"before": [], "after": []}  # the first refresh after step 0 divides them
        for weight in captured[0]:
            p = set_spec(torch.nn.Parameter(torch.zeros_like(captured[0][weight])), specs[weight])
            group = {"params": [p], **options, "residual_rebuild": rebuild}
            optimizer = GaLorePlusAdamW([group], names={p: weight})
            proj, state = optimizer.projection_of(p), optimizer.state[p]
            for step in range(steps):
                grad = captured[step][weight]
                p.grad = grad
                optimizer.step()
                if step < warmup:
                    continue
                basis = state["projector"]
                residual = (grad - proj.back(proj.project(grad, basis), basis)).flatten()
                held = residual[state["residual_index"]].pow(2).sum() / residual.pow(2).sum()
                phases["before" if step < gap else "after"].append(float(held))
        rows.append(
            {
                "model": name,
                "gap": gap,
                "residual_rebuild": rebuild,
                **{f"held_{k}": sum(v) / max(1, len(v)) for k, v in phases.items()},
            }
        )
        print(rows[-1], flush=True)
    return rows


def quality(
    model: str, steps: int, workdir: Path, labels: list[str], extra: list[str]
) -> list[dict]:
    rows = []
    for label in labels:
        overrides = QUALITY[label] + extra
        run_dir = workdir / f"{model}-{len(rows)}"
        command = [
            sys.executable, "-m", "skipjack.cli", "train", f"model={model}", *overrides,
            f"train.steps={steps}", f"train.val_interval={steps}", "train.val_batches=8",
            f"train.output_dir={run_dir}", f"hydra.run.dir={run_dir}",
            "logging.wandb=false", "logging.progress=false", "logging.plot=false",
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, text=True)
        records = read_metrics(run_dir)
        last = [r for r in records if "val_loss" in r][-1]
        rows.append(
            {
                "model": model,
                "steps": steps,
                "optimizer": label,
                "val_loss": last["val_loss"],
                "run_s": time.perf_counter() - started,
            }
        )
        print(rows[-1], flush=True)
    galore = next((r["val_loss"] for r in rows if r["optimizer"] == "GaLore"), None)
    for row in rows:
        row["vs_galore"] = row["val_loss"] / galore if galore else float("nan")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,llama_60m")
    parser.add_argument("--at", default="0,50,200", help="steps whose gradients are compared")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quality-steps", type=int, default=300, help="default job (0: skip)")
    parser.add_argument("--quality-60m-steps", type=int, default=100, help="llama_60m (0: skip)")
    parser.add_argument("--runs", default=",".join(QUALITY), help="which quality runs")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    parser.add_argument("--coverage-steps", type=int, default=0, help="residual set (0: skip)")
    parser.add_argument("--gap", type=int, default=40, help="refresh gap of the residual set")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    at = [int(s) for s in args.at.split(",") if s]
    models = [name for name in args.models.split(",") if name]
    results = {"approximation": [], "quality": [], "coverage": []}
    for name in models if at else []:
        results["approximation"] += approximation(name, at, args.lr)
    with tempfile.TemporaryDirectory() as workdir:
        for model, steps in (("tiny", args.quality_steps), ("llama_60m", args.quality_60m_steps)):
            if steps:
                runs = args.runs.split(",")
                results["quality"] += quality(model, steps, Path(workdir), runs, args.set)
    for name in models if args.coverage_steps else []:
        results["coverage"] += residual_coverage(name, args.coverage_steps, args.gap, args.lr)
    columns = {
        "approximation": [
            "model", "step", "rank", "reading", "missed_whole", "missed_per_head", "state_mib",
        ],
        "quality": ["model", "steps", "optimizer", "val_loss", "vs_galore", "run_s"],
        "coverage": ["model", "gap", "residual_rebuild", "held_before", "held_after"],
    }  # fmt: skip
    print()
    for part, rows in results.items():
        if rows:
            print(f"## {part}\n\n{markdown(rows, columns[part], 4)}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
