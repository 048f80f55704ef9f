"""The dataset doctor (`seg-train mode=check`) finds each planted defect and counts labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from seg_train.data.stats import median_frequency_weights
from seg_train.tasks.check import check_dataset
from tests.fixture_writers import (
    H,
    W,
    pet_names,
    save_palette_png,
    write_pets_raw,
    write_portrait,
    write_voc,
)
from tests.helpers import compose_config, error_lines, run_cli

TRAIN = ["2007_000032", "2007_000039", "2007_000063", "2007_000068", "2007_000121"]
VAL = ["2007_000033", "2007_000042", "2007_000061", "2007_000123", "2007_000129"]


def doctor(overrides: list[str]) -> dict:
    cfg = compose_config(["mode=check", *overrides])
    splits = list(cfg.check.splits) if cfg.check.splits else None
    return check_dataset(instantiate(cfg.data.source), cfg.data, splits)


def plant_voc_defects(root, masks) -> dict[str, str]:
    """Breaks the VOC fixture in seven ways; returns {culprit file: expected problem words}."""
    jpeg, seg = root / "JPEGImages", root / "SegmentationClass"
    (jpeg / f"{TRAIN[0]}.jpg").unlink()  # id listed without its image
    (seg / f"{TRAIN[1]}.png").unlink()  # id listed without its mask
    truncated = (jpeg / f"{TRAIN[2]}.jpg").read_bytes()[:300]
    (jpeg / f"{TRAIN[2]}.jpg").write_bytes(truncated)  # corrupt JPEG
    (seg / f"{VAL[0]}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt PNG
    save_palette_png(seg / f"{VAL[1]}.png", masks[VAL[1]][:, :-3])  # size mismatch
    colour = np.stack([masks[VAL[2]]] * 3, -1)
    Image.fromarray(colour).save(seg / f"{VAL[2]}.png")  # an RGB colour mask
    out_of_range = masks[VAL[3]].copy()
    out_of_range[:3, :3] = 37
    save_palette_png(seg / f"{VAL[3]}.png", out_of_range)  # label 37 in a 21-class set
    return {
        str(jpeg / f"{TRAIN[0]}.jpg"): "missing",
        str(seg / f"{TRAIN[1]}.png"): "missing",
        str(jpeg / f"{TRAIN[2]}.jpg"): "cannot read image",
        str(seg / f"{VAL[0]}.png"): "cannot read mask",
        str(seg / f"{VAL[1]}.png"): f"mask is {W - 3}x{H} but its image",
        str(seg / f"{VAL[2]}.png"): "RGB colour image",
        str(seg / f"{VAL[3]}.png"): "label(s) 37 outside 0..20",
    }


def test_doctor_finds_every_planted_voc_defect(tmp_path):
    root = tmp_path / "VOC2012"
    masks = write_voc(root, TRAIN, VAL)
    planted = plant_voc_defects(root, masks)
    report = doctor(["data=voc", f"data.root={root}"])
    found = {e["file"]: e["problem"] for e in report["errors"]}
    assert set(found) == set(planted)
    for file, words in planted.items():
        assert words in found[file], (file, found[file])
    # Pairs with both files are read (8); the unreadable ones add no labels.
    assert report["num_pairs"] == 8 and report["num_errors"] == 7
    assert report["splits"]["train"]["num_errors"] == 3
    histogram = {int(k): v for k, v in report["label_histogram"].items()}
    assert histogram[37] == 9 and 255 in histogram
    counted = [VAL[1], VAL[3], VAL[4], TRAIN[3], TRAIN[4]]  # the decodable masks
    assert sum(histogram.values()) == sum(masks[i].size for i in counted) - 3 * H


def test_clean_dataset_histogram_and_median_frequency_weights(tmp_path):
    root = tmp_path / "VOC2012"
    masks = write_voc(root, TRAIN, VAL)
    report = doctor(["data=voc", f"data.root={root}"])
    assert report["errors"] == [] and report["num_pairs"] == 10
    expected = np.bincount(np.concatenate([m.ravel() for m in masks.values()]), minlength=256)
    assert report["label_histogram"] == {str(v): int(n) for v, n in enumerate(expected) if n}
    class_pixels = expected[:21]
    image_pixels = np.zeros(21)
    for mask in masks.values():
        counts = np.bincount(mask.ravel(), minlength=256)[:21]
        image_pixels[counts > 0] += counts.sum()
    weights = median_frequency_weights(class_pixels, image_pixels)
    assert list(report["class_weights"].values()) == pytest.approx(weights, abs=1e-6)
    assert report["class_weights"]["bicycle"] == 0.0  # absent class


def test_histogram_is_after_the_label_mapping_and_bad_trimaps_are_named(tmp_path):
    root = tmp_path / "pets"
    names = pet_names(4)
    trimaps = write_pets_raw(root, names[:3], names[3:])
    broken = trimaps[names[0]].copy()
    broken[0, :5] = 0
    Image.fromarray(broken, mode="L").save(root / "annotations" / "trimaps" / f"{names[0]}.png")
    report = doctor(["data=oxford_pets", "data.format=raw", f"data.root={root}"])
    # val is test by default: the doctor checks it once and says so.
    assert list(report["splits"]) == ["train", "val"] and any(
        "same data" in n for n in report["notes"]
    )
    assert [e["file"] for e in report["errors"]] == [
        str(root / "annotations" / "trimaps" / f"{names[0]}.png")
    ]
    good = np.concatenate([trimaps[n].ravel() for n in names[1:]])
    expected = np.bincount(good - 1, minlength=3)  # trimap 1/2/3 -> classes 0/1/2
    assert report["label_histogram"] == {str(v): int(n) for v, n in enumerate(expected) if n}


def test_binary_0_255_masks_and_unpaired_mattes(tmp_path):
    folder = tmp_path / "folder"
    for sub in ("images", "masks", "splits"):
        (folder / sub).mkdir(parents=True)
    mask = np.zeros((H, W), np.uint8)
    mask[5:20, 5:20] = 255  # foreground saved as 255 instead of 1
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "images" / "a.png")
    Image.fromarray(mask).save(folder / "masks" / "a.png")
    for split in ("train", "val"):
        (folder / "splits" / f"{split}.txt").write_text("a\n")
    report = doctor(
        [
            "data=folder",
            f"data.root={folder}",
            "data.num_classes=2",
            "data.class_names=[bg,fg]",
            "check.splits=[train]",
        ]
    )
    (error,) = report["errors"]
    assert error["file"] == str(folder / "masks" / "a.png")
    assert "0/255 binary mask" in error["problem"]

    portrait = tmp_path / "portrait"
    write_portrait(portrait, 2, 1)
    (portrait / "training" / "00001.png").unlink()
    report = doctor(["data=portrait", f"data.root={portrait}"])
    (error,) = report["errors"]
    assert error["file"] == str(portrait / "training" / "00001_matte.png")
    assert "matte without an image" in error["problem"]


@pytest.mark.slow
def test_check_mode_through_the_cli(tmp_path, cache_dir):
    root = tmp_path / "VOC2012"
    masks = write_voc(root, TRAIN, VAL)
    clean = run_cli(
        ["mode=check", "data=voc", f"data.root={root}", f"hydra.run.dir={tmp_path / 'clean'}"],
        cache_dir,
        cwd=tmp_path,
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "median-frequency" in clean.stdout and "aeroplane" in clean.stdout
    assert json.loads((tmp_path / "clean" / "check.json").read_text())["errors"] == []

    plant_voc_defects(root, masks)
    run_dir = tmp_path / "broken"
    result = run_cli(
        ["mode=check", "data=voc", f"data.root={root}", f"hydra.run.dir={run_dir}"],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert line.startswith("seg-train: check: 7 problems in data=voc") and "check.json" in line
    assert "RGB colour image" in result.stdout  # the printed report names the problems
    report = json.loads((run_dir / "check.json").read_text())
    assert report["num_pairs"] == 8 and len(report["errors"]) == 7
    assert {"file", "problem"} <= set(report["errors"][0]) and "37" in report["label_histogram"]
