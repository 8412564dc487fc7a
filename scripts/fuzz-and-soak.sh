#!/usr/bin/env bash
# Proof under fuzzing and load, bounded, on 127.0.0.1 only:
# 1. schemathesis against proto/openapi.json with a fixed seed: at least
#    1,000 generated requests, no 5xx, and every response conforming to
#    the document (status codes, content types, bodies);
# 2. a soak (scripts/soak.py): 64 streaming clients for SOAK_SECONDS, some
#    hanging up at random or reading slowly; no unexpected errors, capacity
#    back at the end, resident memory within 10% of its level after warm-up.
# Usage: scripts/fuzz-and-soak.sh BIN
set -euo pipefail
BIN=${1:-target/release/gpt-serve}
MODEL=${MODEL:-models/default}
SOAK_SECONDS=${SOAK_SECONDS:-300}
if [[ ! -f $MODEL/config.json ]]; then
  # The shipped model is part of the repository: its absence is a broken
  # checkout, not a reason to pass.
  echo "fuzzing and soak: no model at $MODEL (config.json missing)" >&2
  exit 1
fi
VENV=${FUZZ_VENV:-$HOME/.cache/gpt-serve-fuzz-venv}
source "$(dirname "$0")/local-server.sh"
venv_with "$VENV" "schemathesis==4.32.5" 'bin/schemathesis --version | grep -q 4.32.5'
start_server "$BIN" "$MODEL" --max-active 32 --max-waiting 64 2>"$(mktemp -t gpt-serve-fuzz-soak.XXXX.log)"

REPORT=$(mktemp -d)
"$VENV/bin/schemathesis" run proto/openapi.json --url "http://127.0.0.1:$PORT" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples 800 --seed 20261129 --generation-database none --workers 1 \
  --report har --report-har-path "$REPORT/fuzz.har" \
  --no-color | tee "$REPORT/st.log" | tail -25
GENERATED=$(grep -oE '[0-9]+ generated' "$REPORT/st.log" | tail -1 | cut -d' ' -f1)
if [[ -z $GENERATED || $GENERATED -lt 1000 ]]; then
  echo "fuzz: only ${GENERATED:-0} requests generated (need 1000)"
  exit 1
fi
echo "fuzz: $GENERATED generated requests, all passed"
# The share of generated completions that reached the engine (answered
# 200): proto/openapi.json names the served model. Measured 45% at seed
# 20261129 (465 of 1,022; most of the rest are 400s for out-of-range
# fields); the floor guards against the document drifting back to a
# free-form model name (then nearly all were 404s).
python3 scripts/fuzz_share.py "$REPORT/fuzz.har" --min-share "${FUZZ_MIN_SHARE:-0.3}"

python3 scripts/soak.py "http://127.0.0.1:$PORT" "$PID" --seconds "$SOAK_SECONDS" \
  --warmup "$((SOAK_SECONDS / 5))"
kill -TERM $PID
wait $PID
