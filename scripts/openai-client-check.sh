#!/usr/bin/env bash
# Drives `gpt-serve serve` with the official `openai` Python client:
# completions, streaming, logprobs. Usage: scripts/openai-client-check.sh BIN
set -euo pipefail
BIN=${1:-target/release/gpt-serve}
MODEL=${MODEL:-models/default}
if [[ ! -f $MODEL/config.json ]]; then
  echo "skipping the openai client check: no model at $MODEL"
  exit 0
fi
VENV=${OPENAI_VENV:-$HOME/.cache/gpt-serve-openai-venv}
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "openai>=1.0"
fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" serve --model "$MODEL" --port "$PORT" --model-id default &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 0.1
done
"$VENV/bin/python" scripts/openai_client_check.py "http://127.0.0.1:$PORT/v1"
kill -TERM $PID
wait $PID
