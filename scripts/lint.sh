#!/usr/bin/env bash
# Installs seg-train with its dev extras into ./.venv and runs the linters that CI enforces:
# ruff (lint), ruff format (check only) and shellcheck on scripts/ and .ci/.
# `bash scripts/lint.sh --fix` applies ruff's fixes and formatting instead of only checking.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff check --fix .
  .venv/bin/ruff format .
else
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
fi
.venv/bin/shellcheck scripts/*.sh .ci/run
