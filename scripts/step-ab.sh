#!/usr/bin/env bash
# Interleaved A/B of two builds of examples/batch_step (one decode step of
# the shipped model): PAIRS pairs, alternating which binary runs first,
# each printing its median step over STEPS steps at SEQS rows. Prints each
# pair's times, then the median of the new/base ratios. On a shared machine
# only such paired ratios mean anything (docs/benchmarks.md).
#
#   cargo build --release --example batch_step && cp target/release/examples/batch_step /tmp/new
#   git stash && cargo build --release --example batch_step && cp target/release/examples/batch_step /tmp/base && git stash pop
#   scripts/step-ab.sh /tmp/base /tmp/new 1 16 1500
set -euo pipefail
base=$(realpath "${1:?usage: step-ab.sh BASE_BIN NEW_BIN [SEQS] [PAIRS] [STEPS]}")
new=$(realpath "${2:?usage: step-ab.sh BASE_BIN NEW_BIN [SEQS] [PAIRS] [STEPS]}")
seqs=${3:-1}
pairs=${4:-16}
steps=${5:-1500}
cd "$(dirname "$0")/.."
step() { SEQS=$seqs STEPS=$steps "$1" 2>&1 | tail -1 | sed -E 's/.*median step ([0-9.]+) ms.*/\1/'; }
ratios=()
for i in $(seq 1 "$pairs"); do
  if (( i % 2 )); then n=$(step "$new"); b=$(step "$base"); else b=$(step "$base"); n=$(step "$new"); fi
  echo "pair $i: base $b ms, new $n ms"
  ratios+=("$(awk -v n="$n" -v b="$b" 'BEGIN { printf "%.4f", n / b }')")
done
printf '%s\n' "${ratios[@]}" | sort -g | awk -v s="$seqs" '
  { r[NR] = $1; if ($1 < 1) faster++ }
  END { m = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2;
        printf "SEQS=%s: new/base median %.3f over %d pairs, new faster in %d\n", s, m, NR, faster }'
