#!/usr/bin/env bash
# The GPU checks of a release, as one bounded script: correctness first, then speed.
#
#   tools/gpu_check.sh --fetch-wheels   # once, on a machine with PyPI: wheels for what GPU hosts lack
#   tools/gpu_check.sh                  # on the GPU host, from the repository root
#   tools/gpu_check.sh --dry-run        # anywhere: the same set-up and imports, each step one short
#                                       # case, Triton's interpreter instead of the GPU (make test runs it)
#
# Results go to $OUT (default runs/gpu-check): env.txt (device, driver, versions), tests.log
# (the kernel and GPU tests on CUDA, no interpreter), bench-kernels.log plus the microbenchmark
# tables (attention.md/json, layer_norm.md/json, bias_gelu.md/json), bench-vit-b16.json/log
# (training images/s, TFLOP/s, MFU for ours, eager, sdpa, compile, timm), bench-data-gpu.json/log
# (JPEG decode on the device against the CPU loader). Each step has its own
# time limit (seconds: TESTS_S, KBENCH_S, BENCH_S, DATA_S) so a slow step cannot eat the others; the
# exit code is the number of steps that failed. Copy the figures into docs/benchmarks.md with
# the device, versions, date and these commands.
#
# GPU hosts often lack webdataset, braceexpand, deepspeed, hjson, pydantic (the package imports
# them; the CUDA tests need them). --fetch-wheels downloads them into .whl/ for Python 3.12
# (deepspeed has no wheel on PyPI: one is built here); the check installs whatever .whl/ holds
# into /tmp/site before it starts.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=(webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.3 pydantic_core==2.50.4
        annotated-types==0.8.0 typing-inspection==0.4.5)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}" || exit 1
  # deepspeed's setup.py imports torch: build it with the project's environment
  BUILD_PY=${BUILD_PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo "$PY")}
  "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 || exit 1
  ls -l .whl
  exit 0
fi

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-runs/gpu-check$([[ $DRY == 1 ]] && echo -dry)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VIT_ACCEL_BENCH_OUT="$OUT"
if [[ $DRY == 1 ]]; then
  # one test per file (tests/conftest.py), kernels interpreted on the CPU, a one-block CPU bench step
  export TRITON_INTERPRET=1
  PYTEST_DRY=(--one-per-file -m "not slow")
  BENCH=(--backend cpu --config vit-b16-ft --steps 1 --warmup 0 --batch 2 --set model.depth=1)
  DATA=(--corpus 32 --workers 0 --batch-size 8 --device cpu)
else
  unset TRITON_INTERPRET
  PYTEST_DRY=()
  BENCH=(--backend gpu --config vit-b16-ft --steps 20 --warmup 5)
  DATA=(--corpus 1000 --workers 2 8 --device cuda)
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, count failures
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0))s; last lines:"
  tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

{
  date -u +"date %Y-%m-%dT%H:%MZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  "$PY" - <<'EOF'
import importlib
for m in ("torch", "triton", "timm", "deepspeed", "webdataset"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "not importable:", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. correctness on the real device: every kernel test and the GPU backend's tests
step tests "${TESTS_S:-300}" "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_DRY[@]}" tests/test_kernels_attention.py \
    tests/test_kernels_layer_norm.py tests/test_kernels_bias_gelu.py tests/test_kernels_convergence.py \
    tests/test_kernels_torch_compile.py tests/test_model.py tests/test_gpu.py tests/test_timm_parity.py \
    tests/test_device_decode.py
# 2. kernel microbenchmarks at ViT shapes (tables land in $OUT)
step bench-kernels "${KBENCH_S:-240}" "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_DRY[@]}" tests/bench/test_bench_kernels.py -m bench
# 3. end-to-end training throughput, ViT-B/16 224 px bf16, every provider side by side
step bench-vit-b16 "${BENCH_S:-240}" "$PY" -m vit_accel bench "${BENCH[@]}" --json "$OUT/bench-vit-b16.json"
# 4. input: data.decode=gpu (nvJPEG, crop and flip on the device) against our CPU decode, per worker
#    count: images/s, and images per host CPU-second (3000 / that = the host cores one GPU's feed takes)
step bench-data-gpu "${DATA_S:-240}" "$PY" -m vit_accel bench-data "${DATA[@]}" --pipelines train gpu-decode \
    --json "$OUT/bench-data-gpu.json"

echo "gpu_check: $failed step(s) failed; results in $OUT"
exit "$failed"
