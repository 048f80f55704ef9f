#!/usr/bin/env bash
# Installs seg-train into ./.venv and runs it: with no arguments, the default training
# (U-Net on the embedded synthetic dataset). Extra arguments go to seg-train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
exec .venv/bin/seg-train "$@"
