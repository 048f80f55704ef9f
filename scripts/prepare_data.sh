#!/usr/bin/env bash
# Downloads (where the source is public) and checks a dataset in the layout seg-train reads.
#
# Usage: bash scripts/prepare_data.sh DATASET DIR
#   voc       DIR/VOCdevkit/VOC2012 from VOCtrainval_11-May-2012.tar (md5 checked)
#   voc_aug   also SBD (benchmark.tgz, md5 checked) -> SegmentationClassAug + train_aug.txt
#   pets      DIR/images + DIR/annotations from the Oxford-IIIT Pet release (md5 checked)
#   cihp      no public direct link: checks DIR/instance-level_human_parsing after you unpack it
#   portrait  no stable public link: checks DIR/training and DIR/testing after you unpack it
# Set DRY_RUN=1 to only print what would be downloaded and checked.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "prepare_data.sh: $*" >&2; exit 2; }
run() { if [ "${DRY_RUN:-0}" = "1" ]; then echo "+ $*"; else "$@"; fi; }

[ $# -eq 2 ] || die "usage: bash scripts/prepare_data.sh voc|voc_aug|pets|cihp|portrait DIR"
dataset="$1"
dir="$2"
mkdir -p "$dir"

fetch() {  # fetch URL MD5: download into DIR (resumable) and verify the checksum
  local url="$1" md5="$2" file
  file="${dir}/$(basename "$url")"
  if [ ! -f "$file" ]; then
    command -v curl >/dev/null 2>&1 || die "curl is needed to download ${url}"
    run curl -fL --retry 3 -C - -o "${file}.part" "$url" \
      || die "download failed: ${url} (no network? download it by hand into ${dir})"
    run mv "${file}.part" "$file"
  fi
  if [ "${DRY_RUN:-0}" != "1" ]; then
    echo "${md5}  ${file}" | md5sum -c --quiet - || die "checksum mismatch for ${file}; delete it and retry"
  fi
}

need_dir() {  # need_dir PATH HINT
  [ -d "$1" ] || die "missing $1 ($2)"
}

case "$dataset" in
  voc|voc_aug)
    fetch http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar \
      6cd6e144f989b92b3379bac3b3de84fd
    run tar -xf "${dir}/VOCtrainval_11-May-2012.tar" -C "$dir"
    if [ "$dataset" = "voc_aug" ]; then
      fetch http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz \
        82b4d87ceb2ed10f6038a1cba92111cb
      run tar -xzf "${dir}/benchmark.tgz" -C "$dir"
      run .venv/bin/python scripts/prepare_voc_aug.py \
        --voc "${dir}/VOCdevkit/VOC2012" --sbd "${dir}/benchmark_RELEASE/dataset"
    fi
    echo "Train with: seg-train data=voc data.root=${dir}/VOCdevkit/VOC2012"
    ;;
  pets)
    fetch https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz 5c4f3ee8e5d25df40f4fd59a7f44e54c
    fetch https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz 95a8c909bbe2e81eed6a22bccdf3f68f
    run tar -xzf "${dir}/images.tar.gz" -C "$dir"
    run tar -xzf "${dir}/annotations.tar.gz" -C "$dir"
    echo "Train with: seg-train data=oxford_pets data.format=raw data.root=${dir}"
    ;;
  cihp)
    root="${dir}/instance-level_human_parsing"
    hint="download CIHP from the LIP / Look-Into-Person site and unpack it into ${dir}"
    if [ "${DRY_RUN:-0}" != "1" ]; then
      for sub in Training/Images Training/Category_ids Validation/Images Validation/Category_ids; do
        need_dir "${root}/${sub}" "$hint"
      done
      [ -f "${root}/Training/train_id.txt" ] || die "missing ${root}/Training/train_id.txt ($hint)"
    fi
    echo "Train with: seg-train data=cihp data.root=${root}"
    ;;
  portrait)
    hint="unpack the portrait matting set (NNNNN.png + NNNNN_matte.png) into ${dir}"
    if [ "${DRY_RUN:-0}" != "1" ]; then
      need_dir "${dir}/training" "$hint"
      need_dir "${dir}/testing" "$hint"
    fi
    echo "Train with: seg-train data=portrait data.root=${dir}"
    ;;
  *)
    die "unknown dataset '${dataset}'; choose voc, voc_aug, pets, cihp or portrait"
    ;;
esac
if [ "${DRY_RUN:-0}" != "1" ] && [ -x .venv/bin/seg-train ]; then
  echo "Check the files with: seg-train mode=check data=... data.root=..."
fi
