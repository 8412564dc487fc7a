#!/usr/bin/env bash
# Training-efficiency ablation (issue #6): the `small` preset on the Gutenberg
# train split, baseline vs each option alone vs all combined, 2 seeds, same
# data order (batch s depends only on (seed, s)), equal tokens per arm.
#
#   scripts/ablate.sh train   # every arm x seed, resumable, skips finished arms
#   scripts/ablate.sh speed   # tokens/s of every arm side by side (quiet machine!)
#   scripts/ablate.sh report  # table + plot into bench/ablation.{md,json,png}
#
# Env: BIN (gpt-serve binary), RUNS (run dir), STEPS, BATCH, CTX, SEEDS,
# ONLY (space-separated arm names; default all), SUITE (`options`: the
# training options above; `exits`: the exit losses of issue #21, into
# runs/exit-ablation and bench/exit-ablation/).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/gpt-serve}
RUNS=${RUNS:-runs/ablation}
DATA=${DATA:-../shared/data/gutenberg}
STEPS=${STEPS:-160}
BATCH=${BATCH:-8}
CTX=${CTX:-64}
SEEDS=${SEEDS:-"1 2"}
ONLY=${ONLY:-}
SUITE=${SUITE:-options}
[ -f "$DATA/train.txt.gz" ] || { echo "ablate: $DATA/train.txt.gz not found (needs ../shared/data)"; exit 1; }

# name | extra flags. Exits "final" = one head; default exits = 4/5/6 at 0.05/0.15/0.8.
ARMS=(
  "base|--exits final"
  "exits|--exit-every 1"
  "exits-frac|--exit-every 1 --exit-frac 0.25 --exit-compensate"
  "dwa|--exits final --dwa 1x1"
  "compress-skip|--exits final --n-embd 256 --n-head 4 --x0-skip"
  "hyper|--exits final --schedule hyper"
  "hyper-speed|--exit-frac 0.25 --exit-every 2 --exit-compensate --schedule hyper-speed"
  "wsd|--exits final --schedule wsd"
  "combo|--n-embd 256 --n-head 4 --x0-skip --dwa 1x1 --exit-every 1 --exit-frac 0.25 --exit-compensate"
  # The one option that paid per wall-clock, with the exits serving needs.
  "compress-skip-exits|--n-embd 256 --n-head 4 --x0-skip --exit-every 1"
  # Peak-LR sweep of the two fixed schedules (1e-3 is `base` / `wsd`); the
  # best peak is picked by the last 20 steps' training loss (batches seen
  # once: a slice of train), never by val.
  "base-lr5e-4|--exits final --lr 5e-4"
  "base-lr2e-3|--exits final --lr 2e-3"
  "base-lr4e-3|--exits final --lr 4e-3"
  "wsd-lr5e-4|--exits final --schedule wsd --lr 5e-4"
  "wsd-lr2e-3|--exits final --schedule wsd --lr 2e-3"
  "wsd-lr4e-3|--exits final --schedule wsd --lr 4e-3"
  "base-lr2.5e-4|--exits final --lr 2.5e-4"
  "wsd-lr2.5e-4|--exits final --schedule wsd --lr 2.5e-4"
)

if [ "$SUITE" = exits ]; then
  RUNS=${RUNS_EXITS:-runs/exit-ablation}
  # The exit losses of issue #21: none, the full loss, the full loss on
  # 1/8 of the positions (rescaled), and that with the other positions
  # scored on the target and the final head's top-32 candidates.
  ARMS=(
    "base|--exits final"
    "exits|--exit-every 1"
    "exits-frac8|--exit-every 1 --exit-frac 0.125 --exit-compensate"
    # The same positions at the exits' own weights (1/8 of the full exit
    # loss's weight in total: --exit-compensate rescales by 8).
    "exits-frac8-w|--exit-every 1 --exit-frac 0.125 --exit-compensate --exits 4:0.00625,5:0.01875,6:0.8"
    # The other 7/8 scored on the target, the exit's own top-2 tokens
    # where it saw the whole vocabulary (up to 32, shared) and the final
    # head's top 32: 65 candidates.
    "exits-frac8-cand32h|--exit-every 1 --exit-frac 0.125 --exit-candidates 32"
    # Without compensation each scored row pulls on the trunk as hard as
    # under the full loss: 1/16 of the positions, or the whole exit loss on
    # every 8th step (the default since; run with an older binary these
    # read "--exit-frac 0.0625 --exits 4:0.0001953125,5:0.0005859375,6:0.8"
    # and "--exit-every 8 --exits 4:0.00625,5:0.01875,6:0.8").
    "exits-frac16-row|--exit-every 1 --exit-frac 0.0625"
    "exits-every8-row|--exit-every 8"
    "exits-every12-row|--exit-every 12"
    # Equal wall-clock with `exits` (300 steps): the steps the same time
    # buys at the step costs of bench/train-speed/exit-every.jsonl (median
    # of 3 rounds: full / every-8th = 1.298, full / final only = 1.356).
    "exits-every8-wall|--exit-every 8 --steps 389"
    "base-wall|--exits final --steps 407"
  )
fi
mkdir -p "$RUNS"

tokenizer() {
  # One BPE for all arms, so every arm sees the same token stream.
  if [ ! -f "$RUNS/tokenizer.json" ]; then
    "$BIN" train "$DATA/train.txt.gz" --val "$DATA/val.txt.gz" --out "$RUNS/_tok" \
      --preset small --steps 1 --batch-size 1 --context 8 --drafter false --eval-batches 1 >/dev/null
    cp "$RUNS/_tok/tokenizer.json" "$RUNS/tokenizer.json"
  fi
}

common() {
  echo "$DATA/train.txt.gz --val $DATA/val.txt.gz --preset small --tokenizer $RUNS/tokenizer.json \
    --batch-size $BATCH --context $CTX --warmup 20 --eval-every 40 --eval-batches 16 \
    --save-every 40 --drafter false"
}

train_arms() {
  tokenizer
  for seed in $SEEDS; do
    for arm in "${ARMS[@]}"; do
      name=${arm%%|*}; flags=${arm#*|}
      dir="$RUNS/$name-s$seed"
      if [ -f "$dir/done" ]; then continue; fi
      if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
      echo "== $name seed $seed $(date +%T)"
      if [ -f "$dir/trainer.json" ]; then
        "$BIN" train $(common) --out "$dir" --resume 2>"$dir.log"
      else
        steps="--steps $STEPS"
        [[ $flags == *--steps* ]] && steps=""
        # shellcheck disable=SC2086
        "$BIN" train $(common) --out "$dir" --seed "$seed" $steps $flags 2>"$dir.log"
      fi
      touch "$dir/done"
    done
  done
}

speed_arms() {
  tokenizer
  # 12 steps of every arm back to back; tok/s from steps 3..11 of each.
  for arm in "${ARMS[@]}"; do
    name=${arm%%|*}; flags=${arm#*|}
    # A peak LR does not change the step's cost: the sweep shares its
    # schedule's figure.
    [[ $name == *-lr* ]] && continue
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
    dir="$RUNS/speed/$name"
    rm -rf "$dir"; mkdir -p "$dir"
    # shellcheck disable=SC2086
    # (the last step also evaluates and saves; the report times steps 3..11)
    "$BIN" train $(common) --out "$dir" --seed 1 --steps 12 $flags > /dev/null 2> "$dir.log"
  done
}

case "${1:-}" in
  train) train_arms ;;
  speed) speed_arms ;;
  report)
    if [ "$SUITE" = exits ]; then
      mkdir -p bench/exit-ablation
      python3 scripts/exit_ablation_summary.py "$RUNS" > bench/exit-ablation/summary.md
    else
      cargo run --release -p gpt-serve-research --example ablation_report -- "$RUNS" bench
    fi ;;
  *) echo "usage: $0 train|speed|report"; exit 2 ;;
esac
