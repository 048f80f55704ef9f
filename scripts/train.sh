#!/usr/bin/env bash
# Trains one experiment on chosen GPUs of this machine, logging to logs/.
#
# Usage: bash scripts/train.sh EXPERIMENT GPUS [overrides ...]
#   EXPERIMENT  a file of configs/experiment/ without .yaml, e.g. voc_deeplabv2
#   GPUS        comma-separated GPU ids (0 or 0,1,2,3), or "cpu"
#   overrides   any seg-train key=value, e.g. data.root=/data/VOCdevkit/VOC2012
# Set DRY_RUN=1 to print the command after the checks instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "train.sh: $*" >&2; exit 2; }

[ $# -ge 2 ] || die "usage: bash scripts/train.sh EXPERIMENT GPUS [overrides ...]"
experiment="$1"
gpus="$2"
shift 2
[ -f "configs/experiment/${experiment}.yaml" ] \
  || die "no experiment '${experiment}'; choose one of: $(find configs/experiment -name '*.yaml' -exec basename {} .yaml \; | sort | tr '\n' ' ')"
[ -x .venv/bin/seg-train ] || die "seg-train is not installed; run: bash scripts/install.sh"

if [ "$gpus" = "cpu" ]; then
  hardware=(hardware=cpu)
else
  [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPUS must look like 0 or 0,1,2,3 (or cpu), got '${gpus}'"
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no GPU driver on this machine (use GPUS=cpu)"
  visible=$(nvidia-smi --list-gpus | wc -l)
  IFS=',' read -r -a ids <<< "$gpus"
  for id in "${ids[@]}"; do
    [ "$id" -lt "$visible" ] || die "GPU ${id} is not visible (this machine has ${visible})"
  done
  if [ "${#ids[@]}" -gt 1 ]; then
    hardware=(hardware=multi_gpu "hardware.devices=[${gpus}]")
  else
    hardware=(hardware=gpu "hardware.devices=[${gpus}]")
  fi
fi

command=(.venv/bin/seg-train "experiment=${experiment}" "${hardware[@]}" "$@")
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "${command[*]}"
  exit 0
fi
mkdir -p logs
log="logs/${experiment}_$(date +%Y-%m-%d_%H-%M-%S).log"
echo "Logging to ${log}"
"${command[@]}" 2>&1 | tee "$log"
