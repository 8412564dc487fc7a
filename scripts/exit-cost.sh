#!/usr/bin/env bash
# The exits' share of training time with the default exit loss (issue #21):
# the non-final exits on every 8th step (`train`'s default), against the
# final exit only and the full exit loss on every step. `small` (batch 8 x 128, ROUNDS interleaved rounds)
# and the mission's `gpt2` layout (own heads at 8/10/12, batch 8 x 256, one
# round). An every-k run times k steps, one of them with the exits. The
# share of such a step is below this machine's noise between runs, so the
# report also derives it from the full and final runs of the same round:
# ((full - final) / k) / (final + (full - final) / k).
#
#   scripts/exit-cost.sh [ROUNDS]      # default 3; a quiet machine
#
# Writes bench/train-speed/exit-every.{jsonl,md}; REPORT_ONLY=1 rewrites the
# .md from the .jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
OUT=${OUT:-bench/train-speed}
if [ -z "${REPORT_ONLY:-}" ]; then
cargo build --release --example profile_train
EX=${CARGO_TARGET_DIR:-target}/release/examples
mkdir -p "$OUT"
: > "$OUT/exit-every.jsonl"
tag() { sed "s/^{/{\"round\": $1, \"run\": \"$2\", /" >> "$OUT/exit-every.jsonl"; }
for r in $(seq "$ROUNDS"); do
  echo "round $r $(date +%T)"
  "$EX/profile_train" --exits final --steps 8 | tag "$r" final
  "$EX/profile_train" --steps 8 | tag "$r" full
  "$EX/profile_train" --exit-every 8 --steps 8 | tag "$r" every8
done
G="--preset gpt2 --batch 8 --context 256"
"$EX/profile_train" $G --exits final --steps 2 | tag 1 gpt2-final
"$EX/profile_train" $G --exit-head own --steps 2 | tag 1 gpt2-own-full
"$EX/profile_train" $G --exit-head own --exit-every 8 --steps 8 | tag 1 gpt2-own-every8
fi
python3 - "$OUT/exit-every.jsonl" > "$OUT/exit-every.md" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["round"], r["run"]), r)
print("| preset | exit loss | round | s per step | tokens/s | exits' share of the step | derived from full and final |")
print("|---|---|---|---|---|---|---|")
shares = {}
for (rnd, run), r in sorted(by.items()):
    pre = "gpt2" if run.startswith("gpt2") else "small"
    fin = by.get((rnd, "gpt2-final" if pre == "gpt2" else "final"))
    share = 1 - fin["step_s"] / r["step_s"] if fin and fin is not r else None
    if share is not None:
        shares.setdefault(run, []).append(share)
    s = "-" if share is None else f"{100 * share:.1f}%"
    full = by.get((rnd, "gpt2-own-full" if pre == "gpt2" else "full"))
    k = r.get("exit_every", 1)
    d = "-"
    if fin and full and k > 1:
        extra = (full["step_s"] - fin["step_s"]) / k
        d = f"{100 * extra / (fin['step_s'] + extra):.1f}%"
    print(f"| {pre} | {run} | {rnd} | {r['step_s']:.3f} | {r['tok_s']:.0f} | {s} | {d} |")
print()
for run, v in shares.items():
    print(f"- {run}: median share {100 * st.median(v):.1f}% ({100 * min(v):.1f}-{100 * max(v):.1f}%)")
PY
cat "$OUT/exit-every.md"
