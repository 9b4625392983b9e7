"""`skipjack eval` through the CLI: a checkpoint's validation loss in another layout, and with
stages omitted."""

import json

import pytest

from skipjack.testing.cli import run_skipjack, run_under_torchrun
from skipjack.trainer.metrics import read_metrics

pytestmark = pytest.mark.slow

QUIET = ("logging.plot=false", "logging.progress=false")


def test_eval_reproduces_the_last_validation_and_omits_stages(tmp_path):
    run_skipjack(
        "train", "experiment=smoke", *QUIET, "train.steps=4", "train.val_interval=4",
        "checkpoint=sharded", "checkpoint.interval=4", "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    last = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r][-1]

    def evaluate(name, *overrides, nproc=1):
        args = ("eval", "experiment=smoke", "checkpoint.resume=run", *overrides)
        args += (f"hydra.run.dir={name}",)
        if nproc == 1:
            out = run_skipjack(*args, cwd=tmp_path).stdout
        else:
            out = run_under_torchrun(*args, nproc=nproc, cwd=tmp_path).stdout
        assert "skipjack eval: " in out
        return json.loads((tmp_path / name / "eval.json").read_text())

    whole = evaluate("whole")
    assert whole["val_loss"] == last and whole["layers"] == [0, 1, 2, 3]
    half = evaluate("half", "eval.stages=[0,2]", "eval.num_stages=4", "parallel.pp=2", nproc=2)
    assert half["layers"] == [0, 2] and half["val_loss"] != whole["val_loss"]
    same = evaluate("same", "eval.layers=[0,2]")
    assert same["val_loss"] == pytest.approx(half["val_loss"], rel=1e-5)
    assert same["perplexity"] == pytest.approx(2.718281828 ** same["val_loss"], rel=1e-6)
