#!/usr/bin/env bash
# Training speed side by side (issue #21): gpt-serve's trainer
# (examples/profile_train.rs) and PyTorch eager / torch.compile
# (scripts/torch_train_speed.py) on the same config (`small`, 6 x 384,
# vocab 8192, batch 8 x 128, three tied exits, AdamW, f32, 2 threads),
# with the training GEMM against torch.matmul at the training shapes, in
# ROUNDS interleaved rounds; then the `gpt2` preset with own exit heads at
# 8/10/12, priced with and without the cheap exit loss.
#
#   scripts/train-speed.sh [ROUNDS]     # default 3; needs PyTorch in TORCH_PY
#
# Writes bench/train-speed/results.{jsonl,md}. Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${TORCH_PY:-$HOME/.cache/gpt-serve-ref-venv/bin/python}
ROUNDS=${1:-3}
OUT=${OUT:-bench/train-speed}
"$PY" -c "import torch" 2>/dev/null || {
  echo "train-speed: no PyTorch at $PY (set TORCH_PY to a python with torch)"; exit 1; }
cargo build --release --example profile_train --example train_gemm_bench
EX=${CARGO_TARGET_DIR:-target}/release/examples
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
tag() { sed "s/^{/{\"round\": $1, \"run\": \"$2\", /" >> "$OUT/results.jsonl"; }
for r in $(seq "$ROUNDS"); do
  echo "round $r $(date +%T)"
  "$PY" scripts/torch_train_speed.py --gemm | tag "$r" gemm
  "$EX/train_gemm_bench" | tag "$r" gemm
  "$PY" scripts/torch_train_speed.py --compile | tag "$r" full
  "$PY" scripts/torch_train_speed.py final | tag "$r" final
  "$EX/profile_train" | tag "$r" full
  "$EX/profile_train" --exits final | tag "$r" final
  "$EX/profile_train" --exit-frac 0.125 | tag "$r" frac8
  "$EX/profile_train" --exit-frac 0.125 --exit-candidates 32 | tag "$r" frac8-cand32
done
# The mission's layout: gpt2 (12 x 768, vocab 50257), own heads at 8/10/12.
for run in "final|--exits final" "own-full|--exit-head own" "own-frac8|--exit-head own --exit-frac 0.125" \
           "own-frac8-cand32|--exit-head own --exit-frac 0.125 --exit-candidates 32"; do
  "$EX/profile_train" --preset gpt2 --batch 8 --context 256 --steps 2 ${run#*|} | tag 1 "gpt2-${run%%|*}"
done
python3 scripts/train_speed_report.py "$OUT/results.jsonl" > "$OUT/results.md"
cat "$OUT/results.md"
