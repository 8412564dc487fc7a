#!/usr/bin/env bash
# Packs what scripts/cuda-run.sh needs on the GPU machine into .gpu/ (ignored
# through .git/info/exclude; pass it as the device tool's `carry`): the CUDA
# binary, stripped and xz-compressed, the Gutenberg splits (train recompressed
# with xz) and the GPT-2 tokenizer. The working tree that travels is limited to
# 64 MiB, so everything is compressed hard.
#
#   scripts/cuda-build.sh && scripts/cuda-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
BIN=${CUDA_TARGET_DIR:-target-cuda}/release/gpt-serve
[ -x "$BIN" ] || { echo "cuda-pack: $BIN not found (run scripts/cuda-build.sh)"; exit 1; }
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
strip -o .gpu/gpt-serve "$BIN"
xz -9 -T2 -f .gpu/gpt-serve
if [ ! -f .gpu/train.txt.xz ]; then
  gzip -dc "$SHARED/gutenberg/train.txt.gz" | xz -9 -T2 > .gpu/train.txt.xz
fi
cp "$SHARED/gutenberg/val.txt.gz" .gpu/
mkdir -p .gpu/tokenizer-gpt2 && cp "$SHARED"/tokenizer-gpt2/* .gpu/tokenizer-gpt2/
du -sh .gpu/*
echo "travels: $(( ($(git ls-files -z | xargs -0 cat | wc -c) + $(du -sb .gpu | cut -f1)) / 1048576 )) MiB of 64"
