#!/usr/bin/env bash
# Lint and type check (a few seconds): ruff's rules and formatting (ruff.toml), then mypy (mypy.ini).
# Run it in an environment that has requirements.txt installed (scripts/test.sh runs it first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
echo "[lint] ruff check"
"$PYTHON" -m ruff check .
echo "[lint] ruff format --check"
"$PYTHON" -m ruff format --check .
echo "[lint] mypy"
"$PYTHON" -m mypy
