# Sourced by the scripts that drive a running server (openai-client-check.sh,
# fuzz-and-soak.sh): start_server BIN MODEL [serve flags...] starts
# `gpt-serve serve` on a free loopback port, sets PORT and PID, stops the
# server on exit, and returns once /health answers 200.
start_server() {
  local bin=$1 model=$2
  shift 2
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$bin" serve --model "$model" --host 127.0.0.1 --port "$PORT" --model-id default "$@" &
  PID=$!
  trap 'kill $PID 2>/dev/null || true' EXIT
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
    sleep 0.1
  done
  echo "gpt-serve did not become healthy on port $PORT" >&2
  return 1
}

# venv_with DIR PACKAGE COMMAND: a virtual environment at DIR in which
# COMMAND succeeds, installing PACKAGE (a pip requirement) when it does not.
venv_with() {
  local dir=$1 package=$2 check=$3
  if [[ ! -x $dir/bin/python ]] || ! (cd "$dir" && eval "$check") >/dev/null 2>&1; then
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q "$package"
  fi
}
