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
    assert "MiB of state on rank 0; kernels: torch rms_norm, " in result.stdout
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


def test_sft_of_a_hugging_face_llama_at_tp2_exports_what_transformers_reloads(tmp_path):
    """A random transformers Llama with its tokenizer; a generated instruction set tokenized by
    `skipjack preprocess kind=sft`; fine-tuned 3 steps on it at tp=2 under torchrun
    (experiment=sft_from_hf), exported with `skipjack convert export`, reloaded by transformers:
    its logits are skipjack's of the checkpoint, and the weights moved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from skipjack.checkpoint.marker import marked_model
    from skipjack.checkpoint.sharded import read_model
    from skipjack.data.tokenizer import EOD, train_bpe
    from skipjack.models.llama import Llama

    records = [
        {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
        for a in range(8)
        for b in range(8)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    tokenizer = train_bpe([r["prompt"] + " " + r["response"] for r in records], 300)
    hf = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, eos_token=EOD).save_pretrained(hf)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf)
    run_skipjack(
        "preprocess", "kind=sft", "inputs=[train.jsonl]", "output_prefix=data/chat",
        f"tokenizer={hf}", cwd=tmp_path,
    )  # fmt: skip
    run_skipjack(
        "train", "experiment=sft_from_hf", f"model.init_from={hf}",
        "data.paths=[data/chat.sft.npz]",
        "launch=torchrun", "launch.nproc_per_node=2", "parallel.tp=2", "train.steps=3",
        "train.global_batch_size=4", "train.seq_len=64", "train.val_interval=3",
        "train.val_batches=1", "optim.lr=1e-3", "optim.warmup_steps=0", "checkpoint.interval=3",
        "logging.wandb=false", "logging.plot=false", "hydra.run.dir=run",
        cwd=tmp_path,
    )  # fmt: skip
    step = tmp_path / "run" / "checkpoints" / "step-0000003"
    run_skipjack("convert", "export", str(step), "exported", cwd=tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    model = Llama(marked_model(step)).init_weights(0)
    with torch.no_grad():
        for name, value in read_model(str(step)).items():
            model.get_parameter(name).copy_(value)
        tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(reloaded.eval()(tokens).logits, model.eval()(tokens))
        original = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32)
        assert not torch.equal(
            original.model.layers[0].self_attn.q_proj.weight,
            reloaded.model.layers[0].self_attn.q_proj.weight,
        )
