#!/usr/bin/env bash
# Runs on the GPU machine (CUDA libraries under Python's site-packages, no
# Rust): finds cuBLAS/cuRAND/NVRTC, then one prepared, fixed-size session
# that writes JSON under $OUT (default ./cuda-out):
#   1. tiny preset: the same seed on cuda:0 and on the CPU, loss curves to compare;
#   2. gpt2 preset, batch 16 x 1024: training tokens/s for a fixed step count;
#   3. serving: plain and speculative decode tokens/s of models/default on the GPU;
#   4. the PyTorch reference of the same gpt2 layout (eager and compiled), if torch imports.
# Usage there: scripts/cuda-run.sh [path/to/gpt-serve]
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target-cuda/release/gpt-serve}
OUT=${OUT:-cuda-out}
mkdir -p "$OUT"
lib=$(find / -xdev -name 'libcublas.so.13*' -not -path '*/stubs/*' 2>/dev/null | head -n1)
[ -n "$lib" ] || { echo "cuda-run: libcublas.so.13 not found"; exit 1; }
for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  p=$(find / -xdev -name "$l*" -not -path '*/stubs/*' 2>/dev/null | head -n1)
  [ -n "$p" ] && export LD_LIBRARY_PATH="$(dirname "$p"):${LD_LIBRARY_PATH:-}"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
SHARED=${SHARED:-../shared/data}
DATA=${DATA:-$SHARED/tinyshakespeare.txt}
G=${GUTENBERG:-$SHARED/gutenberg}
# 1. Same loss curve on GPU and CPU (tiny, 60 steps, same seed).
for dev in cuda:0 cpu; do
  "$BIN" train "$DATA" --out "$OUT/tiny-$dev" --preset tiny --steps 60 --eval-every 20 \
    --drafter false --device "$dev" --seed 7 > "$OUT/tiny-$dev.json" 2> "$OUT/tiny-$dev.log"
done
# 2. gpt2 throughput, 3 exits (tied heads, exit loss on 25% of positions) and final-only.
for arm in "final|--exits final" "exits|--exit-frac 0.25"; do
  name=${arm%%|*}; flags=${arm#*|}
  # shellcheck disable=SC2086
  timeout 240 "$BIN" train "$G/train.txt.gz" --val "$G/val.txt.gz" --out "$OUT/gpt2-$name" \
    --preset gpt2 --tokenizer gpt2 --gpt2-dir "$SHARED/tokenizer-gpt2" --batch-size 16 --context 1024 \
    --steps 40 --eval-every 0 --save-every 0 --drafter false --device cuda:0 $flags \
    > "$OUT/gpt2-$name.json" 2> "$OUT/gpt2-$name.log"
done
# 3. Serving on the GPU (candle backend): plain and speculative.
"$BIN" bench --model models/default --out "$OUT/serve-bench.json" > "$OUT/serve-bench.md" 2>&1 || true
# 4. PyTorch reference, same layout, same GPU.
python3 scripts/torch_gpu_reference.py --steps 40 > "$OUT/torch-gpt2.json" 2> "$OUT/torch-gpt2.log" || true
ls -la "$OUT"
