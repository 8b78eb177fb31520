#!/usr/bin/env bash
# Runs the whole test suite: fetches the real model if missing, then unit and integration tests
# (the integration suites start the real server on port 0 with all-MiniLM-L6-v2 and talk HTTP).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

models/fetch.sh
cargo test --workspace --locked
