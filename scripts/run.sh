#!/usr/bin/env bash
# `make run`: start `cortex serve` on its embedded defaults, wait until it is ready, deploy the
# example API, and keep the server in the foreground (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export CORTEX_URL="${CORTEX_URL:-http://127.0.0.1:8888}"

healthy() {
  "$BIN/python" -c "import httpx,sys; httpx.get('$CORTEX_URL/healthz').raise_for_status()" \
    2>/dev/null
}

# Another server on the port would answer the checks below and get the example deployed.
if healthy; then
  echo "a server already answers at $CORTEX_URL: stop it, or set CORTEX_PORT and CORTEX_URL" >&2
  exit 1
fi

"$BIN/cortex" serve &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' INT TERM EXIT

for _ in $(seq 1 150); do
  if healthy; then
    break
  fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "cortex serve exited; see the messages above" >&2
    exit 1
  fi
  sleep 0.2
done

"$BIN/cortex" deploy examples/digits/cortex.yaml
cat <<MSG

The digits example is deployed at $CORTEX_URL/digits. In another terminal:

  .venv/bin/cortex submit digits examples/digits/submission.json   # submit a job
  .venv/bin/cortex get digits --watch                              # watch it finish

or watch it in the dashboard: $CORTEX_URL/ui
Predictions land in /tmp/cortex-examples/digits/<job id>/results.json. Ctrl-C stops the server.
MSG
wait "$server"
