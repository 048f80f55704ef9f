"""The portrait matting set: soft 0..255 mattes binarised exactly at data.matte_threshold."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seg_train.data import pipeline, portrait
from seg_train.data.portrait import PortraitSource
from seg_train.errors import UserError
from tests.fixture_writers import H, W, write_portrait
from tests.helpers import compose_config, train_through_cli


@pytest.fixture
def portrait_root(tmp_path):
    root = tmp_path / "portrait"
    return root, write_portrait(root, num_train=4, num_test=2)


@pytest.mark.parametrize("threshold", [0, 127])
def test_mattes_binarise_at_the_threshold(portrait_root, threshold):
    root, mattes = portrait_root
    source = PortraitSource(str(root), matte_threshold=threshold, num_classes=2)
    examples = source.examples("val")
    decoded = list(pipeline.decoded_dataset(source, "val").as_numpy_iterator())
    assert len(decoded) == 2
    for example, (image, mask) in zip(examples, decoded):
        assert image.shape == (H, W, 3)
        matte = mattes[example.image_path]
        np.testing.assert_array_equal(mask, (matte > threshold).astype(np.uint8))
    soft = (matte > 0) & (matte < 255)
    if threshold == 0:  # the classic recipe: any alpha is person
        assert (mask[soft] == 1).all()


def test_config_matches_the_module():
    cfg = compose_config(["data=portrait", "data.root=/x"])
    assert tuple(cfg.data.class_names) == portrait.CLASS_NAMES
    assert [list(c) for c in cfg.data.palette] == portrait.PALETTE
    assert cfg.data.matte_threshold == 0 and dict(cfg.data.splits) == portrait.DEFAULT_SPLITS


def test_unpaired_files_are_named_or_skipped(portrait_root):
    root, _ = portrait_root
    (root / "testing" / "00005_matte.png").unlink()  # an image without its matte
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "testing" / "00099_matte.png")
    problems = PortraitSource(str(root)).listing_problems("val")
    assert [p.file for p in problems] == [
        str(root / "testing" / "00005_matte.png"),
        str(root / "testing" / "00099_matte.png"),
    ]
    with pytest.raises(UserError, match="00005_matte.png: missing"):
        pipeline.decoded_dataset(PortraitSource(str(root)), "val")
    kept = list(pipeline.decoded_dataset(PortraitSource(str(root), on_error="skip"), "val"))
    assert len(kept) == 1


def test_missing_folder_shows_the_expected_tree(tmp_path):
    (tmp_path / "training").mkdir()
    with pytest.raises(UserError) as info:
        PortraitSource(str(tmp_path))
    assert "no testing/ folder" in str(info.value) and "NNNNN_matte.png" in str(info.value)
    with pytest.raises(UserError, match="matte_threshold"):
        PortraitSource(str(tmp_path), matte_threshold=255)


@pytest.mark.slow
def test_training_on_portraits_through_the_cli(portrait_root, tmp_path, cache_dir):
    root, _ = portrait_root
    metrics = train_through_cli(
        ["data=portrait", f"data.root={root}"], tmp_path / "run", cache_dir, tmp_path
    )
    assert metrics["num_images"] == 2 and set(metrics["per_class_iou"]) == {"background", "person"}
