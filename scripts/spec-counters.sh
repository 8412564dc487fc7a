#!/usr/bin/env bash
# What speculation does to a loaded server's work, from its own counters:
# one server, the same 64 val prompts at CLIENTS concurrent streams (default
# 32) and temperature TEMP (default 0.8), speculation on and off per request,
# alternating ROUNDS times (default 2). Per run it prints the throughput and
# the /metrics deltas that say what the engine did: iterations, rows by kind
# (draft rows are speculation's extra work), and seconds spent in forwards,
# in drafting, and in whole iterations. Where on and off show the same
# iterations and rows, speculation cost only its drafting seconds, whatever
# the throughputs (which swing a few percent run to run on a shared machine).
#
#   GPT_SERVE=target/release/gpt-serve CLIENTS=8 scripts/spec-counters.sh [PROMPTS_JSON]
#
# PROMPTS_JSON: prompts from `scripts/serving_bench.py prompts` (made from
# the val split when absent). SERVE_ARGS: extra `serve` flags.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${GPT_SERVE:-${CARGO_TARGET_DIR:-target}/release/gpt-serve}
clients=${CLIENTS:-32}
temp=${TEMP:-0.8}
rounds=${ROUNDS:-2}
port=${PORT:-8110}
url=http://127.0.0.1:$port
work=$(mktemp -d)
# shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
"$bin" serve --port "$port" ${SERVE_ARGS:-} > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 120); do curl -sf "$url/health" > /dev/null && break; sleep 0.5; done
prompts=${1:-$work/prompts.json}
[ -f "$prompts" ] || python3 scripts/serving_bench.py prompts --url "$url" \
    --text ../shared/data/gutenberg/val.txt.gz --n 72 --out "$prompts"
bench() { python3 scripts/serving_bench.py run --url "$url" --prompts "$prompts" "$@"; }
bench --label warm-up --count 8 --repeat 8 --clients "$clients" --temps 0 --out "$work/warm.jsonl" > /dev/null
for _ in $(seq "$rounds"); do
    for mode in on off; do
        extra=()
        [ "$mode" = off ] && extra=(--extra '{"speculate": false}')
        curl -s "$url/metrics" > "$work/before"
        echo "speculation $mode: $(bench --label "$mode" --offset 8 --count 64 --clients "$clients" \
            --temps "$temp" --out "$work/runs.jsonl" "${extra[@]}" | tail -1)"
        curl -s "$url/metrics" > "$work/after"
        python3 - "$work/before" "$work/after" <<'PY'
import sys
def load(p):
    d = {}
    for line in open(p):
        if line.strip() and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            d[k] = float(v)
    return d
a, b = load(sys.argv[1]), load(sys.argv[2])
for key, name in [
    ("gpt_serve:iteration_seconds_count", "iterations"),
    ('gpt_serve:batch_rows_total{kind="decode"}', "decode rows"),
    ('gpt_serve:batch_rows_total{kind="draft"}', "draft rows"),
    ("gpt_serve:forward_seconds_sum", "forward s"),
    ("gpt_serve:draft_seconds_sum", "drafting s"),
    ("gpt_serve:iteration_seconds_sum", "iteration s"),
]:
    print(f"    {name}: {b.get(key, 0) - a.get(key, 0):g}")
PY
    done
done
