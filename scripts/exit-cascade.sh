#!/usr/bin/env bash
# The exit cascade (issue #17, item 4): exits that score only the candidate
# tokens cut a chain where a rival outscores the draft by a margin.
# 1. Calibration on the train split: `gpt-serve bench` on two slices of it
#    (the bench calls them "val" and "unseen"), the exits scoring every draft
#    and cutting none (`--exit-margin inf`); scripts/exit_margins.py turns the
#    margins into the share of accepted drafts a cut would lose and of
#    first-rejected drafts it would catch.
# 2. Interleaved A/B (research/examples/cascade_ab.rs): final-only verification and
#    the cascade at several margins, per prompt one after the other, greedy
#    and at temperature 0.8, on train slice A (tuning), the val split and
#    tinyshakespeare (reporting).
#
#   scripts/exit-cascade.sh [PROMPTS]    # default 40 per text
#
# Writes bench/exit-cascade/{calibration.json,calibration.md,ab.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-40}
OUT=bench/exit-cascade
DATA=../shared/data
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cargo build --release --bin gpt-serve && cargo build --release -p gpt-serve-research --example cascade_ab
BIN=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$OUT"
# `head` closes the pipe early, so zcat's SIGPIPE is expected here. The
# cut lines at both ends go (a byte cut can split a UTF-8 character).
slice() {
  (set +o pipefail; zcat "$DATA/gutenberg/train.txt.gz" | head -c "$1" | tail -c 4000000 |
    tail -n +2 | head -n -1)
}
slice 40000000 > "$TMP/trainA.txt"
slice 80000000 > "$TMP/trainB.txt"
"$BIN/gpt-serve" bench --no-gpt2 --prompts 24 --top-p 0.95 --modes tree+exits \
  --exit-margin inf --val "$TMP/trainA.txt" --unseen "$TMP/trainB.txt" \
  --out "$OUT/calibration.json"
{
  echo "Train split, two 4 MB slices (A at 36 MB, B at 76 MB), 24 prompts each, 128 tokens, top_p 0.95 at 0.8."
  echo
  python3 scripts/exit_margins.py "$OUT/calibration.json" |
    sed -e 's/^| val |/| train slice A |/' -e 's/^| unseen |/| train slice B |/'
} > "$OUT/calibration.md"
{
  for text in "$TMP/trainA.txt:train slice A" "$DATA/gutenberg/val.txt.gz:val" "$DATA/tinyshakespeare.txt:tinyshakespeare"; do
    for t in 0 0.8; do
      echo
      echo "### ${text#*:}, temperature $t, $N prompts"
      echo
      "$BIN/examples/cascade_ab" models/default "${text%%:*}" "$N" "$t" inf,0.5,1.0,2.0
    done
  done
} > "$OUT/ab.md"
cat "$OUT/ab.md"
