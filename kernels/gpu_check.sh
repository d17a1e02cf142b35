#!/usr/bin/env bash
# GPU check for fastclip_kernels, for a session with a GPU (not run in CI). From the repo root:
#   OUT=/some/dir bash kernels/gpu_check.sh        (the device tool sets OUT itself)
# Needs python3 with torch (CUDA) + triton + pytest (matplotlib optional: no plot without it); no install of
# this repo: `fastclip_kernels` is put on the path through a symlink to kernels/. Checks the dependencies
# first and exits non-zero if any step fails. Writes to $OUT: env.txt, tests.txt (kernel tests on CUDA,
# bf16/fp16/fp32), bench_{clip,fastclip}.txt and gpu_{clip,fastclip}.{csv,md[,png]} (B = 8192, 32768,
# d = 512, bf16: triton vs chunked, with the cost model's predictions).
set -u
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
# Cold compiles: ~30 kernel variants in the tests at a few seconds each, more under a loaded CPU.
TEST_TIMEOUT=${TEST_TIMEOUT:-900}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}
mkdir -p "$OUT"
fail=0

$PY - <<'EOF' > "$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; echo "gpu_check: dependencies missing"; exit 2; }
import importlib.util, sys
import torch, triton
missing = [m for m in ("pytest",) if importlib.util.find_spec(m) is None]
if missing or not torch.cuda.is_available():
    sys.exit(f"missing: {missing}, torch.cuda.is_available() = {torch.cuda.is_available()}")
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(),
      "capability", torch.cuda.get_device_capability())
print("matplotlib", importlib.util.find_spec("matplotlib") is not None)
EOF
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; } >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

shim=$(mktemp -d)
ln -s "$PWD/kernels" "$shim/fastclip_kernels"
export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

timeout "$TEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_kernels_triton.py tests/test_kernels.py > "$OUT/tests.txt" 2>&1
rc=$?; echo "pytest exit code: $rc" >> "$OUT/tests.txt"; [ $rc -eq 0 ] || fail=1
tail -n 3 "$OUT/tests.txt"

plot_args() { $PY -c "import matplotlib" 2>/dev/null && echo "--plot $OUT/gpu_$1.png"; }
for loss in clip fastclip; do
  # shellcheck disable=SC2046
  timeout "$BENCH_TIMEOUT" $PY -m fastclip_kernels.bench --device cuda --dtype bf16 --batch 8192,32768 --dim 512 \
    --impl triton,chunked --loss "$loss" --repeats 10 --warmup 3 \
    --csv "$OUT/gpu_$loss.csv" --markdown "$OUT/gpu_$loss.md" $(plot_args "$loss") > "$OUT/bench_$loss.txt" 2>&1
  rc=$?; echo "bench exit code: $rc" >> "$OUT/bench_$loss.txt"; [ $rc -eq 0 ] || fail=1
  cat "$OUT/gpu_$loss.md" 2>/dev/null || tail -n 20 "$OUT/bench_$loss.txt"
done
exit $fail
