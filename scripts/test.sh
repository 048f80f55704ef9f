#!/usr/bin/env bash
# Installs seg-train with its dev extras into ./.venv and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
exec .venv/bin/python -m pytest "$@"
