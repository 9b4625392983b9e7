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
from skipjack.parallel.dims import init_distributed
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
}


def run_layout(layout, until, directory, interval, resume):
    world, tp, pp = LAYOUTS[layout]
    args = (CFG, 4, directory, interval, resume, tp, pp, "none", 8, 2, 32, until)
    return run_ranks(checkpointed_run, world, *args)[0]


SOURCE = (1, 2, 2)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """(dp, pp, tp) = (1, 2, 2) for 4 steps, saving after step 2: its losses and its root."""
    root = tmp_path_factory.mktemp("source")
    return run_layout(SOURCE, 4, str(root), 2, "none"), root


@pytest.mark.parametrize("target", [(2, 1, 2), (1, 1, 1), (1, 4, 1), (4, 1, 1)])
def test_reshard_to_another_layout_and_back(source_run, tmp_path, target):
    """Saved by (dp, pp, tp) = (1, 2, 2) after step 2, step 3 in `target` (which saves), step 4
    back in (1, 2, 2): both losses equal those of (1, 2, 2) throughout; optimizer states too."""
    straight, root = source_run
    there = run_layout(target, 3, str(tmp_path / "b"), 3, str(root / "step-0000002"))
    assert abs(there[3] - straight[3]) <= 1e-6 * abs(straight[3])
    back = run_layout(SOURCE, 4, str(tmp_path / "c"), 0, str(tmp_path / "b" / "step-0000003"))
    assert abs(back[4] - straight[4]) <= 1e-6 * abs(straight[4])


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
