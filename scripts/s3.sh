#!/usr/bin/env bash
# A throwaway S3-compatible server for the object-store tests: `scripts/s3.sh start DIR` installs moto's
# server (PyPI, into the git-ignored .venv) when missing, starts it on a free loopback port with its state
# in memory, waits until it answers and prints its URL; `scripts/s3.sh stop DIR` stops it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1 dir=$2
version="5.2.6"

case $action in
  start)
    if ! .venv/bin/python -c "import moto, flask" 2>/dev/null \
        || [ "$(.venv/bin/python -c 'import moto; print(moto.__version__)')" != "$version" ]; then
      [ -x .venv/bin/pip ] || python3 -m venv .venv
      .venv/bin/pip install --quiet "moto[s3,server]==$version" >&2
    fi
    mkdir -p "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    .venv/bin/moto_server -H 127.0.0.1 -p "$port" >"$dir/log" 2>&1 &
    echo $! >"$dir/pid"
    url="http://127.0.0.1:$port"
    for _ in $(seq 100); do
      if python3 -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=1)" "$url" 2>/dev/null; then
        echo "$url"
        exit 0
      fi
      sleep 0.2
    done
    echo "error: the S3 test server did not answer; its log:" >&2
    cat "$dir/log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$dir/pid" ]; then
      kill "$(cat "$dir/pid")" 2>/dev/null || true
      rm -f "$dir/pid"
    fi
    ;;
  *) usage ;;
esac
