#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this). Run as root on Debian 12.
# Lint, format and type checks first, then every test; firewall tests make
# their own network namespaces and delete them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

echo "== ruff check"; .venv/bin/ruff check .
echo "== ruff format --check"; .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "$@"
