"""SkipPipe through the CLI under plain torchrun, as a user runs it."""

import pytest

from skipjack.testing.cli import run_under_torchrun
from skipjack.trainer.metrics import read_metrics

pytestmark = pytest.mark.slow

SHORT = [
    *("experiment=smoke", "logging.plot=false", "logging.progress=false"),
    *("train.steps=4", "train.val_interval=4", "train.val_batches=1"),
]


def losses(tmp_path, name: str, nproc: int, *overrides: str) -> tuple[dict, dict, str]:
    run = tmp_path / name
    result = run_under_torchrun(
        "train", *SHORT, *overrides, f"hydra.run.dir={name}", nproc=nproc, cwd=tmp_path
    )
    rows = read_metrics(run)
    steps = {r["step"]: r["loss"] for r in rows if "loss" in r}
    flops = {r["step"]: r["flops"] for r in rows if "loss" in r}
    return steps, flops, result.stdout


def test_skip_ratio_zero_reproduces_the_plain_pipeline_bitwise(tmp_path):
    """With nothing to skip or reorder, the head on the data node and the schedule built from
    routes give the plain pipeline's losses bitwise (dp=2 x pp=2)."""
    plain, _, _ = losses(tmp_path, "plain", 4, "parallel.pp=2")
    skippipe, _, out = losses(tmp_path, "sp", 4, "parallel.pp=2", "parallel.skippipe.enabled=true")
    assert "SkipPipe: paths through 2 of 2 stages" in out
    assert sorted(plain) == [1, 2, 3, 4] and skippipe == plain


def test_skipping_paths_train_under_geo_emulation_and_resume_exactly(tmp_path):
    """pp=3 with a third of the stages skipped, one swap allowed, links of the geo profile, the
    whole pipeline every other step: the loss falls, the skipping steps count a third fewer
    block FLOPs than the whole ones, and a resume from step 2 continues bitwise (the paths come
    back from the checkpoint)."""
    overrides = [
        *("parallel.pp=3", "parallel.skippipe.enabled=true", "parallel.skippipe.skip_ratio=0.34"),
        *("parallel.skippipe.max_swaps=1", "parallel.skippipe.memory=2"),
        *("parallel.skippipe.full_pipeline_every=2", "parallel.skippipe.network=geo"),
        *("model.n_layers=3", "checkpoint=sharded", "checkpoint.interval=2"),
    ]
    steps, flops, out = losses(tmp_path, "skip", 3, *overrides)
    assert "SkipPipe: paths through 2 of 3 stages" in out and "network geo" in out
    assert steps[4] < steps[1]
    assert flops[1] == flops[3] < flops[2] == flops[4]  # steps 2 and 4 run whole pipelines
    step2 = "checkpoint.resume=skip/checkpoints/step-0000002"
    resumed, _, out = losses(tmp_path, "resumed", 3, *overrides, step2)
    assert "(step 2)" in out and resumed == {3: steps[3], 4: steps[4]}


def test_skipping_paths_under_tensor_parallelism_match_tp1(tmp_path):
    """The same paths (planned at a fixed compute speed) with tp=2 inside every stage give the
    losses of tp=1."""
    overrides = [
        *("parallel.pp=3", "parallel.skippipe.enabled=true", "parallel.skippipe.skip_ratio=0.34"),
        *("parallel.skippipe.max_swaps=1", "parallel.skippipe.compute_tflops=1"),
        *("model.n_layers=3", "train.steps=3", "train.val_interval=3"),
    ]
    tp1, _, _ = losses(tmp_path, "tp1", 3, *overrides)
    tp2, _, _ = losses(tmp_path, "tp2", 6, *overrides, "parallel.tp=2")
    assert tp1.keys() == tp2.keys() == {1, 2, 3}
    assert all(abs(tp2[s] - tp1[s]) <= 1e-4 * tp1[s] for s in tp1)
