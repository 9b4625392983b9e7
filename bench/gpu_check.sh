#!/usr/bin/env bash
# The CUDA path, checked by one command on a machine with one CUDA GPU, in under 5 minutes:
#
#     bash bench/gpu_check.sh [--json PATH]
#
# 1. CUDA is there (else one line and exit 2);
# 2. the `gpu`-marked tests (tests/gpu), with a JUnit report;
# 3. llama_1b throughput: `skipjack train model=llama_1b` on cuda in bf16 for a few steps;
# then one table (each test's outcome and seconds; tokens/s, MFU, peak memory) and a JSON summary.
# Outputs go to $OUT when it is set, else outputs/gpu_check: gpu_tests.xml, gpu_tests.log,
# llama_1b.log, the run directory llama_1b/, and gpu_check.json unless --json names another path.
# GPU_CHECK_STEPS (20) and GPU_CHECK_BATCH (8 sequences of 1024 tokens) size the run; use a
# smaller batch on a GPU with less than 40 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."

json=""
while (($#)); do
  case "$1" in
    --json) json="${2:?--json needs a path}"; shift 2 ;;
    --json=*) json="${1#--json=}"; shift ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1; usage: bash bench/gpu_check.sh [--json PATH]" >&2; exit 2 ;;
  esac
done

PY=python3
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
out_dir="${OUT:-outputs/gpu_check}"
json="${json:-$out_dir/gpu_check.json}"
steps="${GPU_CHECK_STEPS:-20}"
batch="${GPU_CHECK_BATCH:-8}"
budget=300 tests_limit=160 bench_limit=110 # the rest: starting python and torch, the report

# 1. CUDA
device=$("$PY" bench/gpu_check.py device) || exit $?
echo "$device"
echo "gpu_check: budget ${budget} s: gpu tests ${tests_limit} s and llama_1b ${bench_limit} s," \
  "each under timeout"
mkdir -p "$out_dir"
run_dir="$out_dir/llama_1b"
rm -rf "$out_dir/gpu_tests.xml" "$run_dir" # no stale results in the report

# the tests and the benchmark share one cache: the built-in corpus is tokenized once
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export SKIPJACK_TEST_CACHE="${SKIPJACK_TEST_CACHE:-$cache}"
export SKIPJACK_CACHE="$SKIPJACK_TEST_CACHE"

# 2. the gpu tests
echo "gpu_check: [1/2] pytest -m gpu tests/gpu (log $out_dir/gpu_tests.log)"
start=$SECONDS tests_rc=0
timeout -k 5 "$tests_limit" "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider \
  --junitxml="$out_dir/gpu_tests.xml" >"$out_dir/gpu_tests.log" 2>&1 || tests_rc=$?
tests_s=$((SECONDS - start))
if ((tests_rc)); then tail -n 20 "$out_dir/gpu_tests.log"; fi

# 3. llama_1b throughput
echo "gpu_check: [2/2] skipjack train model=llama_1b, $steps steps (log $out_dir/llama_1b.log)"
start=$SECONDS bench_rc=0
timeout -k 5 "$bench_limit" "$PY" -m skipjack.cli train model=llama_1b \
  train.device=cuda train.dtype=bf16 train.steps="$steps" train.global_batch_size="$batch" \
  train.seq_len=1024 train.val_batches=0 checkpoint=none \
  logging.wandb=false logging.plot=false logging.progress=false \
  hydra.run.dir="$run_dir" >"$out_dir/llama_1b.log" 2>&1 || bench_rc=$?
bench_s=$((SECONDS - start))
if ((bench_rc)); then tail -n 20 "$out_dir/llama_1b.log"; fi

# 4-5. one table, and the JSON summary; exits 1 when a part failed
"$PY" bench/gpu_check.py report --device "$device" \
  --junit "$out_dir/gpu_tests.xml" --tests-rc "$tests_rc" --tests-seconds "$tests_s" \
  --run-dir "$run_dir" --bench-rc "$bench_rc" --bench-seconds "$bench_s" \
  --steps "$steps" --batch "$batch" --total-seconds "$SECONDS" --budget "$budget" --json "$json"
