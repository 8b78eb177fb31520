#!/usr/bin/env bash
# Installs the client libraries tests/compat_http.rs drives against the server (the OpenAI Python SDK and
# LangChain's OpenAI integration, from PyPI) into the git-ignored .venv. scripts/test.sh runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
openai="3.63.0"
langchain_openai="1.8.1"
[ -x .venv/bin/pip ] || python3 -m venv .venv
if ! .venv/bin/python - "$openai" "$langchain_openai" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
assert version("openai") == sys.argv[1] and version("langchain-openai") == sys.argv[2]
PY
then
  .venv/bin/pip install --quiet "openai==$openai" "langchain-openai==$langchain_openai"
fi
