#!/usr/bin/env bash
# make demo: start a local cluster (coordinator + 2 workers) with `qaq up`,
# stream one generation through it with `qaq generate`, then stop the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release
MODEL=${QAQ_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
ADDR=${QAQ_DEMO_ADDR:-127.0.0.1:50051}
PROMPT=${QAQ_DEMO_PROMPT:-"Write a short paragraph about why the sky is blue."}
LOG=$(mktemp)

"$BIN/qaq" up --workers 2 --model "$MODEL" --listen "$ADDR" >"$LOG" 2>&1 &
UP_PID=$!
cleanup() {
  if kill -0 "$UP_PID" 2>/dev/null; then
    kill -INT "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
  fi
  rm -f "$LOG"
}
trap cleanup EXIT

# Wait for the cluster's ready line (the CLI prints it once every worker is up).
for _ in $(seq 1 600); do
  if grep -q "qaq cluster ready" "$LOG"; then break; fi
  if ! kill -0 "$UP_PID" 2>/dev/null; then
    echo "demo: qaq up exited early:" >&2; cat "$LOG" >&2; exit 1
  fi
  sleep 0.1
done
grep -q "qaq cluster ready" "$LOG" || { echo "demo: cluster not ready after 60 s:" >&2; cat "$LOG" >&2; exit 1; }
grep "qaq cluster ready" "$LOG"

echo
echo "\$ qaq generate --chat --max-new-tokens 96 \"$PROMPT\""
"$BIN/qaq" generate --addr "$ADDR" --chat --max-new-tokens 96 "$PROMPT"
echo
"$BIN/qaq" status --addr "$ADDR"
