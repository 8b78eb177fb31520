#!/usr/bin/env bash
# Installs what checks deploy/ (tests/deploy_manifests.rs runs deploy/check.py): kubernetes-validate from
# PyPI into the git-ignored .venv, and docker-compose (Debian's package, as root) for the compose file.
# scripts/test.sh runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kubernetes_validate="1.37.0"
[ -x .venv/bin/pip ] || python3 -m venv .venv
if ! .venv/bin/python - "$kubernetes_validate" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
assert version("kubernetes-validate") == sys.argv[1]
PY
then
  .venv/bin/pip install --quiet "kubernetes-validate==$kubernetes_validate"
fi
if ! command -v docker-compose >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
  else
    echo "error: docker-compose is needed (Debian's docker-compose package)" >&2
    exit 1
  fi
fi
