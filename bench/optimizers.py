"""Low-rank optimizers side by side: projector refresh time, optimizer step time, and quality.

    python bench/optimizers.py [--refresh-presets llama_60m,llama_130m,llama_350m,llama_1b]
                               [--step-presets llama_60m,llama_130m] [--steps 300] [--json out.json]

1. Refresh: one transformer block of each GaLore-family preset (wq, wk, wv, wo, w1, w2, w3 at
   the paper's rank), gradients with a decaying spectrum shared by all heads (a few strong
   directions plus noise). Time of a refresh, measured through the optimizers' own step (a step
   that refreshes minus one that does not), for GaLore with an exact SVD, GaLore+ with
   randomized subspace iteration, and GaLore+ with cross-head projection for the attention
   weights (RSI for the MLP). `captured` is the gradient energy the new basis keeps, relative to
   the exact SVD's (1.00 = as good as the exact top-r subspace).
2. Step: the whole optimizer step of AdamW (torch), galore-torch, skipjack GaLore and GaLore+ on
   every parameter of the preset, refresh amortised over T=200 steps, and the optimizer state.
3. Quality: the default job (`tiny` on the built-in corpus) for `--steps` steps with
   optim=adamw, galore and galore_plus as shipped: validation loss and optimizer state.
4. Fine-tuning (`--finetune`): one block of Llama-2-7B's shape (dim 4096, 32 heads, ffn 11008)
   under a small vocabulary, fine-tuned on built-in corpus text (`--finetune-tokens` per step):
   real gradients through the model. For GaLore and GaLore+ (as shipped, residual warm-up 0 so
   every step is a steady one): the forward and backward, an optimizer step, a refresh (the
   first step, which refreshes every basis, minus a plain one), each measured; then the time of
   one refresh cycle of `--finetune-gap` steps (a refresh plus gap steps), the refresh's share of
   it, and the ratio.

The step and refresh sections' gradients are synthetic: one low-rank signal that every head
shares, which flatters cross-head projection's `captured`. bench/cross_head.py measures the
approximation on real gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tables import markdown  # bench/tables.py

from skipjack.batch import IGNORE_INDEX
from skipjack.config import ModelConfig, OptimConfig
from skipjack.data.indexed import sample_batch
from skipjack.data.source import build_datasets
from skipjack.models.llama import Llama, preset
from skipjack.optim.builder import LOW_RANK, build_optimizer, galore_rank, planned_state_bytes
from skipjack.optim.galore import GaLoreAdamW, top_subspace
from skipjack.optim.galore_plus import GaLorePlusAdamW
from skipjack.parallel.shard_spec import HeadLayout, ShardSpec, set_spec
from skipjack.testing.cli import compose_job
from skipjack.trainer.metrics import read_metrics

REFRESH_METHODS = {  # name -> (optimizer, group options for attention, for the MLP)
    "exact SVD (GaLore)": (GaLoreAdamW, {"svd": "exact"}, {"svd": "exact"}),
    "RSI": (GaLorePlusAdamW, {"svd": "rsi"}, {"svd": "rsi"}),
    "RSI + cross-head (GaLore+)": (GaLorePlusAdamW, {"svd": "rsi", "heads": 1}, {"svd": "rsi"}),
}


def _block_matrices(name: str) -> list[tuple[str, tuple[int, int], HeadLayout | None]]:
    cfg = preset(name)
    hd = cfg.dim // cfg.n_heads
    q, kv = HeadLayout(0, cfg.n_heads, hd), HeadLayout(0, cfg.n_kv_heads, hd)
    return [
        ("wq", (cfg.n_heads * hd, cfg.dim), q),
        ("wk", (cfg.n_kv_heads * hd, cfg.dim), kv),
        ("wv", (cfg.n_kv_heads * hd, cfg.dim), kv),
        ("wo", (cfg.dim, cfg.n_heads * hd), HeadLayout(1, cfg.n_heads, hd)),
        ("w1", (cfg.ffn_dim, cfg.dim), None),
        ("w2", (cfg.dim, cfg.ffn_dim), None),
        ("w3", (cfg.ffn_dim, cfg.dim), None),
    ]


def _gradient(shape: tuple[int, int], gen) -> torch.Tensor:
    """64 decaying strong directions plus noise. A low-rank matrix has one row space and one
    column space, so every head's slice sees the same model-dimension subspace: the structure
    cross-head projection relies on."""
    m, n = shape
    k = 64
    strength = 0.9 ** torch.arange(k, dtype=torch.float32)
    left, right = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    return (left * strength) @ right / k**0.5 + 0.05 * torch.randn(m, n, generator=gen)


def _refresh(kind, options: dict, grad: torch.Tensor, heads, rank: int, repeats: int = 3):
    """Seconds of one refresh (the median step that refreshes minus the median one that does
    not), the new basis and its side."""
    medians = {}
    for gap in (1, 10**9):
        p = torch.nn.Parameter(torch.zeros_like(grad))
        set_spec(p, ShardSpec(tuple(grad.shape), heads=heads))
        optimizer = kind([{"params": [p], "rank": rank, "update_proj_gap": gap, **options}])
        p.grad = grad
        optimizer.step()  # first step: a refresh in both
        medians[gap] = statistics.median(_seconds(optimizer.step) for _ in range(repeats))
    side = optimizer.projection_of(p).side
    return max(0.0, medians[1] - medians[10**9]), optimizer.state[p]["projector"], side


def _captured(grad: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    """Gradient energy kept by `basis`, relative to the exact top subspace of the same size."""
    exact = top_subspace(grad, basis.shape[1], side)
    project = (lambda b: b.T @ grad) if side == "left" else (lambda b: grad @ b)
    return float(project(basis).norm() ** 2 / project(exact).norm() ** 2)


def bench_refresh(presets: list[str]) -> list[dict]:
    rows = []
    for name in presets:
        rank = galore_rank(OptimConfig().galore, preset(name))
        gen = torch.Generator().manual_seed(0)
        seconds = dict.fromkeys(REFRESH_METHODS, 0.0)
        captured = {method: [] for method in REFRESH_METHODS}
        for _, shape, heads in _block_matrices(name):
            grad = _gradient(shape, gen)
            for method, (kind, attention, mlp) in REFRESH_METHODS.items():
                options = attention if heads is not None else mlp
                took, basis, side = _refresh(kind, options, grad, heads, rank)
                seconds[method] += took
                captured[method].append(_captured(grad, basis, side))
        for method in REFRESH_METHODS:
            rows.append(
                {
                    "preset": name,
                    "rank": rank,
                    "method": method,
                    "block_refresh_s": seconds[method],
                    "speedup": seconds["exact SVD (GaLore)"] / seconds[method],
                    "captured_min": min(captured[method]),
                }
            )
            print(rows[-1], flush=True)
    return rows


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _reference_galore(model: torch.nn.Module, rank: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW as Reference
    named = list(model.named_parameters())
    low = [p for n, p in named if p.ndim == 2 and LOW_RANK.search(n)]
    rest = [p for n, p in named if not (p.ndim == 2 and LOW_RANK.search(n))]
    groups = [
        {"params": low, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
        {"params": rest},
    ]  # the same weight decay as the shipped configs', on every parameter
    return Reference(groups, lr=1e-3, weight_decay=0.1, no_deprecation_warning=True)


def _reference_state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "ortho_matrix"):  # the reference's projector object
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
    return total


STEP_OPTIMIZERS = ("AdamW (torch)", "galore-torch", "skipjack GaLore", "skipjack GaLore+")


def _optimizer(label: str, model: torch.nn.Module, cfg, rank: int) -> torch.optim.Optimizer:
    if label == "galore-torch":
        return _reference_galore(model, rank)
    optim = {
        "AdamW (torch)": compose_job().optim,
        "skipjack GaLore": compose_job("optim=galore").optim,
        "skipjack GaLore+": compose_job("optim=galore_plus").optim,
    }[label]
    return build_optimizer(model, optim, torch.device("cpu"), cfg)


def bench_step(presets: list[str], plain_steps: int = 7) -> list[dict]:
    """Whole optimizer step (the median of `plain_steps`), a refresh every T=200 steps amortised
    into it."""
    rows = []
    for name in presets:
        cfg = preset(name)
        model = Llama(cfg).init_weights(0)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        rank = galore_rank(OptimConfig().galore, cfg)
        results = {}
        for label in STEP_OPTIMIZERS:
            optimizer = _optimizer(label, model, cfg, rank)
            started = time.perf_counter()
            optimizer.step()  # the first step refreshes every basis (GaLore family)
            first = time.perf_counter() - started
            plain = statistics.median(_seconds(optimizer.step) for _ in range(plain_steps))
            amortised = plain + max(0.0, first - plain) / 200 if label != "AdamW (torch)" else plain
            state = (
                _reference_state_bytes(optimizer)
                if label == "galore-torch"
                else planned_state_bytes(optimizer)
            )
            results[label] = {"step_s": amortised, "refresh_s": first - plain, "state": state}
            del optimizer
        for label, r in results.items():
            rows.append(
                {
                    "preset": name,
                    "optimizer": label,
                    "step_s": r["step_s"],
                    "vs_adamw": r["step_s"] / results["AdamW (torch)"]["step_s"],
                    "refresh_s": r["refresh_s"] if label != "AdamW (torch)" else 0.0,
                    "state_mib": r["state"] / 2**20,
                }
            )
            print(rows[-1], flush=True)
    return rows


def bench_quality(steps: int, workdir: Path) -> list[dict]:
    """The default job with each optimizer as shipped; the CLI, so the configs are the real ones."""
    rows = []
    for name in ("adamw", "galore", "galore_plus"):
        run_dir = workdir / name
        command = [
            sys.executable, "-m", "skipjack.cli", "train", f"optim={name}",
            f"train.steps={steps}", f"train.output_dir={run_dir}", f"hydra.run.dir={run_dir}",
            "logging.wandb=false", "logging.progress=false", "logging.plot=false",
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        records = read_metrics(run_dir)
        last = [r for r in records if "val_loss" in r][-1]
        trained = [r for r in records if "optimizer_state_bytes" in r][-1]
        rows.append(
            {
                "optimizer": name,
                "val_loss": last["val_loss"],
                "state_mib": trained["optimizer_state_bytes"] / 2**20,
                "run_s": seconds,
            }
        )
        print(rows[-1], flush=True)
    galore = next(r["val_loss"] for r in rows if r["optimizer"] == "galore")
    for row in rows:
        row["vs_galore"] = row["val_loss"] / galore
    return rows


def bench_finetune(rank: int, gap: int, tokens: int) -> list[dict]:
    """One 7B-shaped block fine-tuned on corpus text: measured parts of a refresh cycle of
    `gap` steps. A refresh is the first step (it refreshes every basis) minus the second; for
    GaLore+ the first step also picks its residual entries (warm-up 0), counted against it."""
    job = compose_job()
    cfg = ModelConfig(
        name="llama2_7b_block", dim=4096, n_layers=1, n_heads=32, n_kv_heads=32,
        ffn_dim=11008, vocab_size=job.model.vocab_size, max_seq_len=tokens,
    )  # fmt: skip
    train, _, _ = build_datasets(job.data, tokens, job.train.seed, (3, 1))
    model = Llama(cfg).init_weights(0)
    rows = []
    for label, name in (("GaLore", "galore"), ("GaLore+", "galore_plus")):
        optim = compose_job(
            f"optim={name}", f"optim.galore.rank={rank}", f"optim.galore.update_proj_gap={gap}",
            *(["optim.galore.residual_warmup=0"] if name == "galore_plus" else []),
        ).optim  # fmt: skip
        optimizer = build_optimizer(model, optim, torch.device("cpu"), cfg)
        backward, steps = [], []
        for i in range(3):
            batch = sample_batch(train, [i])
            backward.append(_seconds(lambda b=batch: _loss(model, b).backward()))
            steps.append(_seconds(optimizer.step))
            optimizer.zero_grad(set_to_none=True)
        plain_step = min(steps[1:])
        fwd_bwd = statistics.median(backward)
        refresh = max(0.0, steps[0] - plain_step)
        cycle = refresh + gap * (fwd_bwd + plain_step)
        rows.append(
            {
                "optimizer": label, "rank": rank, "gap": gap, "tokens": tokens,
                "fwd_bwd_s": fwd_bwd, "step_s": plain_step, "refresh_s": refresh,
                "cycle_s": cycle, "refresh_share": refresh / cycle,
            }
        )  # fmt: skip
        print(rows[-1], flush=True)
        del optimizer
    for row in rows:
        row["cycle_vs_galore"] = rows[0]["cycle_s"] / row["cycle_s"]
    return rows


def _loss(model: torch.nn.Module, batch) -> torch.Tensor:
    logits = model(batch.tokens)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE_INDEX
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--refresh-presets", default="llama_60m,llama_130m,llama_350m,llama_1b")
    parser.add_argument("--step-presets", default="llama_60m,llama_130m")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the quality runs")
    parser.add_argument("--finetune", action="store_true", help="the 7B-block fine-tuning cycle")
    parser.add_argument("--finetune-rank", type=int, default=128)
    parser.add_argument("--finetune-gap", type=int, default=500, help="GaLore's fine-tuning gap")
    parser.add_argument("--finetune-tokens", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {}
    if args.finetune:
        results["finetune"] = bench_finetune(
            args.finetune_rank, args.finetune_gap, args.finetune_tokens
        )
    if args.refresh_presets:
        results["refresh"] = bench_refresh(args.refresh_presets.split(","))
    if args.step_presets:
        results["step"] = bench_step(args.step_presets.split(","))
    if args.steps:
        with tempfile.TemporaryDirectory() as workdir:
            results["quality"] = bench_quality(args.steps, Path(workdir))
    print()
    columns = {
        "refresh": ["preset", "rank", "method", "block_refresh_s", "speedup", "captured_min"],
        "step": ["preset", "optimizer", "step_s", "vs_adamw", "refresh_s", "state_mib"],
        "quality": ["optimizer", "val_loss", "vs_galore", "state_mib", "run_s"],
        "finetune": [
            "optimizer", "rank", "gap", "tokens", "fwd_bwd_s", "step_s", "refresh_s", "cycle_s",
            "refresh_share", "cycle_vs_galore",
        ],
    }  # fmt: skip
    for part, rows in results.items():
        print(f"## {part}\n\n{markdown(rows, columns[part])}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
