#!/usr/bin/env bash
# Serving benchmark, side by side in one run: gpt-serve (speculation off and
# on, per request) and llama.cpp's llama-server (continuous batching, 32
# slots) on the same weights (a GGUF of the blocks models/default serves), the same
# token-id prompts from the val split, 1/4/8/16/32 streaming clients, greedy
# and temperature 0.8, levels interleaved server by server. Checks first
# that both servers give the same greedy text. Outside CI (needs a built
# llama-server: see docs/benchmarks.md#serving; without LLAMA_SERVER only
# gpt-serve is measured).
#
#   LLAMA_SERVER=/path/to/llama-server scripts/serving-bench.sh [OUT_DIR]
#
# Each level sends 64 prompts no earlier level sent, to speculation on and
# off in turn, the order alternating level by level: the first run after a
# server has not yet held that many sequences pays for the memory, which
# showed as 1.3-2x the TTFT at 32 clients; an untimed warm-up at the
# largest level comes first, and another on each server at every level
# before its timed runs. CLIENTS and TEMPS pick the levels
# (default "1 4 8 16 32" and "0 0.8").
#
# BASELINE: optionally, another gpt-serve binary (e.g. an earlier commit's)
# measured the same way (the same WEIGHTS), interleaved with the others;
# BASELINE_ARGS: extra `serve` flags for it alone (e.g. `--kv-cache f16`).
# GPT_SERVE_KV_CACHE=f16 in the environment gives every gpt-serve server
# here f16 K/V, as llama-server keeps by default.
# WEIGHTS=q8_0 (or q4_0, f16, f32; default: what models/default serves,
# q8_0): both servers run these weights, ours with `--weights`, llama-server
# a GGUF of our very blocks from `gpt-serve export-gguf`. A quantized pair
# may differ in a greedy token where two logits tie within rounding (the two
# sum in different orders), so the text check only warns.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/serving}
bin=${GPT_SERVE:-${CARGO_TARGET_DIR:-target}/release/gpt-serve}
clients_levels=${CLIENTS:-1 4 8 16 32}
temps=${TEMPS:-0 0.8}
mkdir -p "$out"
weights=${WEIGHTS:-auto}
"$bin" serve --port 8100 ${weights:+--weights "$weights"} > "$out/gpt-serve.log" 2>&1 &
ours=$!
llama=""
if [ -n "${LLAMA_SERVER:-}" ]; then
    gguf="$out/default-$weights.gguf"
    "$bin" export-gguf --model models/default --out "$gguf" --weights "$weights"
    "$LLAMA_SERVER" -m "$gguf" --host 127.0.0.1 --port 8101 -t 2 -tb 2 \
        -np 32 -c 8192 --no-webui > "$out/llama-server.log" 2>&1 &
    llama=$!
fi
base=""
if [ -n "${BASELINE:-}" ]; then
    # shellcheck disable=SC2086 # BASELINE_ARGS is a list of flags
    "$BASELINE" serve --port 8102 ${weights:+--weights "$weights"} ${BASELINE_ARGS:-} > "$out/baseline.log" 2>&1 &
    base=$!
fi
trap 'kill $ours $llama $base 2>/dev/null || true' EXIT
for url in http://127.0.0.1:8100 ${llama:+http://127.0.0.1:8101} ${BASELINE:+http://127.0.0.1:8102}; do
    for _ in $(seq 120); do curl -sf "$url/health" > /dev/null && break; sleep 0.5; done
done

bench() { python3 scripts/serving_bench.py "$@"; }
levels=$(( $(wc -w <<< "$clients_levels") * $(wc -w <<< "$temps") ))
# 8 prompts for the check, then 64 fresh ones per level.
bench prompts --url http://127.0.0.1:8100 --text ../shared/data/gutenberg/val.txt.gz \
    --n $(( 8 + 64 * levels )) --out "$out/prompts.json"
[ -z "$llama" ] || bench check http://127.0.0.1:8100 http://127.0.0.1:8101 --prompts "$out/prompts.json" \
    || echo "serving-bench: the greedy texts differ (a near-tie, see above); measuring anyway" >&2
results="$out/results.jsonl"
rm -f "$results"
max_clients=$(tr ' ' '\n' <<< "$clients_levels" | sort -n | tail -1)
bench run --url http://127.0.0.1:8100 --label warm-up --prompts "$out/prompts.json" --count 8 \
    --repeat 8 --clients "$max_clients" --temps 0 --out "$out/warm-up.jsonl"
offset=8
level=0
for temp in $temps; do
    for clients in $clients_levels; do
        common=(--prompts "$out/prompts.json" --offset "$offset" --count 64 --clients "$clients" --temps "$temp" --out "$results")
        # Untimed, each server at this level first: the first run at a new
        # level was the slower one whichever mode it was (TTFT p50 296 vs
        # 176 ms at 32 clients), and put speculation below plain at 32
        # clients in every run that timed speculation first.
        warm=(--label warm-up --prompts "$out/prompts.json" --offset "$offset" --count $(( clients > 8 ? clients : 8 ))
              --clients "$clients" --temps "$temp" --out "$out/warm-up.jsonl")
        for url in http://127.0.0.1:8100 ${llama:+http://127.0.0.1:8101} ${base:+http://127.0.0.1:8102}; do
            bench run --url "$url" "${warm[@]}" > /dev/null
        done
        offset=$(( offset + 64 ))
        spec=(--label gpt-serve-spec)
        plain=(--label gpt-serve-plain --extra '{"speculate": false}')
        if (( level++ % 2 == 0 )); then first=("${spec[@]}") second=("${plain[@]}")
        else first=("${plain[@]}") second=("${spec[@]}"); fi
        bench run --url http://127.0.0.1:8100 "${first[@]}" "${common[@]}"
        bench run --url http://127.0.0.1:8100 "${second[@]}" "${common[@]}"
        # No prompt cache: gpt-serve has none for prompts' KV rows.
        [ -z "$llama" ] || bench run --url http://127.0.0.1:8101 --label llama-server --extra '{"cache_prompt": false}' "${common[@]}"
        if [ -n "$base" ]; then
            bench run --url http://127.0.0.1:8102 --label baseline-plain --extra '{"speculate": false}' "${common[@]}"
            bench run --url http://127.0.0.1:8102 --label baseline-spec "${common[@]}"
        fi
    done
done
reference=llama-server
[ -n "$llama" ] || reference=gpt-serve-plain
bench report --results "$results" --reference "$reference" | tee "$out/serving.md"
