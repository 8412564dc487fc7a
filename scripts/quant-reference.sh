#!/usr/bin/env bash
# Plain decoding with quantized weights against llama.cpp on the same
# numbers (issue #32): `gpt-serve export-gguf` writes the shipped model and
# the random gpt2-layout model (seed 0, the weights `bench --plain` times
# as "random gpt2"; examples/random_checkpoint.rs) as f16, Q8_0 and Q4_0
# GGUF files holding our own blocks; llama.cpp's `llama-bench` times them
# (2 threads, decode of 128 / 32 tokens, prefill of 64) between two runs of
# `gpt-serve bench --plain` (q8_0, then q4_0; each also times f32 and f16).
# Outside CI (needs a llama.cpp build).
#
#   LLAMA_BIN=/path/to/llama.cpp/build/bin scripts/quant-reference.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/quant-ref}
bin=${GPT_SERVE:-${CARGO_TARGET_DIR:-target}/release/gpt-serve}
ex=${RANDOM_CHECKPOINT:-${CARGO_TARGET_DIR:-target}/release/examples/random_checkpoint}
: "${LLAMA_BIN:?set LLAMA_BIN to the llama.cpp build/bin directory}"
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$ex" gpt2 ../shared/data/tokenizer-gpt2 "$tmp/gpt2"
declare -A ck=([default]=models/default [gpt2]="$tmp/gpt2")
for m in default gpt2; do
    for w in f16 q8_0 q4_0; do
        "$bin" export-gguf --model "${ck[$m]}" --out "$tmp/$m-$w.gguf" --weights "$w"
    done
done
llama() {
    "$LLAMA_BIN/llama-bench" -m "$tmp/default-f16.gguf,$tmp/default-q8_0.gguf,$tmp/default-q4_0.gguf" \
        -t 2 -p 64 -n 128 -r 3 -o json > "$out/llama-default-$1.json"
    "$LLAMA_BIN/llama-bench" -m "$tmp/gpt2-f16.gguf,$tmp/gpt2-q8_0.gguf,$tmp/gpt2-q4_0.gguf" \
        -t 2 -p 64 -n 32 -r 3 -o json > "$out/llama-gpt2-$1.json"
}
llama 1
"$bin" bench --plain --weights q8_0 --out "$out/ours-q8_0.json" > /dev/null
llama 2
"$bin" bench --plain --weights q4_0 --out "$out/ours-q4_0.json" > /dev/null
python3 scripts/quant_reference_report.py "$out" | tee "$out/quant-reference.md"
