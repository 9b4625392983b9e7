"""Sharded checkpoints: exact resume in every layout, resharding between layouts, and what
happens with damaged, mismatched or interrupted checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from skipjack.checkpoint.marker import MARKER, complete_checkpoints, verify
from skipjack.checkpoint.sharded import CheckpointError
from skipjack.launch.env import init_distributed
from skipjack.testing import run_ranks
from skipjack.testing.reference import checkpointed_run, tiny_config

# vocab 251: padded to 252 under tp=2 and to 252 over 4 vocabulary shards
CFG = tiny_config(n_layers=4, vocab_size=251)


@pytest.mark.parametrize(
    "world,tp,pp,vocab",
    [(2, 1, 1, "none"), (2, 2, 1, "none"), (2, 1, 2, "none"), (4, 2, 2, "alg2")],
    ids=["dp2", "tp2", "pp2", "pp2xtp2-vocab"],
)
def test_resume_continues_bitwise(tmp_path, world, tp, pp, vocab):
    ckpt = str(tmp_path / "ckpt")
    straight = run_ranks(checkpointed_run, world, CFG, 20, ckpt, 10, "none", tp, pp, vocab)[0]
    step10 = os.path.join(ckpt, "step-0000010")
    resumed = run_ranks(checkpointed_run, world, CFG, 20, ckpt + "-2", 0, step10, tp, pp, vocab)[0]
    assert sorted(resumed) == list(range(11, 21))
    assert all(resumed[s] == straight[s] for s in resumed), (straight, resumed)


LAYOUTS = {  # (dp, pp, tp) -> (world, tp, pp)
    (1, 2, 2): (4, 2, 2),
    (2, 1, 2): (4, 2, 1),
    (1, 1, 1): (1, 1, 1),
    (1, 4, 1): (4, 1, 4),
    (4, 1, 1): (4, 1, 1),
    (1, 2, 1): (2, 1, 2),
}


RESHARD_STEPS = 6


def run_layout(layout, until, directory, interval, resume, vocab="none"):
    world, tp, pp = LAYOUTS[layout]
    args = (CFG, RESHARD_STEPS, directory, interval, resume, tp, pp, vocab, 8, 2, 32, until)
    return run_ranks(checkpointed_run, world, *args)[0]


def assert_same_losses(straight, resumed):
    for step, loss in resumed.items():
        assert abs(loss - straight[step]) <= 1e-6 * abs(straight[step]), (step, straight, resumed)


SOURCE = (1, 2, 2)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """(dp, pp, tp) = (1, 2, 2) for 6 steps, saving after step 2: its losses and its root."""
    root = tmp_path_factory.mktemp("source")
    return run_layout(SOURCE, RESHARD_STEPS, str(root), 2, "none"), root


@pytest.mark.parametrize("target", [(2, 1, 2), (1, 1, 1), (1, 4, 1), (4, 1, 1)])
def test_reshard_to_another_layout_and_back(source_run, tmp_path, target):
    """Saved by (dp, pp, tp) = (1, 2, 2) after step 2, steps 3 and 4 in `target` (which saves
    after 4), steps 5 and 6 back in (1, 2, 2): every loss equals that of (1, 2, 2) throughout.
    The first step after a resume sees the restored weights only; the second also sees the
    update made with the restored Adam moments, so steps 4 and 6 check the optimizer states."""
    straight, root = source_run
    there = run_layout(target, 4, str(tmp_path / "b"), 4, str(root / "step-0000002"))
    assert sorted(there) == [3, 4]
    assert_same_losses(straight, there)
    back = run_layout(SOURCE, 6, str(tmp_path / "c"), 0, str(tmp_path / "b" / "step-0000004"))
    assert sorted(back) == [5, 6]
    assert_same_losses(straight, back)


def test_vocab_parallel_checkpoint_resumes_without_it_and_back(tmp_path):
    """pp=2 with vocabulary parallelism (alg2) saves after step 2; pp=2 without it runs steps 3
    and 4 and saves; with it again, steps 5 and 6: the vocabulary shards of the embedding and
    output layer and their Adam moments reshard to the first and last stage and back."""
    straight = run_layout((1, 2, 1), RESHARD_STEPS, str(tmp_path / "a"), 2, "none", "alg2")
    there = run_layout((1, 2, 1), 4, str(tmp_path / "b"), 4, str(tmp_path / "a" / "step-0000002"))
    assert_same_losses(straight, there)
    resume = str(tmp_path / "b" / "step-0000004")
    back = run_layout((1, 2, 1), 6, str(tmp_path / "c"), 0, resume, "alg2")
    assert sorted(back) == [5, 6]
    assert_same_losses(straight, back)


def test_replicated_kv_heads_reshard_to_tp1_and_back(tmp_path):
    """One kv head at tp=2 (both ranks hold it, each writes half its rows): saved after step 2,
    steps 3 and 4 at tp=1 and steps 5 and 6 back at tp=2 give tp=2's losses; steps 4 and 6
    depend on the restored Adam moments of the replicated head too."""
    cfg = tiny_config(n_layers=2, n_kv_heads=1)

    def run(world, tp, directory, interval, resume, until=RESHARD_STEPS):
        args = (cfg, RESHARD_STEPS, str(tmp_path / directory), interval, resume, tp, 1)
        return run_ranks(checkpointed_run, world, *args, "none", 8, 2, 32, until)[0]

    straight = run(2, 2, "a", 2, "none")
    there = run(1, 1, "b", 4, str(tmp_path / "a" / "step-0000002"), until=4)
    assert sorted(there) == [3, 4]
    assert_same_losses(straight, there)
    back = run(2, 2, "c", 0, str(tmp_path / "b" / "step-0000004"))
    assert sorted(back) == [5, 6]
    assert_same_losses(straight, back)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A single-process run that saved at steps 2 and 4."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    run_ranks(checkpointed_run, 1, CFG, 4, str(root), 2, "none")
    return root


def test_marker_lists_every_file_with_its_checksum(saved):
    assert [p.name for p in complete_checkpoints(saved)] == ["step-0000002", "step-0000004"]
    info = json.loads((saved / "step-0000004" / MARKER).read_text())
    assert info["step"] == 4 and info["layout"] == {"dp": 1, "pp": 1, "tp": 1}
    assert ".metadata" in info["files"] and any(f.endswith(".distcp") for f in info["files"])
    assert verify(saved / "step-0000004") == 4


def damaged_copy(saved, tmp_path, how):
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    data = next((root / "step-0000004").glob("*.distcp"))
    if how == "truncate":
        data.write_bytes(data.read_bytes()[:100])
    else:
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    return root, data


@pytest.mark.parametrize("how,problem", [("truncate", "truncated"), ("corrupt", "corrupted")])
def test_damaged_checkpoint_names_the_file_and_auto_falls_back(saved, tmp_path, how, problem):
    root, data = damaged_copy(saved, tmp_path, how)
    with pytest.raises(CheckpointError, match=f"{data.name}.*{problem}"):
        verify(root / "step-0000004")
    with pytest.raises(Exception, match=problem):  # an explicit path is not second-guessed
        run_ranks(checkpointed_run, 1, CFG, 6, str(root), 0, str(root / "step-0000004"))
    with pytest.warns(UserWarning, match=f"skipping checkpoint.*{data.name}"):
        losses = in_process(CFG, 6, root, "auto")
    assert sorted(losses) == [3, 4, 5, 6]  # resumed from step 2


def in_process(cfg, steps, root, resume):
    """checkpointed_run in this process (a world of one), so its warnings reach pytest."""
    init_distributed(torch.device("cpu"))
    try:
        return checkpointed_run(cfg, steps, str(root), 0, resume)
    finally:
        dist.destroy_process_group()


def test_mismatched_model_names_the_parameter_and_shapes(saved):
    other = tiny_config(n_layers=4, vocab_size=251, ffn_dim=96)
    with pytest.raises(
        Exception,
        match=r"layers\.0\.feed_forward\.w1\.weight has shape "
        r"\(128, 64\) in the checkpoint but \(96, 64\) in this run",
    ):
        run_ranks(checkpointed_run, 1, other, 6, str(saved), 0, str(saved / "step-0000004"))


BIG = tiny_config(n_layers=4, vocab_size=251, dim=256, n_heads=4, ffn_dim=1024)
KILL_SCRIPT = """
import sys
from skipjack.testing import run_ranks
from skipjack.testing.reference import checkpointed_run, tiny_config
cfg = tiny_config(n_layers=4, vocab_size=251, dim=256, n_heads=4, ffn_dim=1024)
run_ranks(checkpointed_run, 1, cfg, 1000, sys.argv[1], 1, "auto", timeout=600)
"""


def test_kill_during_save_leaves_previous_checkpoints_intact(tmp_path):
    root = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root)], start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(complete_checkpoints(root)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert len(complete_checkpoints(root)) >= 2, "the run never saved"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer, mid-run and most likely mid-save
        proc.wait()
    complete = complete_checkpoints(root)
    for directory in complete:
        verify(directory)
    started = [p for p in root.glob("step-*") if p not in complete]
    assert all(not (p / MARKER).exists() for p in started)
    newest = int(complete[-1].name.split("-")[1])  # auto resume picks it
    assert min(in_process(BIG, newest + 2, root, "auto")) == newest + 1
