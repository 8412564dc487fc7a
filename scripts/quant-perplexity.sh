#!/usr/bin/env bash
# Held-out perplexity of the shipped model's final head for each weight
# storage (f32, f16, q8_0, q4_0) on the CPU inference path, as served:
# `gpt-serve eval --weights W` over the same consecutive windows of
# block_size tokens (each a fresh sequence; tokens 1..255 of a window are
# scored) of the val split's first 2 MB and of tinyshakespeare. Writes a
# markdown table beside the raw outputs. Outside CI (needs ../shared/data).
#
#   scripts/quant-perplexity.sh [OUT_DIR] [WINDOWS]   (default runs/quant-ppl, 400)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/quant-ppl}
windows=${2:-400}
bin=${GPT_SERVE:-${CARGO_TARGET_DIR:-target}/release/gpt-serve}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# head closes the pipe early: zcat's SIGPIPE is expected.
zcat ../shared/data/gutenberg/val.txt.gz | head -c 2000000 > "$tmp/val-2mb.txt" || true
declare -A file=([val]="$tmp/val-2mb.txt" [tinyshakespeare]=../shared/data/tinyshakespeare.txt)
for set in val tinyshakespeare; do
    for w in f32 f16 q8_0 q4_0; do
        "$bin" eval --weights "$w" --max-windows "$windows" "${file[$set]}" 2>/dev/null \
            | tee "$out/$set-$w.txt"
    done
done
python3 - "$out" <<'PY'
import math, re, sys
out = sys.argv[1]
rows = ["| weights | val ppl | vs f32 | tinyshakespeare ppl | vs f32 |", "|---|---|---|---|---|"]
ppl = {}
for s in ["val", "tinyshakespeare"]:
    for w in ["f32", "f16", "q8_0", "q4_0"]:
        m = re.search(r"loss ([0-9.]+), perplexity ([0-9.]+) over (\d+) tokens", open(f"{out}/{s}-{w}.txt").read())
        ppl[s, w] = (math.exp(float(m.group(1))), int(m.group(3)))
for w in ["f32", "f16", "q8_0", "q4_0"]:
    cells = []
    for s in ["val", "tinyshakespeare"]:
        p, base = ppl[s, w][0], ppl[s, "f32"][0]
        cells += [f"{p:.3f}", f"{100 * (p / base - 1):+.2f}%"]
    rows.append(f"| {w} | " + " | ".join(cells) + " |")
rows.append("")
rows.append(f"tokens scored: val {ppl['val', 'f32'][1]}, tinyshakespeare {ppl['tinyshakespeare', 'f32'][1]}")
open(f"{out}/perplexity.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
