"""Supervised fine-tuning side by side: packing against one example per sequence, and the native
engine against DeepSpeed ZeRO-1 and ZeRO-2.

    python bench/sft.py [--records 3000] [--steps 30] [--json out.json]

An instruction set is generated from the built-in corpus (prompt and response are runs of
words of random length, so examples are 20 to 400 tokens long) and trained on by the default
model (`tiny`) through the CLI, `train.seq_len=512`, 8 sequences a step:

1. Packing: `data.pack=true` and `false` on one process: the share of sequence positions that
   are padding (the waste), sequences/s and example tokens/s (the positions that hold an
   example, per second: what packing buys).
2. Engines at dp=2 (torchrun, 2 CPU ranks): `train.engine=native`, `deepspeed` with ZeRO-1 and
   ZeRO-2: tokens/s and the optimizer state rank 0 holds.

Each run's time is the median step time after the first two steps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tables import markdown  # bench/tables.py

from skipjack.data.builtin import corpus_texts
from skipjack.trainer.metrics import read_metrics

SEQ_LEN, BATCH = 512, 8


def instruction_set(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = " ".join(corpus_texts()[:200]).split()
    lines = []
    for _ in range(records):
        start = rng.randrange(len(words) - 400)
        prompt, response = rng.randint(5, 120), rng.randint(5, 200)
        lines.append(
            json.dumps(
                {
                    "prompt": " ".join(words[start : start + prompt]),
                    "response": " ".join(words[start + prompt : start + prompt + response]),
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")


def run(workdir: Path, name: str, overrides: list[str], steps: int) -> dict:
    run_dir = workdir / "".join(c if c.isalnum() else "_" for c in name)
    command = [
        sys.executable, "-m", "skipjack.cli", "train", "data=sft",
        f"data.paths=[{workdir / 'set.jsonl'}]", f"train.seq_len={SEQ_LEN}",
        f"train.global_batch_size={BATCH}", f"train.steps={steps}", f"train.val_interval={steps}",
        "train.val_batches=1", "logging.wandb=false", "logging.plot=false",
        "logging.progress=false", f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    padding = float(done.stdout.split("% padding")[0].rsplit(" ", 1)[-1]) / 100
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    times = [b["time"] - a["time"] for a, b in zip(records, records[1:], strict=False)][2:]
    seconds = statistics.median(times)
    return {
        "run": name,
        "padding": padding,
        "sequences_per_s": BATCH / seconds,
        "tokens_per_s": BATCH * SEQ_LEN / seconds,
        "example_tokens_per_s": BATCH * SEQ_LEN * (1 - padding) / seconds,
        "optimizer_mib": records[-1]["optimizer_state_bytes"] / 2**20,
        "step_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        instruction_set(workdir / "set.jsonl", args.records)
        packing = [
            run(workdir, f"pack={pack}", [f"data.pack={pack}"], args.steps)
            for pack in ("true", "false")
        ]
        dp2 = ["launch=torchrun", "launch.nproc_per_node=2"]
        engines = [run(workdir, "native dp=2", dp2, args.steps)] + [
            run(
                workdir,
                f"DeepSpeed ZeRO-{stage} dp=2",
                [*dp2, "train.engine=deepspeed", f"train.deepspeed.zero_stage={stage}"],
                args.steps,
            )
            for stage in (1, 2)
        ]
    results = {"packing": packing, "engines": engines}
    columns = {
        "packing": ["run", "padding", "sequences_per_s", "example_tokens_per_s", "step_s"],
        "engines": ["run", "tokens_per_s", "optimizer_mib", "step_s"],
    }
    for part, rows in results.items():
        print(f"## {part}\n\n{markdown(rows, columns[part])}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
