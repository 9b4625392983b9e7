"""metrics.jsonl: one record per step across restarts, nothing a run wrote thrown away."""

import json

import torch

from skipjack.trainer.metrics import METRICS, SUPERSEDED, Metrics, read_metrics


def _history(run_dir, steps, torn=False):
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in steps]
    (run_dir / METRICS).write_text("\n".join(lines) + "\n" + ('{"step": 9, "lo' if torn else ""))


def _metrics(run_dir):
    return Metrics(run_dir, 10, torch.device("cpu"), enabled=True, progress=False)


def test_a_resume_keeps_the_history_to_its_step_and_sets_the_rest_aside(tmp_path):
    _history(tmp_path, range(6), torn=True)  # killed at step 6, while writing a line
    metrics = _metrics(tmp_path)
    metrics.begin((3, 300, 3e9, 4e9))
    assert [r["step"] for r in metrics.history] == [0, 1, 2, 3]
    assert (metrics.tokens_total, metrics.flops_total, metrics.dense_total) == (300, 3e9, 4e9)
    metrics.step(4, 0, 1.0, val_loss=2.5)
    metrics.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    superseded = [json.loads(line) for line in (tmp_path / SUPERSEDED).read_text().splitlines()]
    assert [r["step"] for r in superseded] == [4, 5]  # the torn line is not a record
    _history(tmp_path, range(3), torn=True)  # resumed at the last step it wrote whole
    again = _metrics(tmp_path)
    again.begin((2, 200, 2e9, 2e9))
    again.step(3, 0, 1.0, val_loss=2.0)
    again.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_a_fresh_start_sets_an_earlier_runs_records_aside(tmp_path):
    _history(tmp_path, range(3))
    metrics = _metrics(tmp_path)
    metrics.begin()
    metrics.step(0, 0, 1.0, val_loss=8.0)
    metrics.close()
    assert read_metrics(tmp_path) == [metrics.history[0]] and len(metrics.history) == 1
    assert len((tmp_path / SUPERSEDED).read_text().splitlines()) == 3
    fresh = tmp_path / "new"
    fresh.mkdir()
    other = _metrics(fresh)
    other.begin()
    other.close()
    assert not (fresh / SUPERSEDED).exists() and read_metrics(fresh) == []
