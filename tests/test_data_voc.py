"""PASCAL VOC 2012 (+ SBD aug) in the release layout: ids decoded exactly, bad input named."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seg_train.data import decode, pipeline
from seg_train.data.readers import DataError
from seg_train.data.voc import CLASS_NAMES, PALETTE, VOCSource
from seg_train.errors import UserError
from seg_train.tasks.sources import pipeline_options
from tests.fixture_writers import H, W, save_palette_png, write_sbd, write_voc
from tests.helpers import REPO, TINY_DATASET_RUN, compose_config, error_lines, run_cli

TRAIN = ["2007_000032", "2007_000039", "2007_000063", "2007_000068"]
VAL = ["2007_000033", "2007_000042"]


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    return root, write_voc(root, TRAIN, VAL)


def test_palette_masks_decode_to_the_ids_written(voc_root):
    root, masks = voc_root
    source = VOCSource(str(root), num_classes=21)
    assert source.num_examples("train") == 4 and source.num_examples("val") == 2
    decoded = list(pipeline.decoded_dataset(source, "val").as_numpy_iterator())
    for image_id, (image, mask) in zip(VAL, decoded):
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(mask, masks[image_id])  # ids and 255 borders, exactly
    assert len(source.examples("trainval")) == 6


def test_config_matches_the_module():
    cfg = compose_config(["data=voc", "data.root=/x"])
    assert list(cfg.data.class_names) == list(CLASS_NAMES)
    assert [list(c) for c in cfg.data.palette] == PALETTE
    assert cfg.data.num_classes == 21 and list(cfg.data.flip_pairs) == []


def test_augmented_labels_stay_in_the_mask(voc_root):
    root, masks = voc_root
    source = VOCSource(str(root))
    cfg = compose_config(
        [
            "data=voc",
            f"data.root={root}",
            "data.crop_size=[48,48]",
            "data.batch_size=2",
            "data.scale_range=[0.5,2.0]",
        ]
    )
    written = set().union(*(set(np.unique(m).tolist()) for m in masks.values()))
    seen = set()
    for _, labels in pipeline.train_dataset(source, pipeline_options(cfg), seed=3).repeat(3):
        seen |= set(np.unique(labels.numpy()).tolist())
    assert seen <= written and 255 in seen


def test_any_split_list_can_be_evaluated_and_voc_aug_is_voc_with_aug(voc_root):
    root, masks = voc_root
    # FCN's protocol evaluates on seg11valid, a list users put beside the official ones.
    (root / "ImageSets" / "Segmentation" / "seg11valid.txt").write_text(f"{VAL[1]}\n")
    source = VOCSource(str(root))
    ((_, mask),) = list(pipeline.decoded_dataset(source, "seg11valid").as_numpy_iterator())
    np.testing.assert_array_equal(mask, masks[VAL[1]])
    assert source.splits == ("train", "val")  # what the doctor scans by default
    aug = compose_config(["data=voc_aug", f"data.root={root}"])
    plain = compose_config(["data=voc", f"data.root={root}", "data.aug=true"])
    assert aug.data.source.aug is True
    # Everything but the name and the missing-root hint (which names the aug download) is equal.
    differ = ("name", "root_hint")
    assert {k: v for k, v in aug.data.items() if k not in differ} == {
        k: v for k, v in plain.data.items() if k not in differ
    }
    assert "SegmentationClassAug" in aug.data.root_hint


def test_missing_root_shows_the_expected_tree(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass").mkdir()
    with pytest.raises(UserError) as info:
        VOCSource(str(tmp_path))
    message = str(info.value)
    assert "JPEGImages/<id>.jpg" in message and "ImageSets/Segmentation" in message
    assert f"did you mean data.root={tmp_path / 'VOCdevkit' / 'VOC2012'}" in message
    assert "\n" not in message


def test_contradicting_num_classes_and_unknown_split(voc_root):
    root, _ = voc_root
    with pytest.raises(UserError, match="data.num_classes=5 contradicts data=voc"):
        VOCSource(str(root), num_classes=5)
    with pytest.raises(UserError, match="no split 'test'"):
        VOCSource(str(root)).records("test")


def test_listed_id_without_files_names_the_file(voc_root):
    root, _ = voc_root
    (root / "JPEGImages" / f"{VAL[1]}.jpg").unlink()
    with pytest.raises(UserError) as info:
        pipeline.decoded_dataset(VOCSource(str(root)), "val")
    assert f"{VAL[1]}.jpg: missing" in str(info.value) and "data.on_error=skip" in str(info.value)
    skipping = VOCSource(str(root), on_error="skip")
    assert len(list(pipeline.decoded_dataset(skipping, "val"))) == 1


def test_rgb_mask_is_refused(voc_root):
    root, masks = voc_root
    path = root / "SegmentationClass" / f"{VAL[0]}.png"
    Image.fromarray(np.stack([masks[VAL[0]]] * 3, -1)).save(path)
    with pytest.raises(DataError, match="RGB colour image, not class ids"):
        VOCSource(str(root)).load(VAL[0], str(root / "JPEGImages" / f"{VAL[0]}.jpg"), str(path))


def test_broken_file_raises_one_line_or_is_skipped_and_counted(voc_root, caplog):
    root, _ = voc_root
    broken = root / "JPEGImages" / f"{VAL[0]}.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(UserError) as info, decode.data_errors_as_user_errors():
        list(pipeline.decoded_dataset(VOCSource(str(root)), "val"))
    message = str(info.value)
    assert str(broken) in message and "cannot read image" in message and "\n" not in message
    before = decode.SKIPPED.count
    with caplog.at_level(logging.WARNING):
        kept = list(pipeline.decoded_dataset(VOCSource(str(root), on_error="skip"), "val"))
    assert len(kept) == 1 and decode.SKIPPED.count == before + 1
    assert any(str(broken) in r.message and "skipped so far" in r.message for r in caplog.records)


def test_label_out_of_range_is_named(voc_root):
    root, masks = voc_root
    bad = masks[VAL[0]].copy()
    bad[:2, :2] = 37
    save_palette_png(root / "SegmentationClass" / f"{VAL[0]}.png", bad)
    with (
        pytest.raises(UserError, match=r"label\(s\) 37 outside 0..20"),
        decode.data_errors_as_user_errors(),
    ):
        list(pipeline.decoded_dataset(VOCSource(str(root), num_classes=21), "val"))


def test_prepare_voc_aug_builds_train_aug_from_sbd(tmp_path):
    voc = tmp_path / "VOC2012"
    voc_masks = write_voc(voc, TRAIN[:2], VAL)
    # SBD covers one VOC train id, one VOC val id (to be excluded) and two new images.
    sbd_ids = [TRAIN[1], VAL[0], "2008_000002", "2008_000003"]
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    sbd_masks = write_sbd(sbd, sbd_ids[:3], sbd_ids[3:])
    for image_id in ("2008_000002", "2008_000003"):  # SBD images are VOC2012 JPEGImages too
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "prepare_voc_aug.py"),
            "--voc-root",
            str(voc),
            "--sbd-root",
            str(sbd),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "not the 10,582" in result.stderr  # a warning, not a failure, for a subset
    listed = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert listed == sorted([*TRAIN[:2], "2008_000002", "2008_000003"])  # VOC val excluded

    source = VOCSource(str(voc), aug=True, num_classes=21)
    decoded = dict(
        zip(listed, (m for _, m in pipeline.decoded_dataset(source, "train").as_numpy_iterator()))
    )
    # VOC's own mask wins where it exists (it has the 255 borders); SBD's elsewhere.
    np.testing.assert_array_equal(decoded[TRAIN[1]], voc_masks[TRAIN[1]])
    np.testing.assert_array_equal(decoded["2008_000002"], sbd_masks["2008_000002"])
    np.testing.assert_array_equal(decoded["2008_000003"], sbd_masks["2008_000003"])
    with Image.open(voc / "SegmentationClassAug" / "2008_000002.png") as png:
        assert png.mode == "P"
    # val is still the official list with the official masks.
    assert source.describe_split("val").endswith("val.txt")


def test_aug_without_conversion_says_how_to_build_it(voc_root):
    root, _ = voc_root
    with pytest.raises(UserError, match="prepare_voc_aug.py"):
        VOCSource(str(root), aug=True)


@pytest.mark.slow
def test_training_on_voc_through_the_cli(voc_root, tmp_path, cache_dir):
    root, _ = voc_root
    # A broken training image: data.on_error=skip trains without it and says so in the log.
    broken = root / "JPEGImages" / f"{TRAIN[0]}.jpg"
    broken.write_bytes(b"not a jpeg")
    args = ["data=voc", f"data.root={root}", *TINY_DATASET_RUN]
    failed = run_cli([*args, f"hydra.run.dir={tmp_path / 'raise'}"], cache_dir, cwd=tmp_path)
    assert failed.returncode == 2, failed.stderr[-2000:]
    (line,) = error_lines(failed)
    assert str(broken) in line and "data.on_error=skip" in line

    run_dir = tmp_path / "skip"
    result = run_cli(
        [*args, "data.on_error=skip", f"hydra.run.dir={run_dir}"], cache_dir, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped so far" in result.stderr + result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_images"] == len(VAL) and set(metrics["per_class_iou"]) == set(CLASS_NAMES)
