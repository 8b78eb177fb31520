#!/usr/bin/env bash
# Fetches the default model if missing and starts the server (extra arguments go to `flywheel serve`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

models/fetch.sh
exec cargo run --release --locked --bin flywheel -- serve "$@"
