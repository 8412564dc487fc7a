#!/usr/bin/env bash
# The continuation cache on and off, side by side in one run: two gpt-serve
# servers (--suffix-cache-tokens 262144, and 0), speculation on, the same
# token-id prompts from the val split, 128 new tokens, streaming clients.
# Two workloads per level, each on prompts no earlier level sent:
#   fresh  64 distinct prompts, each sent once;
#   mixed  32 distinct prompts, each sent twice in a row by one client
#          (half the requests repeat an earlier one; at t > 0 the repeat
#          has its own seed, so only its prompt and part of its output
#          recur).
# Levels interleaved server by server, the order alternating level by
# level, after an untimed warm-up of both at the largest level (the first
# run at a new peak of sequences pays for the memory). Outside CI.
#
#   scripts/suffix-cache-bench.sh [OUT_DIR]      # CLIENTS="1 8 32" TEMPS="0 0.8"
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/suffix-cache}
bin=${GPT_SERVE:-${CARGO_TARGET_DIR:-target}/release/gpt-serve}
clients_levels=${CLIENTS:-1 8 32}
temps=${TEMPS:-0 0.8}
mkdir -p "$out"
"$bin" serve --port 8110 --suffix-cache-tokens 262144 > "$out/cache-on.log" 2>&1 &
on=$!
"$bin" serve --port 8111 --suffix-cache-tokens 0 > "$out/cache-off.log" 2>&1 &
off=$!
trap 'kill $on $off 2>/dev/null || true' EXIT
for url in http://127.0.0.1:8110 http://127.0.0.1:8111; do
    for _ in $(seq 120); do curl -sf "$url/health" > /dev/null && break; sleep 0.5; done
done

bench() { python3 scripts/serving_bench.py "$@"; }
levels=$(( $(wc -w <<< "$clients_levels") * $(wc -w <<< "$temps") ))
bench prompts --url http://127.0.0.1:8110 --text ../shared/data/gutenberg/val.txt.gz \
    --n $(( 8 + 96 * levels )) --out "$out/prompts.json"
results="$out/results.jsonl"
rm -f "$results"
max_clients=$(tr ' ' '\n' <<< "$clients_levels" | sort -n | tail -1)
for port in 8110 8111; do
    bench run --url http://127.0.0.1:$port --label warm-up --prompts "$out/prompts.json" --count 8 \
        --repeat 8 --clients "$max_clients" --temps 0 --out "$out/warm-up.jsonl"
done
offset=8
level=0
for temp in $temps; do
    for clients in $clients_levels; do
        for workload in fresh mixed; do
            case $workload in
                fresh) slice=(--offset "$offset" --count 64); offset=$(( offset + 64 )) ;;
                mixed) slice=(--offset "$offset" --count 32 --repeat 2); offset=$(( offset + 32 )) ;;
            esac
            common=(--prompts "$out/prompts.json" "${slice[@]}" --workload "$workload"
                --clients "$clients" --temps "$temp" --out "$results")
            with_cache=(--url http://127.0.0.1:8110 --label cache-on)
            without=(--url http://127.0.0.1:8111 --label cache-off)
            if (( level++ % 2 == 0 )); then first=("${with_cache[@]}") second=("${without[@]}")
            else first=("${without[@]}") second=("${with_cache[@]}"); fi
            bench run "${first[@]}" "${common[@]}"
            bench run "${second[@]}" "${common[@]}"
        done
    done
done
bench report --results "$results" --reference cache-off | tee "$out/suffix-cache.md"
