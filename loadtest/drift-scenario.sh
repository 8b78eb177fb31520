#!/usr/bin/env bash
# The drift-recovery scenario, one command: starts Flywheel on the default model with
# loadtest/scenario.toml and a fresh data directory, bootstraps a spam task from the older SpamAssassin
# corpus, streams the later one with delayed feedback, and lets the server detect the drift, train, canary
# and promote on its own. Writes target/scenario/{timeline.csv,timeline.png,summary.json,server.log}.
#
#   loadtest/drift-scenario.sh [flywheel-scenario options, e.g. --rate 6 --feedback 0.5]
#
# Needs python3, npm (for the mail) and the model (models/fetch.sh, which this runs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

prepare
out=target/scenario
mkdir -p "$out"
start_server "$out/server.log" --config loadtest/scenario.toml
target/release/flywheel-scenario --url "$url" --out "$out" "$@"
