#!/usr/bin/env bash
# Re-measures the CPU references of issue "fast CPU inference" (PyTorch eager
# and llama.cpp, f32, 2 threads, random GPT-2-layout weights at the `small`
# and `gpt2` shapes) and runs `gpt-serve bench --plain` right after, so ours
# and theirs come from one run on one machine state. Outside CI: PyPI's torch
# wheel brings ~5 GB of CUDA libraries, and llama-cpp-python compiles
# llama.cpp (~15 min on 2 cores).
#
#   scripts/cpu-reference.sh [OUT_PREFIX]   (default bench/plain-vs-reference)
#
# REF_VENV picks the virtualenv (default ~/.cache/gpt-serve-ref-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${REF_VENV:-$HOME/.cache/gpt-serve-ref-venv}
out=${1:-bench/plain-vs-reference}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q torch transformers gguf llama-cpp-python numpy
cargo build --release
mkdir -p "$(dirname "$out")"
"$venv/bin/python" scripts/cpu_reference.py > "$out.reference.json"
target/release/gpt-serve bench --plain --reference "$out.reference.json" --out "$out.json"
echo "written: $out.reference.json, $out.json, $out.md"
