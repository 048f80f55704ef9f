#!/usr/bin/env bash
# Runs a Hydra sweep with jobs in parallel on this machine, each job on its own GPUs.
#
# Usage: bash scripts/sweep.sh PARALLEL_JOBS GPUS_PER_JOB [seg-train sweep arguments ...]
#   e.g. bash scripts/sweep.sh 4 1 experiment=pets_unet_mobilenetv2 optimizer.learning_rate=1e-3,3e-4
#   GPUS_PER_JOB 0 runs the jobs on the CPU.
# The leaderboard is written to the sweep dir as sweep_summary.md / .csv.
# Set DRY_RUN=1 to print the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "sweep.sh: $*" >&2; exit 2; }

[ $# -ge 3 ] || die "usage: bash scripts/sweep.sh PARALLEL_JOBS GPUS_PER_JOB key=a,b [...]"
parallel="$1"
per_job="$2"
shift 2
[[ "$parallel" =~ ^[1-9][0-9]*$ ]] || die "PARALLEL_JOBS must be a positive integer, got '${parallel}'"
[[ "$per_job" =~ ^[0-9]+$ ]] || die "GPUS_PER_JOB must be a non-negative integer, got '${per_job}'"
[ -x .venv/bin/seg-train ] || die "seg-train is not installed; run: bash scripts/install.sh"

if [ "$per_job" -eq 0 ]; then
  hardware=(hardware=cpu)
else
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no GPU driver (use GPUS_PER_JOB=0)"
  visible=$(nvidia-smi --list-gpus | wc -l)
  [ $((parallel * per_job)) -le "$visible" ] \
    || die "${parallel} jobs x ${per_job} GPUs need $((parallel * per_job)) GPUs; ${visible} visible"
  hardware=(hardware=gpu "hardware.gpus_per_job=${per_job}")
fi

command=(.venv/bin/seg-train -m hydra/launcher=joblib "hydra.launcher.n_jobs=${parallel}"
         "${hardware[@]}" "$@")
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "${command[*]}"
  exit 0
fi
"${command[@]}"
