"""The default job, shortened, through the CLI as a user runs it; torchrun with 2 ranks, started
by skipjack and plain."""

import json
import os

import pytest
from omegaconf import OmegaConf

from skipjack.checkpoint.marker import MARKER, complete_checkpoints, verify
from skipjack.testing.cli import run_skipjack, run_under_torchrun
from skipjack.trainer.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_shortened_default_job_through_the_cli(tmp_path):
    result = run_skipjack("train", "experiment=smoke", "logging.wandb=true", cwd=tmp_path)
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    rows = read_metrics(run_dir)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 1.0
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    keys = ("loss", "lr", "tokens_per_s", "flops_total", "flops_per_s", "peak_memory_bytes")
    for key in (*keys, "optimizer_state_bytes"):
        assert all(key in r for r in steps), key
    assert steps[-1]["flops_total"] > steps[0]["flops_total"] > 0
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.train.steps == 40 and saved.data.cache_dir == os.environ["SKIPJACK_CACHE"]
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert list((run_dir / "wandb").glob("offline-run-*"))
    for name in ("config.yaml", "metrics.jsonl", "loss.png"):
        assert str(run_dir / name) in result.stdout
    assert "[INFO]" not in result.stdout + result.stderr  # no dependency's INFO lines


def test_resume_through_the_cli_continues_the_run_exactly(tmp_path):
    common = ["experiment=smoke", "logging.plot=false", "checkpoint=sharded"]
    run_skipjack("train", *common, "checkpoint.interval=20", "hydra.run.dir=a", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*")) == [
        "step-0000020",
        "step-0000040",
    ]
    step20 = tmp_path / "a" / "checkpoints" / "step-0000020"
    resume = f"checkpoint.resume={step20}"
    result = run_skipjack("train", *common, resume, "hydra.run.dir=b", cwd=tmp_path)
    assert f"resumed from {step20} (step 20)" in result.stdout
    straight = {r["step"]: r for r in read_metrics(tmp_path / "a") if "loss" in r}
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "b") if "loss" in r}
    assert sorted(resumed) == list(range(21, 41))
    assert all(resumed[s]["loss"] == straight[s]["loss"] for s in resumed)
    assert resumed[40]["tokens"] == straight[40]["tokens"]
    assert resumed[40]["flops_total"] == straight[40]["flops_total"]
    # the same run directory again: `auto` finds step 40, the last step, and has nothing to do
    again = run_skipjack("train", *common, "hydra.run.dir=a", cwd=tmp_path)
    assert "resumed from" in again.stdout and "(step 40)" in again.stdout


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.dp=2"],
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
        # GaLore+ on tp shards, with every feature on within 12 steps, under EST's subnets
        ["parallel.tp=2", "optim=galore_plus", "optim.galore.update_proj_gap=4", "regime=est"],
        ["parallel.pp=2", "parallel.partition=redistribute"],
        ["parallel.pp=2", "parallel.vocab_parallel=alg2"],
    ],
)
def test_launch_torchrun_two_ranks_on_preprocessed_data(tmp_path, layout):
    docs = [f"def f{i}(a, b):\n    return a * {i} + b  # doc {i}\n" * 20 for i in range(300)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    run_skipjack(
        "preprocess",
        "inputs=[corpus.jsonl]",
        "output_prefix=data/corpus",
        "tokenizer_vocab_size=512",
        cwd=tmp_path,
    )
    result = run_skipjack(
        "train",
        "launch=torchrun",
        "launch.nproc_per_node=2",
        *layout,
        "data=indexed",
        "data.paths=[data/corpus]",
        "model.vocab_size=512",
        "train.steps=12",
        "train.val_interval=6",
        "train.seq_len=64",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "logging.wandb=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    rows = read_metrics(tmp_path / "run")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "config.yaml").read_text().count("${")
    # rank 0 on the console, every rank's output in the run directory
    assert "[default0]:skipjack: done." in result.stdout and "[default1]" not in result.stdout
    assert "MiB of state on rank 0" in result.stdout
    logs = sorted(p.parent.name for p in (tmp_path / "run" / "logs").rglob("stdout.log"))
    assert logs == ["0", "1"]


PLAIN = [
    *("experiment=smoke", "logging.plot=false", "logging.progress=false", "parallel.tp=2"),
    *("train.steps=4", "train.val_interval=2", "checkpoint=sharded", "checkpoint.interval=2"),
]


@pytest.mark.parametrize("run_dir_given", [True, False], ids=["hydra.run.dir", "default-dir"])
def test_plain_torchrun_saves_into_one_run_directory_and_resumes_bitwise(tmp_path, run_dir_given):
    """`torchrun -m skipjack.cli train`, no skipjack launcher: every rank's shard lands in rank
    0's run directory (none in the launch directory), the last step's checkpoint is complete and
    verifies, and a resume continues the run bitwise."""

    def train(name: str, *extra: str) -> tuple:
        before = set(tmp_path.glob("outputs/*/*"))
        where = [f"hydra.run.dir={name}"] if run_dir_given else []
        result = run_under_torchrun("train", *PLAIN, *extra, *where, nproc=2, cwd=tmp_path)
        if run_dir_given:
            return tmp_path / name, result
        (run_dir,) = set(tmp_path.glob("outputs/*/*")) - before
        return run_dir, result

    a, result = train("a")
    assert "[INFO]" not in result.stdout + result.stderr  # on no rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a" if run_dir_given else "outputs"]
    saved = complete_checkpoints(a / "checkpoints")
    assert [p.name for p in saved] == ["step-0000002", "step-0000004"]
    for directory in saved:
        assert verify(directory) == int(directory.name[5:])
        files = json.loads((directory / MARKER).read_text())["files"]
        assert any(name.startswith("__1_") for name in files)  # rank 1's shard, here
    b, result = train("b", f"checkpoint.resume={saved[0]}")
    assert f"resumed from {saved[0]} (step 2)" in result.stdout
    straight = {r["step"]: r["loss"] for r in read_metrics(a) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(b) if "loss" in r}
    assert sorted(resumed) == [3, 4] and all(resumed[s] == straight[s] for s in resumed)
    if run_dir_given:  # `auto` in the same run directory: the last step's checkpoint, verified
        _, again = train("a")
        assert f"resumed from {saved[1]} (step 4)" in again.stdout
