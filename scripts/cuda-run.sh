#!/usr/bin/env bash
# Runs on the GPU machine (CUDA libraries under Python's site-packages, no
# Rust, no ../shared): one prepared session bounded by BUDGET seconds, from the
# pack that scripts/cuda-pack.sh made (.gpu/, carried). Writes under $OUT
# (default ./cuda-out) at most 8 files: results.tar.gz (logs, metrics, JSON)
# and the trained weights.
#   1. sanity: a tiny model, 10 steps on cuda:0 and on the CPU, same seed
#      (also tokenizes the train split once into the token cache);
#   2. default-model candidates, in parallel on the GPU for MINUTES each:
#      a = 6 x 256 continued from models/default, b = 6 x 384 from scratch,
#      same tokenizer, exits 4/5/6;
#   3. throughput, solo: ours at the default shape and at the gpt2 preset
#      (final exit only, and exits 8/10/12 with exit-frac 0.25), then PyTorch
#      eager at the same shapes (scripts/torch_gpu_reference.py).
# Usage there: OUT=... scripts/cuda-run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET:-560}
MINUTES=${MINUTES:-4.5}
OUT=${OUT:-cuda-out}
PACK=${PACK:-.gpu}
W=${WORK:-/tmp/gpu}
DEV=${DEVICE:-cuda:0} # DEVICE=cpu BIN=target/release/gpt-serve: a dry run of the plumbing
mkdir -p "$OUT" "$W/cache"
now() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(now))); }
say() { echo "[$(now)s] $*" | tee -a "$W/session.log"; }
unxz() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'), 1<<24)" "$1" "$2"; }
finish() { # small files in one archive (the file-count limit), weights apart
  tar -czf "$OUT/results.tar.gz" -C "$W" --exclude='*.safetensors' --exclude=cache \
    --exclude=gpt-serve --exclude=train.txt --exclude=val.txt.gz --exclude=tokenizer.json . 2>/dev/null
  say "results packed ($(du -sh "$OUT" | cut -f1) under OUT)"
}

# Libraries (cuBLAS, cuRAND, NVRTC) from the pip packages of the image.
sp=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  p=$(find "$sp/nvidia" -name "$l*" -not -path '*/stubs/*' 2>/dev/null | head -n1)
  [ -n "$p" ] || p=$(find / -xdev -name "$l*" -not -path '*/stubs/*' 2>/dev/null | head -n1)
  [ -n "$p" ] && export LD_LIBRARY_PATH="$(dirname "$p"):${LD_LIBRARY_PATH:-}"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpu.csv" 2>&1
if [ -z "${BIN:-}" ]; then
  unxz "$PACK/gpt-serve.xz" "$W/gpt-serve" && chmod +x "$W/gpt-serve"
  BIN=$W/gpt-serve
fi
unxz "$PACK/train.txt.xz" "$W/train.txt"
cp "$PACK/val.txt.gz" "$W/"
TOK=models/default/tokenizer.json
say "unpacked; $(tail -n1 "$W/gpu.csv")"

# 1. Sanity (and the train split's token cache).
for dev in "$DEV" cpu; do
  timeout 240 "$BIN" train "$W/train.txt" --val "$W/val.txt.gz" --out "$W/tiny-${dev%%:*}" \
    --tokenizer "$TOK" --n-layer 2 --n-embd 64 --n-head 2 --block-size 64 --batch-size 8 \
    --steps 10 --eval-every 0 --save-every 0 --drafter false --device "$dev" --seed 7 \
    --cache-dir "$W/cache" > "$W/tiny-${dev%%:*}.json" 2> "$W/tiny-${dev%%:*}.log"
  rc=$?
  say "tiny $dev rc=$rc"
  if [ $rc -ne 0 ] && [ "$dev" = "$DEV" ]; then tail -n 30 "$W/tiny-${dev%%:*}.log"; finish; exit 1; fi
done

# 2. Default-model candidates, in parallel.
common=(--val "$W/val.txt.gz" --batch-size "${BATCH:-128}" --exit-every 1 --exit-frac 0.25 --exit-compensate --eval-every 250
  --eval-batches 16 --save-every 300 --save-dtype f16 --drafter false --device "$DEV"
  --cache-dir "$W/cache" --minutes "$MINUTES")
"$BIN" train "$W/train.txt" --out "$W/a" --init-from models/default --lr 2e-3 --warmup 50 \
  --seed 1339 "${common[@]}" > "$W/a.json" 2> "$W/a.log" &
pa=$!
"$BIN" train "$W/train.txt" --out "$W/b" --tokenizer "$TOK" --n-layer 6 --n-embd 384 --n-head 6 \
  --block-size 256 --exits 4:0.05,5:0.15,6:0.8 --lr 2e-3 --warmup 100 \
  --seed 1340 "${common[@]}" > "$W/b.json" 2> "$W/b.log" &
pb=$!
say "candidates started (a=$pa, b=$pb, $MINUTES min each)"
deadline=$(($(now) + ${MINUTES%.*} * 60 + 150))
while kill -0 $pa 2>/dev/null || kill -0 $pb 2>/dev/null; do
  if [ "$(now)" -gt "$deadline" ] || [ "$(left)" -lt 60 ]; then
    say "candidates over time: stopping"; kill $pa $pb 2>/dev/null; sleep 3; break
  fi
  sleep 5
done
wait $pa; ra=$?; wait $pb; rb=$?
say "candidates done: a rc=$ra, b rc=$rb"
[ -f "$W/a/model.safetensors" ] && split -b 15M -d "$W/a/model.safetensors" "$OUT/a.safetensors.part"
[ -f "$W/b/model.safetensors" ] && split -b 15M -d "$W/b/model.safetensors" "$OUT/b.safetensors.part"
finish

# 3. Throughput, one job at a time, each bounded by the time left.
bounded() { # name, seconds, command...: skipped unless it fits in the time left
  local name=$1 secs=$2; shift 2
  [ "$(left)" -gt $((secs + 20)) ] || { say "skip $name (time)"; return; }
  timeout "$secs" "$@" > "$W/$name.json" 2> "$W/$name.log"
  say "$name rc=$?"
}
ours() { # name, seconds, train args...
  local name=$1 secs=$2; shift 2
  bounded "$name" "$secs" "$BIN" train "$@" --out "$W/$name" --eval-every 0 --save-every 0 \
    --drafter false --device "$DEV" --cache-dir "$W/cache"
}
torchref() { # name, seconds, torch_gpu_reference.py args...
  local name=$1 secs=$2; shift 2
  bounded "$name" "$secs" python3 scripts/torch_gpu_reference.py "$@"
}
ours ours-small 60 "$W/train.txt" --val "$W/val.txt.gz" --tokenizer "$TOK" --n-layer 6 --n-embd 256 \
  --n-head 4 --block-size 256 --batch-size 128 --steps 40 --exit-every 1 --exit-frac 0.25 --exit-compensate
torchref torch-small-f32 60 --layers 6 --embd 256 --heads 4 --vocab 4096 --batch 128 --context 256 \
  --dtype f32 --modes eager --steps 40
G=(--val "$W/val.txt.gz" --preset gpt2 --tokenizer gpt2 --gpt2-dir "$PACK/tokenizer-gpt2"
  --batch-size 16 --context 1024 --steps 20)
ours ours-gpt2-final 90 "$W/val.txt.gz" "${G[@]}" --exits final
ours ours-gpt2-exits 90 "$W/val.txt.gz" "${G[@]}" --exit-every 1 --exit-frac 0.25 --exit-compensate
torchref torch-gpt2-f32 60 --dtype f32 --modes eager --steps 20
torchref torch-gpt2-bf16 60 --dtype bf16 --modes eager --steps 20
finish
say "done"
