#!/usr/bin/env bash
# Property-based API tests: starts the server on the default model with a fresh data directory and a task
# `spam`, then runs Schemathesis (PyPI, installed into the git-ignored .venv) against /openapi.json with
# every check. Fails on any 5xx, any answer the document does not describe, a panic in the server log, or
# fewer than 1,000 generated cases.
# Usage: scripts/schemathesis.sh [examples per operation, default 80]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
examples="${1:-80}"
version="4.32.5"

models/fetch.sh >/dev/null
if ! .venv/bin/schemathesis --version 2>/dev/null | grep -q "$version"; then
  [ -x .venv/bin/pip ] || python3 -m venv .venv
  .venv/bin/pip install --quiet "schemathesis==$version"
fi
# The test profile, as `cargo test` builds it: after the suite nothing is rebuilt (the dev profile would
# rebuild the dependencies for three minutes).
cargo build --profile test --locked --quiet --bin flywheel

log=$(mktemp)
out=$(mktemp)
data=$(mktemp -d)
target/debug/flywheel serve --port 0 --data-dir "$data" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null && wait $server; rm -rf "$data" "$log" "$out"' EXIT
# The bound address from the log, then /ready, then the task (Python, so the script needs no curl).
url=$(python3 - "$log" <<'PY'
import json, re, sys, time, urllib.request
log, deadline, url = sys.argv[1], time.time() + 120, None
while time.time() < deadline:
    if url is None:
        m = re.search(r"listening on (http://[0-9.:]+)", open(log).read())
        url = m and m.group(1)
    if url:
        try:
            urllib.request.urlopen(url + "/ready", timeout=5)
            break
        except Exception:
            pass
    time.sleep(0.2)
else:
    sys.exit("the server did not become ready; its log ends:\n" + open(log).read()[-3000:])
body = json.dumps({"name": "spam", "labels": ["ham", "spam"]}).encode()
request = urllib.request.Request(url + "/v1/tasks", body, {"content-type": "application/json"})
urllib.request.urlopen(request, timeout=10)
print(url)
PY
)

status=0
.venv/bin/schemathesis --config-file scripts/schemathesis.toml run "$url/openapi.json" \
  --max-examples "$examples" --seed 42 --workers 2 --no-color \
  --generation-database none | tee "$out" || status=$?

cases=$(grep -o '[0-9]* generated' "$out" | grep -o '[0-9]*' | tail -n 1)
echo "schemathesis: ${cases:-0} cases, exit status $status"
if ! kill -0 "$server" 2>/dev/null; then
  echo "error: the server died; see its log:" >&2
  tail -n 50 "$log" >&2
  exit 1
fi
if grep -q "panicked" "$log"; then
  echo "error: the server panicked:" >&2
  grep -A5 "panicked" "$log" >&2
  exit 1
fi
if [ "${cases:-0}" -lt 1000 ]; then
  echo "error: only ${cases:-0} cases were generated; at least 1000 are wanted" >&2
  exit 1
fi
exit "$status"
