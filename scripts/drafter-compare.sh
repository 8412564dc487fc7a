#!/usr/bin/env bash
# Drafter classifiers side by side (research/examples/drafter_compare.rs): labels rows
# with a model (`gpt-serve train-drafter --drafter-rows-out`), then fits our
# GBDT, linfa-trees, smartcore and LightGBM on them. Outside CI: LightGBM is
# built from its C++ sources by the lightgbm3 crate, which needs cmake >= 3.28
# (installed here from PyPI into ~/.cache/gpt-serve-lgbm) and libclang (Debian:
# `apt-get install libclang-dev`); NO_LIGHTGBM=1 skips it.
#
#   scripts/drafter-compare.sh [MODEL_DIR] [OUT.md]     (K=255 token classes)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/default}
OUT=${2:-bench/drafter-compare.md}
K=${K:-255}
DATA=${DATA:-../shared/data/gutenberg}
WORK=${WORK:-$(mktemp -d)}
[ -f "$DATA/train.txt.gz" ] || { echo "drafter-compare: $DATA/train.txt.gz not found"; exit 1; }

features=compare
if [ -z "${NO_LIGHTGBM:-}" ]; then
  venv=$HOME/.cache/gpt-serve-lgbm
  [ -x "$venv/bin/cmake" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q 'cmake>=3.28'; }
  export PATH=$venv/bin:$PATH
  if [ -z "${LIBCLANG_PATH:-}" ]; then
    lib=$(ls /usr/lib/llvm-*/lib/libclang.so /usr/lib/x86_64-linux-gnu/libclang-*.so* 2>/dev/null | head -n1 || true)
    [ -n "$lib" ] || { echo "drafter-compare: libclang not found (apt-get install libclang-dev, or NO_LIGHTGBM=1)"; exit 1; }
    export LIBCLANG_PATH=$(dirname "$lib")
  fi
  features=lightgbm
fi

cargo build --release --bin gpt-serve
cargo build --release -p gpt-serve-research --features "$features" --example drafter_compare
# train-drafter writes drafter.json next to the model: work on a copy.
rm -rf "$WORK/model" && cp -r "$MODEL" "$WORK/model"
target/release/gpt-serve train-drafter --model "$WORK/model" \
  --data "$DATA/train.txt.gz" --val "$DATA/val.txt.gz" \
  --drafter-classes "$K" --drafter-rows-out "$WORK/rows.json" >"$WORK/train-drafter.log"
target/release/examples/drafter_compare "$WORK/rows.json" "$OUT"
