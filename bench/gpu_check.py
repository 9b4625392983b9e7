"""The Python part of `bash bench/gpu_check.sh` (the CUDA path, checked by one command).

    python bench/gpu_check.py device
    python bench/gpu_check.py report --junit gpu_tests.xml --run-dir RUN --json gpu_check.json ...

`device` prints the visible GPUs as `nvidia-smi -L` does, or exits 2 with one line when CUDA is
not there. `report` reads the `gpu` tests' JUnit XML and the llama_1b run's metrics.jsonl,
prints one table (each test with its outcome and seconds, then the run's tokens/s, MFU and peak
memory), writes the same as JSON, and exits 1 when a part failed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

NO_CUDA = (
    "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); run this on a GPU machine"
)
WARMUP_STEPS = 2  # allocator and kernel selection; left out of the medians


def device() -> int:
    try:
        import torch
    except ImportError:
        print(
            f"gpu_check: {sys.executable} cannot import torch; run `make install`", file=sys.stderr
        )
        return 2
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = getattr(props, "uuid", None)
        extra = f"UUID: GPU-{uuid}" if uuid else f"{props.total_memory / 2**30:.0f} GiB"
        print(f"GPU {i}: {props.name} ({extra})")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    return 0


def junit_tests(path: Path) -> list[dict]:
    """Each test case of a pytest JUnit report: name, outcome, seconds, message."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome, message = name, found.get("message", "")
                break
        seconds = float(case.get("time", "nan"))
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": seconds,
                      "message": message})  # fmt: skip
    return tests


def throughput(run_dir: Path) -> dict:
    """Median tokens/s and MFU of the run's steps after the warm-up, and its peak memory."""
    from skipjack.trainer.metrics import read_metrics

    if not (run_dir / "metrics.jsonl").exists():
        return {"steps_logged": 0}
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    timed = steps[WARMUP_STEPS:] or steps
    result = {"steps_logged": len(steps), "timed_steps": len(timed)}
    if timed:
        result["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
        mfu = [r["mfu"] for r in timed if "mfu" in r]
        result["mfu"] = statistics.median(mfu) if mfu else None
        result["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in steps)
        result["final_loss"] = steps[-1]["loss"]
    return result


def _status(rc: int) -> str:
    return "passed" if rc == 0 else "timed out" if rc in (124, 137) else f"failed (rc {rc})"


def report(args: argparse.Namespace) -> int:
    junit = Path(args.junit)
    tests = junit_tests(junit) if junit.exists() else []
    bench = throughput(Path(args.run_dir))
    bench_ok = args.bench_rc == 0 and bench.get("timed_steps", 0) > 0
    bench_ok = bench_ok and math.isfinite(bench["final_loss"])
    tests_ok = args.tests_rc == 0 and bool(tests)
    shape = f"{args.steps} steps x {args.batch} x 1024 tokens, bf16"

    rows = [(t["name"], t["outcome"], f"{t['seconds']:.1f}") for t in tests]
    if not tests:
        rows.append(("gpu tests: no JUnit report", _status(args.tests_rc), f"{args.tests_seconds}"))
    rows.append((f"llama_1b train ({shape})", _status(args.bench_rc), f"{args.bench_seconds}"))
    if "tokens_per_s" in bench:
        first = bench["steps_logged"] - bench["timed_steps"] + 1
        mfu = bench["mfu"]
        rows += [
            (f"llama_1b tokens/s (median, steps {first}-{bench['steps_logged']})",
             f"{bench['tokens_per_s']:,.0f}", ""),
            ("llama_1b MFU (median; dense bf16 peak)",
             f"{mfu:.1%}" if mfu is not None else "n/a: GPU not in PEAK_BF16_FLOPS", ""),
            ("llama_1b peak memory (allocated)",
             f"{bench['peak_memory_bytes'] / 2**30:.1f} GiB", ""),
        ]  # fmt: skip
    widths = [max(len(r[i]) for r in [("check", "result", "s"), *rows]) for i in range(3)]
    print(f"\n{args.device.splitlines()[0]}\n")
    print(f"| {'check':<{widths[0]}} | {'result':<{widths[1]}} | {'s':>{widths[2]}} |")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 1)}:|")
    for name, result, seconds in rows:
        print(f"| {name:<{widths[0]}} | {result:<{widths[1]}} | {seconds:>{widths[2]}} |")

    ok = tests_ok and bench_ok
    total = args.total_seconds
    print(f"\ngpu_check: {'passed' if ok else 'FAILED'} in {total} s (budget {args.budget} s)")
    summary = {
        "ok": ok,
        "device": args.device,
        "tests": {"ok": tests_ok, "rc": args.tests_rc, "seconds": args.tests_seconds,
                  "junit": str(junit), "cases": tests},
        "benchmark": {"ok": bench_ok, "rc": args.bench_rc, "seconds": args.bench_seconds,
                      "model": "llama_1b", "steps": args.steps, "global_batch_size": args.batch,
                      "seq_len": 1024, "dtype": "bf16", "warmup_steps": WARMUP_STEPS,
                      "run_dir": args.run_dir, **bench},
        "total_seconds": total,
        "budget_seconds": args.budget,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"gpu_check: summary {args.json}; logs in {Path(args.junit).parent}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("device")
    rep = sub.add_parser("report")
    rep.add_argument("--device", default="unknown GPU")
    rep.add_argument("--junit", required=True)
    rep.add_argument("--tests-rc", type=int, required=True)
    rep.add_argument("--tests-seconds", type=int, default=0)
    rep.add_argument("--run-dir", required=True)
    rep.add_argument("--bench-rc", type=int, required=True)
    rep.add_argument("--bench-seconds", type=int, default=0)
    rep.add_argument("--steps", type=int, required=True)
    rep.add_argument("--batch", type=int, required=True)
    rep.add_argument("--total-seconds", type=int, default=0)
    rep.add_argument("--budget", type=int, default=300)
    rep.add_argument("--json", required=True)
    args = parser.parse_args()
    return device() if args.command == "device" else report(args)


if __name__ == "__main__":
    sys.exit(main())
