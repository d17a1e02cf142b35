#!/usr/bin/env bash
# GPU check for fastclip_kernels, for a session with a GPU (not run in CI). From the repo root:
#   OUT=/some/dir bash kernels/gpu_check.sh        (the device tool sets OUT itself)
# Needs only torch + triton + pytest (+ matplotlib for the plot), no install of this repo:
# `fastclip_kernels` is put on the path through a symlink to kernels/.
# Writes to $OUT: env.txt, tests.txt (kernel tests on CUDA, bf16/fp16/fp32), bench.txt and
# gpu.csv / gpu.md / gpu.png (bench at B=8192,32768, d=512, bf16: triton vs chunked vs dense).
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
shim=$(mktemp -d)
ln -s "$PWD/kernels" "$shim/fastclip_kernels"
export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1

timeout 300 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels_triton.py tests/test_kernels.py \
  > "$OUT/tests.txt" 2>&1
echo "pytest exit code: $?" >> "$OUT/tests.txt"

timeout 240 $PY -m fastclip_kernels.bench --device cuda --dtype bf16 --batch 8192,32768 --dim 512 \
  --impl triton,chunked,dense --repeats 10 --warmup 2 \
  --csv "$OUT/gpu.csv" --markdown "$OUT/gpu.md" --plot "$OUT/gpu.png" > "$OUT/bench.txt" 2>&1
echo "bench exit code: $?" >> "$OUT/bench.txt"
tail -n 3 "$OUT/tests.txt"
cat "$OUT/gpu.md" 2>/dev/null || tail -n 20 "$OUT/bench.txt"
