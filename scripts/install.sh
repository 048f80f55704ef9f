#!/usr/bin/env bash
# Creates ./.venv (once) and installs seg-train into it, editable, with the given extras.
# Usage: bash scripts/install.sh [extras]      (default extras: dev)
# PYTHON=python3.11 picks the interpreter used to create the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
