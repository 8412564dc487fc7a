#!/usr/bin/env bash
# The lm-eval path (HTTP echo + logprobs) against `gpt-serve eval` on the
# same tokens, f32 and q8_0: two servers of models/default (ports 8110,
# 8111), scripts/quant_echo_check.py scores WINDOWS windows of 256 tokens of
# tinyshakespeare through each, then `gpt-serve eval --token-ids` scores
# the same ids. Outside CI (needs ../shared/data).
#
#   scripts/quant-echo-check.sh [OUT_DIR] [WINDOWS]   (default runs/quant-echo, 40)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/quant-echo}
windows=${2:-40}
bin=${GPT_SERVE:-${CARGO_TARGET_DIR:-target}/release/gpt-serve}
mkdir -p "$out"
"$bin" serve --port 8110 --weights f32 > "$out/serve-f32.log" 2>&1 &
a=$!
"$bin" serve --port 8111 --weights q8_0 > "$out/serve-q8_0.log" 2>&1 &
b=$!
trap 'kill $a $b 2>/dev/null || true' EXIT
for url in http://127.0.0.1:8110 http://127.0.0.1:8111; do
    for _ in $(seq 120); do curl -sf "$url/health" > /dev/null && break; sleep 0.5; done
done
python3 scripts/quant_echo_check.py --text ../shared/data/tinyshakespeare.txt \
    --windows "$windows" --ids-out "$out/ids.json" \
    http://127.0.0.1:8110 http://127.0.0.1:8111 | tee "$out/echo.jsonl"
for w in f32 q8_0; do
    "$bin" eval --weights "$w" --token-ids "$out/ids.json" 2>/dev/null | tail -1 | tee "$out/eval-$w.txt"
done
