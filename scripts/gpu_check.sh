#!/usr/bin/env bash
# One short check of qatkit on a CUDA GPU, for a machine lent for a few minutes: run it from the repo root as
#   OUT=/some/folder bash scripts/gpu_check.sh
# Everything it writes goes under $OUT (at most 7 files): summary.txt (versions, each part's exit status and
# seconds, the test summary and the step-time table), pytest_cuda.txt, modelopt_ext.txt, step_time_cuda.txt,
# performance_cuda.md and, when time is left, step_time_cuda_compiled.txt and performance_cuda_compiled.md.
# Parts run one after the other and a failing part does not stop the next. Worst case about 8 minutes: the tests
# and the step-time table have 240 s each; the compiled step times (last) run only within GPU_CHECK_BUDGET_S
# (default 450 s) from the start.
# On a lent machine whose image has torch but no virtual environment (the .venv cannot travel), packages the image
# lacks travel as files in a carried folder that .git/info/exclude ignores, e.g. ultralytics, faster_coco_eval (a
# cp312 wheel unpacked) and modelopt in .gpu/site, then: PYTHONPATH=$PWD/.gpu/site OUT=... bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # this checkout's qatkit, whatever the venv points to
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-450}
CASES=("demo b16 160px" "resnet18 b8 160px" "yolov8n b8 320px" "resnet18 b2 32px")
# Eager variants only: each compiled variant compiles per case on first use (tens of seconds each, cold caches),
# 8 of them would not fit in 240 s; the compiled rows get their own run below, on one case, if time is left.
VARIANTS=("float" "qatkit onnxruntime, BN frozen" "qatkit onnxruntime, BN live" "qatkit tensorrt, BN live"
          "qatkit tensorrt, BN frozen" "ModelOpt INT8_DEFAULT_CFG" "torchao PT2E QAT")

note() { echo "$*" >>"$SUMMARY"; }

# part NAME LOG SECONDS CMD...: run CMD under a timeout with its output in LOG; note its exit status and time
part() {
  local name=$1 log=$2 limit=$3 t0=$SECONDS rc
  shift 3
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  note "$name: exit $rc in $((SECONDS - t0)) s$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo " (timed out at $limit s)")"
}

# (i) the machine
note "== gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY"
nvidia-smi -L >>"$SUMMARY" 2>&1 || note "nvidia-smi -L: exit $?"
"$PY" - >>"$SUMMARY" 2>&1 <<'EOF' || note "versions: exit $?"
import torch
import triton

cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"triton {triton.__version__}, cuda available: {cuda}")
if cuda:
    print(f"GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || echo none)
NINJA=$(command -v ninja || ls "$(dirname "$PY")/ninja" 2>/dev/null || echo none)
note "compilers (for triton, inductor, ModelOpt): gcc $(command -v gcc || echo none), nvcc $NVCC, ninja $NINJA"

# ModelOpt's CUDA fake-quant kernels are a C++/CUDA extension it compiles on first use (minutes, if nvcc is
# there); build it beside the tests so the step-time run finds it built (or not available, then ModelOpt runs its
# pure-torch fake quant: the summary says which).
timeout -k 10 200 "$PY" -c '
import time
t = time.time()
from modelopt.torch.quantization.extensions import get_cuda_ext
ext = get_cuda_ext()
print("modelopt_cuda_ext:", "loaded" if ext is not None else "NOT available (ModelOpt uses its pure-torch fake quant)",
      f"after {time.time() - t:.0f} s")
' >"$OUT/modelopt_ext.txt" 2>&1 &
EXT_PID=$!

# (ii) the CUDA tests (no -x: one run must report every test; the timeout bounds a broken one)
part "pytest tests/test_cuda.py" "$OUT/pytest_cuda.txt" 240 \
  "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfEsxX --durations=0
grep -E "^(FAILED|ERROR|XFAIL|XPASS|SKIPPED)|[0-9]+ (passed|failed|skipped|error)" "$OUT/pytest_cuda.txt" \
  | tail -n 20 >>"$SUMMARY"

wait "$EXT_PID"
EXT_RC=$?
EXT_NOTE=$(grep -h "modelopt_cuda_ext:" "$OUT/modelopt_ext.txt" || echo "no result")
note "modelopt extension build: exit $EXT_RC; $EXT_NOTE"
# Not built: ModelOpt would build it again inside the timed run (as long again, or forever on the lock file of a
# build the timeout killed); an extension folder that cannot exist makes it fall back at once.
NO_EXT=()
if ! grep -q "modelopt_cuda_ext: loaded" "$OUT/modelopt_ext.txt"; then
  NO_EXT=(env TORCH_EXTENSIONS_DIR=/dev/null/no-extensions)
  note "ModelOpt's row is its pure-torch fake quant: its CUDA extension is not available"
fi

# (iii) the step-time table on the GPU
part "step_time.py --device cuda" "$OUT/step_time_cuda.txt" 240 ${NO_EXT[@]+"${NO_EXT[@]}"} \
  "$PY" benchmarks/step_time.py --device cuda --rounds 3 --steps 6 --cases "${CASES[@]}" --variants "${VARIANTS[@]}" \
  --doc "$OUT/performance_cuda.md"
grep -E "^\|" "$OUT/step_time_cuda.txt" >>"$SUMMARY"

# (iv) compiled step times on one case, only within the budget
LEFT=$((BUDGET - SECONDS))
if [ "$LEFT" -ge 100 ]; then
  part "step_time.py --device cuda, compiled" "$OUT/step_time_cuda_compiled.txt" $((LEFT - 10)) \
    "$PY" benchmarks/step_time.py --device cuda --rounds 3 --steps 6 --cases "resnet18 b2 32px" \
    --variants "float" "qatkit onnxruntime, BN frozen" "compiled float" "compiled qatkit onnxruntime, BN frozen" \
    --doc "$OUT/performance_cuda_compiled.md"
  grep -E "^\|" "$OUT/step_time_cuda_compiled.txt" >>"$SUMMARY"
else
  note "compiled step times skipped: $LEFT s of the $BUDGET s budget left"
fi
note "== done in $SECONDS s"
cat "$SUMMARY"
