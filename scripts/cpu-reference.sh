#!/usr/bin/env bash
# Re-measures the CPU references of issue "fast CPU inference" (PyTorch eager
# and llama.cpp, f32, 2 threads, random GPT-2-layout weights at the `small`
# and `gpt2` shapes) and runs `gpt-serve bench --plain` right after, so ours
# and theirs come from one run on one machine state. Outside CI: PyPI's torch
# wheel brings ~5 GB of CUDA libraries, and llama-cpp-python compiles
# llama.cpp (~15 min on 2 cores).
#
#   scripts/cpu-reference.sh [OUT_PREFIX]   (default bench/plain-vs-reference)
#   scripts/cpu-reference.sh --hf DIR [OUT_PREFIX]
#
# --hf DIR measures a local Hugging Face GPT2LMHeadModel directory instead of
# random weights: PyTorch and llama.cpp load DIR, ours its `import-hf` (the
# "served" rows). REF_VENV picks the virtualenv (default
# ~/.cache/gpt-serve-ref-venv); REF_INSTALL=0 skips the pip install (and so
# llama.cpp, when llama-cpp-python is not installed already).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${REF_VENV:-$HOME/.cache/gpt-serve-ref-venv}
hf=""
if [ "${1:-}" = "--hf" ]; then
    hf=$2
    shift 2
fi
out=${1:-bench/plain-vs-reference}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ "${REF_INSTALL:-1}" != 0 ]; then
    "$venv/bin/pip" install -q torch transformers gguf llama-cpp-python numpy
fi
cargo build --release
bin=${CARGO_TARGET_DIR:-target}/release/gpt-serve
mkdir -p "$(dirname "$out")"
if [ -n "$hf" ]; then
    ck=$(mktemp -d)
    trap 'rm -rf "$ck"' EXIT
    "$bin" import-hf "$hf" --out "$ck/ck"
    "$venv/bin/python" scripts/cpu_reference.py --hf "$hf" > "$out.reference.json"
    "$bin" bench --plain --no-gpt2 --model "$ck/ck" --reference "$out.reference.json" --out "$out.json"
else
    "$venv/bin/python" scripts/cpu_reference.py > "$out.reference.json"
    "$bin" bench --plain --reference "$out.reference.json" --out "$out.json"
fi
echo "written: $out.reference.json, $out.json, $out.md"
