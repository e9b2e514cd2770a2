#!/usr/bin/env bash
# One prepared GPU check of dd's fast paths, for a fresh CUDA machine: a single command, under 8 minutes.
#
#   bash scripts/device_check.sh [OUT_DIR]          # GPU (run from anywhere; the repository root is found)
#   bash scripts/device_check.sh --cpu [OUT_DIR]    # the same stages on the CPU with the tiny presets (rehearsal)
#   DD_DEVICE_CHECK_CPU=1 bash scripts/device_check.sh
#
# Stages, each under its own time limit so that a failing or hanging stage cannot eat the others' time:
#   1. env      python, torch, CUDA device; dd importable from the checkout (PYTHONPATH; nothing is downloaded:
#               dd's core, benchmarks and these tests need only torch, numpy, pyyaml, pillow, tqdm and pytest,
#               which the GPU image has; wheels carried in .whl/ are installed into a private folder if present)
#   2. tests    the gpu-marked tests of tests/test_fast_paths.py: CUDA-graph and reduce-overhead teacher decode,
#               student and flow map == eager, pairs == eager, bf16 runs (CPU rehearsal: the CPU equality tests)
#   3. speed    scripts/bench_speed.py: eager (official-equivalent) vs cuda_graph, teacher / 1-step / 2-step /
#               teacher-involved, batch 1 and 64, GPT-B, GPT-L, VAR-d16, VAR-d20, decode separate
#   4. pairs    scripts/bench_pairs.py: flow-map overhead in pair generation, eager vs graphed teacher and
#               ODE solve, GPT-B at batch 1 and 64, VAR-d16 at batch 1
# Writes ONE report, OUT_DIR/device_check.md (stage table, test summary, both benchmark tables, log tails), and
# OUT_DIR/device_check_logs.txt (full logs). OUT_DIR defaults to $OUT (the device tool's folder) or
# ./device_check_out. Time limits can be scaled with DD_CHECK_TIME_SCALE (e.g. 0.5).
set -euo pipefail

CPU_MODE="${DD_DEVICE_CHECK_CPU:-0}"
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --cpu|--dry-run) CPU_MODE=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) OUT_ARG="$arg" ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT_DIR="${OUT_ARG:-${OUT:-$REPO/device_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dd_device_check.XXXXXX")"
REPORT="$OUT_DIR/device_check.md"
LOGS="$OUT_DIR/device_check_logs.txt"
SCALE="${DD_CHECK_TIME_SCALE:-1}"
START_ALL=$(date +%s)
: > "$LOGS"

# -- python -----------------------------------------------------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]] && "$REPO/.venv/bin/python" -c "import torch" 2>/dev/null; then
    PYTHON="$REPO/.venv/bin/python"
  else
    PYTHON="$(command -v python3 || command -v python)"
  fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "device_check.sh: $PYTHON cannot import torch; set PYTHON=/path/to/venv/bin/python (the venv of 'make test')" >&2
  exit 2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor_cache}"
if [[ -d "$REPO/.whl" ]] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$REPO"/.whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

if [[ "$CPU_MODE" == "1" ]]; then
  MODE="CPU rehearsal (tiny presets; timings meaningless, checks the plumbing)"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DD_COMPILE_BACKEND="${DD_COMPILE_BACKEND:-aot_eager}"
  TEST_ARGS=(-m "not gpu and not slow")
  SPEED_ARGS=(--device cpu --sizes gpt_test,var_test --batches 1,2 --warmup 1 --repeats 1 --threads 1
              --fast-paths eager,compile)
  PAIRS_RUNS=("--preset gpt_test --batch 2 --fast-paths eager,compile --flow-fast-paths eager,compile --settings dpmpp_2m:20"
              "--preset var_test --batch 2 --fast-paths eager,compile --flow-fast-paths eager,compile --settings dpmpp_2m:20")
  DEVICE_ARG=(--device cpu)
else
  MODE="GPU"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
  TEST_ARGS=(-m gpu)
  SPEED_ARGS=(--device cuda --sizes gpt_b,gpt_l,var_d16,var_d20 --batches 1,64 --warmup 1 --repeats 2
              --fast-paths eager,cuda_graph)
  PAIRS_RUNS=("--preset gpt_b --batch 1 --fast-paths eager,cuda_graph --flow-fast-paths eager,cuda_graph --settings dpmpp_2m:100"
              "--preset gpt_b --batch 64 --fast-paths cuda_graph --flow-fast-paths eager,cuda_graph --settings dpmpp_2m:100"
              "--preset var_d16 --batch 1 --fast-paths eager --flow-fast-paths eager,cuda_graph --settings dpmpp_2m:100")
  DEVICE_ARG=(--device cuda)
fi

# -- stage runner ---------------------------------------------------------------------------------------------------
STAGES=()
limit() { awk -v s="$1" -v k="$SCALE" 'BEGIN { v = int(s * k); print (v < 10 ? 10 : v) }'; }

run_stage() {  # name seconds command...
  local name="$1" seconds; seconds="$(limit "$2")"; shift 2
  local log="$WORK/$name.log" start status rc
  start=$(date +%s)
  echo "== [$name] (limit ${seconds}s) $*" | tee -a "$LOGS"
  if timeout -k 15 "$seconds" "$@" >"$log" 2>&1; then
    status="ok"
  else
    rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="TIMEOUT after ${seconds}s"; else status="FAILED (exit $rc)"; fi
  fi
  local took=$(( $(date +%s) - start ))
  { cat "$log"; echo "== [$name] $status in ${took}s"; echo; } >> "$LOGS"
  echo "== [$name] $status in ${took}s"
  STAGES+=("| $name | $status | $took | $seconds |")
}

cat > "$WORK/env_check.py" <<'EOF'
import platform, shutil, subprocess, sys
import torch
print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
for name in ("numpy", "yaml", "PIL", "tqdm", "pytest"):
    __import__(name)
import dd.acceleration, dd.evaluation.samplers, dd.pairs.generation, dd.models.presets  # noqa: E401,F401
print(f"dd importable from {dd.acceleration.__file__.rsplit('/dd/', 1)[0]}; machine {platform.machine()}, "
      f"{torch.get_num_threads()} torch threads")
if shutil.which("nvidia-smi"):
    query = "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm"
    print(subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True).stdout.strip())
EOF

run_stage env 30 "$PYTHON" "$WORK/env_check.py"
run_stage tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" "${TEST_ARGS[@]}" tests/test_fast_paths.py -rs
run_stage speed 180 "$PYTHON" scripts/bench_speed.py "${SPEED_ARGS[@]}" --out "$WORK/speed.md"
i=0
for spec in "${PAIRS_RUNS[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  run_stage "pairs_$i" 35 "$PYTHON" scripts/bench_pairs.py $spec "${DEVICE_ARG[@]}" --repeats 2 --out "$WORK/pairs_$i.md"
done

# -- the one report -------------------------------------------------------------------------------------------------
{
  echo "# dd device check ($MODE)"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "- total wall time: $(( $(date +%s) - START_ALL )) s"
  echo
  echo "| stage | status | seconds | limit |"
  echo "|---|---|---|---|"
  printf '%s\n' "${STAGES[@]}"
  echo
  echo "## Environment"
  echo
  echo '```'
  cat "$WORK/env.log" 2>/dev/null || true
  echo '```'
  echo
  echo "## Fast-path tests (tests/test_fast_paths.py ${TEST_ARGS[*]})"
  echo
  echo '```'
  grep -E "agreement|passed|failed|error|skipped|SKIPPED|FAILED|ERROR" "$WORK/tests.log" 2>/dev/null | tail -40 || true
  echo '```'
  echo
  echo "## Speed (scripts/bench_speed.py ${SPEED_ARGS[*]})"
  echo
  if [[ -s "$WORK/speed.md" ]]; then sed 's/^## Measured$//' "$WORK/speed.md"; else
    echo "no table (stage did not finish); last lines of its log:"; echo '```'; tail -25 "$WORK/speed.log" 2>/dev/null || true; echo '```'; fi
  echo
  echo "## Pair generation (scripts/bench_pairs.py, flow-map overhead)"
  i=0
  for spec in "${PAIRS_RUNS[@]}"; do
    i=$((i + 1))
    echo; echo "\`$spec\`"; echo
    if [[ -s "$WORK/pairs_$i.md" ]]; then cat "$WORK/pairs_$i.md"; else
      echo "no table (stage did not finish); last lines of its log:"; echo '```'; tail -15 "$WORK/pairs_$i.log" 2>/dev/null || true; echo '```'; fi
  done
  echo
  echo "Full logs: $LOGS"
} > "$REPORT"
rm -rf "$WORK"

echo
echo "report: $REPORT"
echo "logs:   $LOGS"
printf '%s\n' "${STAGES[@]}"
