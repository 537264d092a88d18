#!/usr/bin/env bash
# One prepared GPU check (issue 16, item 6): in at most ~8 minutes on one H100/H200
#
#   1. install   none when the machine's packages import (this tree in place); else pip install -e ".[dev]"
#   2. tests     the kernel tests, compiled natively on the GPU (TRITON_INTERPRET=0)
#      overhead  host time per call of each op at a tiny shape, beside F.linear  benchmarks/launch_overhead.py
#   3. sweep     tile configurations of the Triton GEMMs against dense  benchmarks/triton_sweep.py
#                (weight-only and int8, the targets' token counts first, within its own time limit); the
#                fastest right choices become this GPU model's tuned table, qdlm_export/kernels/tuned/
#                <gpu>.json (kernels/tuned.py), which the steps after it run with
#   4. bench     qdlm-export bench --full --json
#   5. steps     one denoising step of a LLaDA-8B-shaped block: RTN W4 g128, RTN-WA W8A8, QuaRot W4A4
#                (the online-Hadamard share)                       benchmarks/bench_block_step.py
#   6. gptq      GPTQ W4 g128 on a 4-block LLaDA-8B-shaped model    benchmarks/bench_pipeline.py
#   7. report    a machine-named section in docs/benchmarks.md     benchmarks/gpu_report.py
#
# Usage:  bash benchmarks/gpu_check.sh            (on a CUDA machine, from any folder)
#         bash benchmarks/gpu_check.sh --dry-run  (any machine: prints the plan, writes a report from a
#                                                  tiny CPU bench into a temporary file, exits 0)
#
# Outputs go to "$OUT/gpu_check" when OUT is set, else to a new temporary folder (printed): the JSON of
# every step, its log, kernel_tests.xml, meta.json, gpu_section.md, the updated benchmarks.md and the
# tuned table. docs/benchmarks.md and the GPU's table in this working tree are updated too (commit both).
# Each step has a time limit cut to what is left of GPU_CHECK_BUDGET_S (default 470 s); a step that
# fails or times out is recorded in the report and the next one still runs. Exit status: 0 when every
# step ran, 1 when one failed (the report is still written), 2 for usage errors or no GPU.
# Environment: PYTHON (interpreter, default python3), OUT, GPU_CHECK_BUDGET_S, QDLM_SKIP_INSTALL=1.

set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
# this tree's qdlm_export comes first on the path, installed or not (benchmarks/ scripts and their children)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
REPORT_RESERVE_S=15
if [ -n "${OUT:-}" ]; then R="$OUT/gpu_check"; else R="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"; fi
mkdir -p "$R" || exit 2

declare -A STATUS=()
ORDER=()
FAILED=0

log() { echo "[gpu_check $(printf '%3d' "$SECONDS")s] $*" >&2; }

# run_step NAME LIMIT_S STDOUT_FILE CMD...  (STDOUT_FILE '-' = the log); stderr always goes to NAME.log
run_step() {
  local name=$1 limit=$2 outfile=$3
  shift 3
  ORDER+=("$name")
  local left=$(( BUDGET_S - SECONDS - REPORT_RESERVE_S ))
  (( limit > left )) && limit=$left
  if (( limit < 15 )); then
    STATUS[$name]="skipped (time budget of ${BUDGET_S}s spent)"; FAILED=1; log "$name: ${STATUS[$name]}"; return
  fi
  log "$name (limit ${limit}s): $*"
  local start=$SECONDS rc
  if [ "$outfile" = "-" ]; then
    timeout --kill-after=10 "$limit" "$@" >>"$R/$name.log" 2>&1; rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" >"$outfile" 2>>"$R/$name.log"; rc=$?
  fi
  local took=$(( SECONDS - start ))
  case $rc in
    0) STATUS[$name]="ok (${took} s)" ;;
    124|137) STATUS[$name]="timed out after ${limit} s"; FAILED=1 ;;
    *) STATUS[$name]="failed, exit ${rc} (${took} s; see $name.log)"; FAILED=1 ;;
  esac
  log "$name: ${STATUS[$name]}"
  [ "$rc" = 0 ] || tail -n 15 "$R/$name.log" >&2
}

QDLM=("$PY" -c "import sys; from qdlm_export.cli.app import main; sys.argv[0] = 'qdlm-export'; sys.exit(main())")
KERNEL_TESTS=(tests/kernels/test_kernels.py tests/kernels/test_kernels_hadamard.py tests/kernels/test_grouped_experts.py
              tests/kernels/test_kernels_cpu_packed.py tests/kernels/test_kernels_cuda_tinygemm.py
              tests/kernels/test_group_major_qparams.py tests/kernels/test_tuned_table.py
              tests/kernels/test_launch_plans.py)
TESTS_CMD=(env TRITON_INTERPRET=0 QDLM_KERNEL_BACKEND=auto "$PY" -m pytest -q -p no:cacheprovider -m "not slow"
           "${KERNEL_TESTS[@]}" --junitxml="$R/kernel_tests.xml")
# kernel compilation is most of the tests' time: spread it over processes where pytest-xdist is installed
"$PY" -c 'import xdist' 2>/dev/null && TESTS_CMD+=(-n 8)
# 3 repetitions (bench's default is 5): run 2 took 118 s of the budget at 5, and the sweep needs the time
BENCH_CMD=("${QDLM[@]}" bench --full --repetitions 3 --json)
STEPS_CMD=("$PY" benchmarks/bench_block_step.py --device cuda --batch 4 --seqlen 1024 --repeat 5 --json)
# the targets' token counts first (16, 1024, 4096), so a sweep cut short by its budget still covers them;
# --table: the winners become this GPU model's tuned table, which bench and steps then run with
SWEEP_CMD=("$PY" benchmarks/triton_sweep.py --ops weight_only int8 --shapes 4096x4096 4096x12288 --m 16 1024 4096 256
           --rep 20 --json --table)
SWEEP_LIMIT_S=150
AFTER_SWEEP_S=170  # left after the sweep: bench (run 2: 118 s at 5 repetitions; 3 now), steps (44 s), GPTQ (13-27 s)
OVERHEAD_CMD=("$PY" benchmarks/launch_overhead.py --json)
GPTQ_CMD=("$PY" benchmarks/bench_pipeline.py --method gptq --blocks 4 --nsamples 16 --seqlen 512 --device cuda --json)

write_meta() {  # write_meta DRY(0/1) GPU_NAME
  local statuses="" k
  for k in "${ORDER[@]}"; do statuses+="$k=${STATUS[$k]}"$'\n'; done
  GC_DRY="$1" GC_GPU="$2" GC_SECONDS="$SECONDS" GC_STATUSES="$statuses" GC_TABLE="${TABLE:-}" "$PY" - "$R/meta.json" <<'EOF'
import datetime, json, os, subprocess, sys
meta = {"gpu": os.environ["GC_GPU"], "date": datetime.date.today().isoformat(),
        "seconds": int(os.environ["GC_SECONDS"]), "dry_run": os.environ["GC_DRY"] == "1", "steps": {}}
if os.environ.get("GC_TABLE"):  # relative to the tree: nothing local in what is published
    meta["tuned_table"] = os.path.relpath(os.environ["GC_TABLE"], os.getcwd())
for line in os.environ["GC_STATUSES"].splitlines():
    if "=" in line:
        k, v = line.split("=", 1)
        meta["steps"][k] = v
try:
    import torch
    meta["torch"] = torch.__version__
    meta["cuda"] = torch.version.cuda
except Exception:  # the report says what is missing
    pass
try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=20)
    if q.returncode == 0 and q.stdout.strip():
        meta["driver"] = q.stdout.strip().splitlines()[0]
except (OSError, subprocess.SubprocessError):
    pass
json.dump(meta, open(sys.argv[1], "w"), indent=2)
EOF
}

report() {  # report DOC
  "$PY" benchmarks/gpu_report.py --bench "$R/bench.json" --pipeline "$R/pipeline.json" --steps "$R/steps.json" \
    --sweep "$R/sweep.json" --overhead "$R/overhead.json" --tests "$R/kernel_tests.xml" --meta "$R/meta.json" --doc "$1" --section-out "$R/gpu_section.md" \
    --targets-out "$R/targets.json"
}

# ------------------------------------------------------------------------------------------- dry run
if (( DRY_RUN )); then
  echo "gpu_check.sh --dry-run: outputs would go to $R (budget ${BUDGET_S} s); the plan:"
  echo "  1. install  none when this machine's packages import (qdlm_export in place, PYTHONPATH=$ROOT); else"
  echo "              $PY -m pip install -e \".[dev]\" (from .whl/ when present; torch first only if 'import torch' fails)"
  echo "  2. tests    ${TESTS_CMD[*]}"
  echo "     overhead ${OVERHEAD_CMD[*]} > $R/overhead.json"
  echo "  3. sweep    ${SWEEP_CMD[*]} > $R/sweep.json (writes qdlm_export/kernels/tuned/<gpu>.json)"
  echo "  4. bench    qdlm-export bench --full --json > $R/bench.json"
  echo "  5. steps    ${STEPS_CMD[*]} > $R/steps.json"
  echo "  6. gptq     ${GPTQ_CMD[*]} > $R/pipeline.json"
  echo "  7. report   $PY benchmarks/gpu_report.py ... --doc docs/benchmarks.md"
  missing=0
  for f in "${KERNEL_TESTS[@]}" benchmarks/bench_block_step.py benchmarks/bench_pipeline.py benchmarks/gpu_report.py \
           benchmarks/triton_sweep.py benchmarks/launch_overhead.py \
           docs/benchmarks.md pyproject.toml; do
    [ -f "$f" ] || { echo "missing: $f" >&2; missing=1; }
  done
  (( missing )) && exit 1
  # the report writer on a tiny CPU bench, into a temporary copy of the doc
  run_step bench 120 "$R/bench.json" "$PY" -c "
import json
from qdlm_export.bench.kernels import run_kernel_benchmarks
print(json.dumps({'kernels': run_kernel_benchmarks(quick=True, device='cpu', m_values=[4], shapes=[(256, 128)],
                                                   repeat=1, warmup=0)}))"
  # the overhead script stubbed (no GPU: nothing launches), a few calls: its JSON through the report
  run_step overhead 60 "$R/overhead.json" "$PY" benchmarks/launch_overhead.py --stubbed --calls 50 --blocks 2 --json
  write_meta 1 "dry run (CPU)"
  cp docs/benchmarks.md "$R/benchmarks.md"
  report "$R/benchmarks.md" || { echo "the report writer failed" >&2; exit 1; }
  grep -q "^## GPU check: dry run (CPU)" "$R/benchmarks.md" || { echo "no section in $R/benchmarks.md" >&2; exit 1; }
  echo "dry run: report section written to $R/benchmarks.md ($R/gpu_section.md):"
  cat "$R/gpu_section.md"
  exit 0
fi

# ---------------------------------------------------------------------------------------- on the GPU
log "outputs: $R"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check.sh: nvidia-smi not found: this is not a CUDA machine (use --dry-run to test the script)" >&2
  exit 2
fi
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
nvidia-smi >"$R/nvidia-smi.txt" 2>&1

# 1. install. GPU machines here reach no package registry, and their image already holds torch, triton,
# transformers and the rest: when those import, this tree is used in place (PYTHONPATH, exported above)
# and pip never runs. Otherwise pip installs, from wheels in .whl/ when that folder exists.
install() {
  if "$PY" -c 'import torch, triton, transformers, safetensors, huggingface_hub, accelerate, typer, rich, pytest
import qdlm_export' 2>>"$R/install.log"; then
    echo "using this machine's packages and qdlm_export in place from $ROOT (no pip)"; return 0
  fi
  local -a src=(--retries 1 --timeout 15)
  [ -d "$ROOT/.whl" ] && src=(--no-index --find-links "$ROOT/.whl")
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    "$PY" -m pip install "${src[@]}" torch || return 1
  fi
  local tv
  tv="$("$PY" -c 'import torch; print(torch.__version__)')" || return 1
  echo "torch==$tv" >"$R/constraints.txt"
  "$PY" -m pip install "${src[@]}" -e ".[dev]" -c "$R/constraints.txt" && return 0
  echo "pip install -e .[dev] failed; trying without build isolation" >&2
  "$PY" -m pip install "${src[@]}" --no-build-isolation -e ".[dev]" -c "$R/constraints.txt"
}
if [ "${QDLM_SKIP_INSTALL:-0}" = 1 ]; then
  ORDER+=(install); STATUS[install]="skipped (QDLM_SKIP_INSTALL=1)"
else
  run_step install 150 - bash -c "$(declare -f install); R='$R'; PY='$PY'; ROOT='$ROOT'; install"
fi
GPU_NAME_TORCH="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
GPU_NAME="${GPU_NAME_TORCH:-${GPU_NAME:-unknown GPU}}"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: torch cannot see a CUDA device (GPU: $GPU_NAME); see $R/install.log" >&2
  exit 2
fi
log "GPU: $GPU_NAME"
unset TRITON_INTERPRET QDLM_KERNEL_BACKEND

# run 2: 127 s for 419 tests; this tree adds about 40 kernel compilations
run_step tests 180 - "${TESTS_CMD[@]}"
# before the sweep, whose limit is cut to what the steps after it leave (4 ops x 11 000 calls of
# microseconds each, plus the compiles of their tiny-shape kernels: seconds)
run_step overhead 40 "$R/overhead.json" "${OVERHEAD_CMD[@]}"
# the sweep stops starting shapes in time to print what it measured, and to leave the steps after it their
# time (10 s of margin: killed by its limit, it still prints what it measured and writes the table)
sweep_s=$(( BUDGET_S - SECONDS - REPORT_RESERVE_S - AFTER_SWEEP_S ))
(( sweep_s > SWEEP_LIMIT_S )) && sweep_s=$SWEEP_LIMIT_S
SWEEP_CMD+=(--budget-s $(( sweep_s - 10 )))
run_step sweep "$sweep_s" "$R/sweep.json" "${SWEEP_CMD[@]}"
TABLE="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("table") or "")' "$R/sweep.json" 2>/dev/null)"
[ -n "$TABLE" ] && [ -f "$TABLE" ] && cp "$TABLE" "$R/" && log "tuned table: $TABLE (the steps below run with it)"
run_step bench 150 "$R/bench.json" "${BENCH_CMD[@]}"
run_step steps 100 "$R/steps.json" "${STEPS_CMD[@]}"
run_step gptq 120 "$R/pipeline.json" "${GPTQ_CMD[@]}"

write_meta 0 "$GPU_NAME"
if report docs/benchmarks.md; then
  cp docs/benchmarks.md "$R/benchmarks.md"
  log "section written to docs/benchmarks.md (also $R/gpu_section.md)"
  cat "$R/gpu_section.md"
else
  log "the report writer failed"; FAILED=1
fi
log "done in ${SECONDS} s; outputs in $R"
exit $FAILED
