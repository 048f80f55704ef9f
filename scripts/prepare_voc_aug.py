#!/usr/bin/env python
"""Builds PASCAL VOC 2012's SBD-augmented training set ("aug") for `data=voc_aug`.

Reads the SBD release (Hariharan et al. 2011, benchmark.tgz from
http://home.bharathh.info/pubs/codes/SBD/download.html), whose `dataset/` folder holds
`cls/<id>.mat` (a MATLAB struct `GTcls` with the class-id map in `GTcls.Segmentation`),
`train.txt` and `val.txt`, and writes into the VOC2012 folder:

    SegmentationClassAug/<id>.png          class-id palette PNGs (VOC colours)
    ImageSets/Segmentation/train_aug.txt   (VOC train + SBD train + SBD val) - VOC val
    ImageSets/Segmentation/train_sbd.txt   SBD train as released (8,498 ids): the FCN
                                           reference's training set (data.train_list=train_sbd)

Where VOC has its own mask (SegmentationClass, the official label with 255 on object borders)
that mask is copied; SBD's mask is used for the rest. VOC val is removed from the training list
so that validation stays clean; on the real data this leaves the well-known 10,582 images
(a different count is reported as a warning, so partial copies and test fixtures still work).
`train_aug.txt` is written last: an interrupted run never looks finished.

Usage:
    python scripts/prepare_voc_aug.py --voc-root VOCdevkit/VOC2012 \
        --sbd-root benchmark_RELEASE/dataset [--workers 8] [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from seg_train.viz import voc_palette

EXPECTED_TRAIN_AUG = 10_582
EXPECTED_TRAIN_SBD = 8_498
AUG_MASKS = "SegmentationClassAug"
SPLITS = Path("ImageSets") / "Segmentation"


def read_ids(path: Path) -> list[str]:
    """One id per line (blank lines ignored)."""
    if not path.is_file():
        sys.exit(f"prepare_voc_aug: error: {path} is missing; check --voc-root / --sbd-root")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def load_sbd_mask(path: Path) -> np.ndarray:
    """Reads `GTcls.Segmentation` from an SBD `cls/<id>.mat` as uint8 class ids."""
    import scipy.io  # the only user of SciPy here; imported late so --help works without it

    mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    return np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8)


def save_ids(path: Path, ids: np.ndarray, palette: bytes) -> None:
    """Writes a palette PNG whose pixel values are the class ids."""
    image = Image.fromarray(ids)
    image.putpalette(palette)  # mode L -> P with the same values
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_list(path: Path, ids: list[str]) -> None:
    """Writes one id per line, atomically (an interrupted run leaves no partial list)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(ids) + "\n")
    os.replace(tmp, path)


def convert_one(job: tuple[str, str, str, bytes]) -> str:
    """Writes one SegmentationClassAug PNG from a VOC PNG or an SBD .mat; returns its origin."""
    image_id, source, target, palette = job
    if source.endswith(".png"):
        with Image.open(source) as png:
            ids = np.asarray(png)  # palette indices = class ids
        origin = "voc"
    else:
        ids = load_sbd_mask(Path(source))
        origin = "sbd"
    save_ids(Path(target), ids, palette)
    return origin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--voc-root",
        "--voc",
        type=Path,
        required=True,
        help="the VOC2012 folder (holding JPEGImages/ and SegmentationClass/)",
    )
    parser.add_argument(
        "--sbd-root",
        "--sbd",
        type=Path,
        required=True,
        help="SBD's benchmark_RELEASE/dataset folder (holding cls/, train.txt)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite masks that already exist in SegmentationClassAug/",
    )
    args = parser.parse_args(argv)
    voc_root, sbd_root = args.voc_root.expanduser(), args.sbd_root.expanduser()
    if not (voc_root / "JPEGImages").is_dir():
        sys.exit(
            f"prepare_voc_aug: error: {voc_root} has no JPEGImages/; pass the VOC2012 "
            "folder as --voc-root"
        )
    if not (sbd_root / "cls").is_dir():
        sys.exit(
            f"prepare_voc_aug: error: {sbd_root} has no cls/; pass SBD's "
            "benchmark_RELEASE/dataset folder as --sbd-root"
        )

    voc_train = read_ids(voc_root / SPLITS / "train.txt")
    voc_val = read_ids(voc_root / SPLITS / "val.txt")
    sbd_train, sbd_val = read_ids(sbd_root / "train.txt"), read_ids(sbd_root / "val.txt")
    excluded = set(voc_val)
    train_aug = sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - excluded)
    no_image = [i for i in train_aug if not (voc_root / "JPEGImages" / f"{i}.jpg").is_file()]
    if no_image:
        sys.exit(
            f"prepare_voc_aug: error: {len(no_image)} training ids have no "
            f"{voc_root / 'JPEGImages'}/<id>.jpg (first: {no_image[0]}); is --voc-root the "
            "VOC2012 folder of VOCtrainval_11-May-2012.tar?"
        )

    out_dir = voc_root / AUG_MASKS
    out_dir.mkdir(exist_ok=True)
    palette = voc_palette(256).tobytes()
    jobs, missing = [], []
    # SBD train overlaps VOC val (which is why FCN validates on seg11valid); every id of both
    # lists gets a mask: VOC's own where it has one, SBD's otherwise.
    for image_id in sorted(set(train_aug) | excluded | set(sbd_train)):
        target = out_dir / f"{image_id}.png"
        if target.is_file() and not args.overwrite:
            continue
        voc_mask = voc_root / "SegmentationClass" / f"{image_id}.png"
        sbd_mask = sbd_root / "cls" / f"{image_id}.mat"
        source = voc_mask if voc_mask.is_file() else sbd_mask
        if not source.is_file():
            missing.append(image_id)
            continue
        jobs.append((image_id, str(source), str(target), palette))
    if missing:
        sys.exit(
            f"prepare_voc_aug: error: {len(missing)} ids have neither a VOC "
            f"SegmentationClass PNG nor an SBD cls .mat (first: {missing[0]})"
        )

    print(f"Writing {len(jobs):,} masks into {out_dir} with {args.workers} workers ...", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        origins = list(pool.map(convert_one, jobs, chunksize=64))

    write_list(voc_root / SPLITS / "train_sbd.txt", sorted(set(sbd_train)))
    list_path = voc_root / SPLITS / "train_aug.txt"
    write_list(list_path, train_aug)
    print(
        f"{list_path}: {len(train_aug):,} ids = (VOC train {len(voc_train):,} + SBD train "
        f"{len(sbd_train):,} + SBD val {len(sbd_val):,}) - VOC val {len(voc_val):,}; masks "
        f"written: {origins.count('voc'):,} from VOC, {origins.count('sbd'):,} from SBD"
    )
    if len(train_aug) != EXPECTED_TRAIN_AUG:
        print(
            f"prepare_voc_aug: warning: train_aug has {len(train_aug):,} ids, not the "
            f"{EXPECTED_TRAIN_AUG:,} of the full VOC 2012 + SBD releases; fine for a subset, "
            "otherwise check that both releases are complete",
            file=sys.stderr,
        )
    print(
        f"{voc_root / SPLITS / 'train_sbd.txt'}: {len(set(sbd_train)):,} ids (SBD train, "
        f"expected {EXPECTED_TRAIN_SBD:,} for the full release)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
