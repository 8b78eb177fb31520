#!/usr/bin/env bash
# Runs both cargo-fuzz targets for SECONDS each (default 300), one after the other.
#
#   fuzz/run.sh [SECONDS]
#
# Environment: FUZZ_SANITIZER=address|none (default address; `none` builds faster and runs ~2x more
# executions but only catches panics and aborts, not memory errors in C/unsafe code).
# New corpus entries go to fuzz/corpus/<target>/ (git-ignored); the committed seeds in fuzz/seeds/<target>/
# are read, never written. Crashing inputs land in fuzz/artifacts/<target>/. Exits non-zero if any target
# found a crash.
set -euo pipefail

seconds="${1:-300}"
sanitizer="${FUZZ_SANITIZER:-address}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "cargo fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz build -s "$sanitizer"

status=0
for target in adapter_loader json_requests; do
    mkdir -p "fuzz/corpus/$target"
    extra=()
    if [ "$target" = adapter_loader ]; then
        extra+=(-max_len=16384) # the seeds are up to 6 KB of safetensors
    fi
    echo "== $target: ${seconds}s" >&2
    cargo +nightly fuzz run -s "$sanitizer" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -dict="$root/fuzz/dicts/$target.dict" \
        -print_final_stats=1 "${extra[@]}" || status=1
done
if [ "$status" -ne 0 ]; then
    echo "a target failed; crashing inputs are under fuzz/artifacts/" >&2
fi
exit "$status"
