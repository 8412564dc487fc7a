#!/usr/bin/env bash
# Drives `gpt-serve serve` with the official `openai` Python client:
# completions, streaming, logprobs. Usage: scripts/openai-client-check.sh BIN
set -euo pipefail
BIN=${1:-target/release/gpt-serve}
MODEL=${MODEL:-models/default}
if [[ ! -f $MODEL/config.json ]]; then
  # The shipped model is part of the repository: its absence is a broken
  # checkout, not a reason to pass.
  echo "the openai client check: no model at $MODEL (config.json missing)" >&2
  exit 1
fi
VENV=${OPENAI_VENV:-$HOME/.cache/gpt-serve-openai-venv}
source "$(dirname "$0")/local-server.sh"
venv_with "$VENV" "openai>=1.0" 'bin/python -c "import openai"'
start_server "$BIN" "$MODEL"
"$VENV/bin/python" scripts/openai_client_check.py "http://127.0.0.1:$PORT/v1"
kill -TERM $PID
wait $PID
