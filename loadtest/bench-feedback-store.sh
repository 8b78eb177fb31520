#!/usr/bin/env bash
# What an acknowledged feedback row costs on each store: closed-loop clients post distinct rows to
# /v1/feedback (each 202 sent only after the commit is durable) against the release server on the embedded
# SQLite store and on a local PostgreSQL (a throwaway cluster from scripts/postgres.sh, fsync on), side by side
# in one run, fresh server and database for each row of the table.
#
#   loadtest/bench-feedback-store.sh [seconds]      (default 10)
#
# Results in target/bench/feedback-store.jsonl and a table on stdout. The clients, the server and PostgreSQL
# share this machine's cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-10}"
prepare
out=target/bench
mkdir -p "$out"
results="$out/feedback-store.jsonl"
rm -f "$results"

pg=$(mktemp -d)
chmod 755 "$pg"
pg_url=$(scripts/postgres.sh start "$pg/cluster")
stop_all() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" || true
  scripts/postgres.sh stop "$pg/cluster"
  rm -rf "$pg" "${data:-}"
}
trap stop_all EXIT

database=0
for backend in sqlite postgres; do
  for shape in "1 1" "8 1" "8 20"; do
    read -r clients batch <<<"$shape"
    if [ "$backend" = postgres ]; then
      database=$((database + 1))
      psql -q "$pg_url" -c "CREATE DATABASE bench_$database"
      export FLYWHEEL_STORE__BACKEND=postgres FLYWHEEL_STORE__URL="${pg_url%/*}/bench_$database"
    fi
    start_server "$out/server-feedback-$backend.log"
    trap stop_all EXIT
    unset FLYWHEEL_STORE__BACKEND FLYWHEEL_STORE__URL
    curl -sf -X POST "$url/v1/tasks" -H 'content-type: application/json' \
      -d '{"name": "bench", "labels": ["ham", "spam"]}' >/dev/null
    target/release/flywheel-feedback --url "$url" --clients "$clients" --batch "$batch" \
      --seconds "$seconds" --label "$backend" | tee -a "$results"
    kill "$server" && wait "$server" || true
    server=""
    rm -rf "$data"
  done
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| store | clients | rows per post | posts/s | rows/s | p50 ms | p99 ms | failed |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    print(f"| {r['label']} | {r['clients']} | {r['batch']} | {r['posts_per_second']:,.0f} | "
          f"{r['rows_per_second']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['failed']} |")
PY
