#!/usr/bin/env bash
# Checks that TensorFlow sees the GPU and runs seg-train's GPU path end to end in a few
# minutes: training steps of each model family in float32 / mixed_float16 / XLA (img/s, peak
# GPU memory, ratios), MirroredStrategy over all visible GPUs, eval with TTA, export parity.
# Writes benchmarks/gpu_results/gpu_check.{json,md}. Exits 2 with one line where no GPU is seen.
#
# Usage: bash scripts/gpu_check.sh [--quick] [--out DIR]
#   Install first with: bash scripts/install.sh gpu
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "gpu_check.sh: seg-train is not installed; run: bash scripts/install.sh gpu" >&2; exit 2; }
exec .venv/bin/python benchmarks/gpu_check.py "$@"
