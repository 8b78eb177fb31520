# Helpers shared by the benchmark scripts; they source it from the repository root.

# Fetches the model and the mail, and builds the server and the load generator in release mode.
prepare() {
  models/fetch.sh >/dev/null
  datasets/fetch-spamassassin.sh >/dev/null
  cargo build --release --quiet --bins -p flywheel -p flywheel-loadtest
}

# wait_for_url LOG: waits until the server writing LOG has logged its address and answers /ready, and sets
# $url to that address; fails after a minute.
wait_for_url() {
  url=""
  for _ in $(seq 1 600); do
    url=$(grep -o 'listening on http://[0-9.:]*' "$1" | head -n 1 | sed 's/listening on //') || true
    [ -n "$url" ] && curl -sf "$url/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the server did not start; see $1" >&2
  return 1
}

# start_server LOG [serve flags...]: starts the release server ($FLYWHEEL_BIN, to compare another build) on a
# free port with a fresh data directory, killed and removed when the script exits, and waits for it; sets
# $url and $server.
start_server() {
  local log="$1"
  shift
  data=$(mktemp -d)
  "${FLYWHEEL_BIN:-target/release/flywheel}" serve --port 0 --data-dir "$data" "$@" >"$log" 2>&1 &
  server=$!
  # SIGTERM, then wait: the graceful shutdown still writes to the data directory.
  trap 'kill $server 2>/dev/null && wait $server; rm -rf "$data"' EXIT
  wait_for_url "$log"
}

# sentences FILE: writes the first 12 words of the first 500 easy-ham-1 mails (those with 12 or more) as
# JSONL texts, the short sentences the admission and slow-write benchmarks send.
sentences() {
  python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("datasets/spamassassin/easy-ham-1.jsonl")][:500]
with open(sys.argv[1], "w") as f:
    for r in rows:
        words = r["text"].split()
        if len(words) >= 12:
            f.write(json.dumps({"text": " ".join(words[:12])}) + "\n")
PY
}
