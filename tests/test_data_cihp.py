"""CIHP in the release layout: exact ids, the .mat palette, and left/right swaps on flips."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from seg_train.data import augment, cihp, pipeline
from seg_train.data.cihp import CIHPSource
from seg_train.errors import UserError
from seg_train.tasks.sources import pipeline_options
from tests.fixture_writers import H, W, write_cihp
from tests.helpers import compose_config, train_through_cli

TRAIN = ["0000001", "0000002", "0000003", "0000004"]
VAL = ["0000005", "0000006"]


@pytest.fixture
def cihp_root(tmp_path):
    root = tmp_path / "instance-level_human_parsing"
    return root, write_cihp(root, TRAIN, VAL)


def test_category_ids_decode_exactly(cihp_root):
    root, masks = cihp_root
    source = CIHPSource(str(root), num_classes=20)
    for split, ids in (("train", TRAIN), ("val", VAL)):
        decoded = list(pipeline.decoded_dataset(source, split).as_numpy_iterator())
        assert len(decoded) == len(ids)
        for image_id, (image, mask) in zip(ids, decoded):
            assert image.shape == (H, W, 3)
            np.testing.assert_array_equal(mask, masks[image_id])


def test_palette_comes_from_the_colormap_file_when_present(tmp_path):
    custom = [[(7 * i) % 256, (11 * i) % 256, (13 * i) % 256] for i in range(20)]
    root = tmp_path / "a"
    write_cihp(root, TRAIN[:1], VAL[:1], colormap=custom)
    source = CIHPSource(str(root))
    assert source.palette == custom and source.palette_origin.endswith("human_colormap.mat")

    (root / "human_colormap.mat").unlink()
    fallback = CIHPSource(str(root))
    assert fallback.palette == cihp.PALETTE and "not found" in fallback.palette_origin

    (root / "human_colormap.mat").write_bytes(b"MATLAB 5.0 MAT-file, but truncated")
    broken = CIHPSource(str(root))
    assert broken.palette == cihp.PALETTE and "built-in" in broken.palette_origin


def test_config_matches_the_module():
    cfg = compose_config(["data=cihp", "data.root=/x"])
    assert tuple(cfg.data.class_names) == cihp.CLASS_NAMES
    assert [list(c) for c in cfg.data.palette] == cihp.PALETTE
    assert [tuple(p) for p in cfg.data.flip_pairs] == list(cihp.FLIP_PAIRS)
    for left, right in cihp.FLIP_PAIRS:
        assert cihp.CLASS_NAMES[left].startswith("Left-")
        assert cihp.CLASS_NAMES[right] == "Right-" + cihp.CLASS_NAMES[left][len("Left-") :]


def test_flip_swaps_exactly_the_left_right_pairs():
    rng = np.random.default_rng(0)
    values = np.array([*range(20), 255], dtype=np.uint8)
    mask = rng.choice(values, size=(H, W)).astype(np.uint8)
    image = np.stack([mask] * 3, -1).astype(np.float32)
    expected = np.arange(256, dtype=np.uint8)
    for left, right in cihp.FLIP_PAIRS:
        expected[left], expected[right] = right, left
    assert (expected != np.arange(256)).sum() == 6  # only the six left/right ids move
    outcomes = set()
    for seed in range(12):
        out_image, out_mask = augment.random_hflip(
            tf.constant(image), tf.constant(mask), tf.constant([seed, 7]), cihp.FLIP_PAIRS
        )
        out_image, out_mask = out_image.numpy(), out_mask.numpy()
        flipped = not np.array_equal(out_image, image)
        outcomes.add(flipped)
        if flipped:
            np.testing.assert_array_equal(out_image, image[:, ::-1])
            np.testing.assert_array_equal(out_mask, expected[mask[:, ::-1]])
        else:
            np.testing.assert_array_equal(out_mask, mask)
    assert outcomes == {True, False}


def test_training_labels_only_gain_flip_partners(cihp_root):
    root, masks = cihp_root
    source = CIHPSource(str(root))
    cfg = compose_config(
        ["data=cihp", f"data.root={root}", "data.crop_size=[24,24]", "data.batch_size=2"]
    )
    written = set().union(*(set(np.unique(m).tolist()) for m in masks.values()))
    partners = {b for a, b in cihp.FLIP_PAIRS if a in written} | {
        a for a, b in cihp.FLIP_PAIRS if b in written
    }
    seen = set()
    for _, labels in pipeline.train_dataset(source, pipeline_options(cfg), seed=1).repeat(2):
        seen |= set(np.unique(labels.numpy()).tolist())
    assert seen <= written | partners | {255}


def test_missing_root_shows_the_expected_tree(tmp_path):
    nested = tmp_path / "instance-level_human_parsing"
    (nested / "Training" / "Category_ids").mkdir(parents=True)
    with pytest.raises(UserError) as info:
        CIHPSource(str(tmp_path))
    message = str(info.value)
    assert "Category_ids/<id>.png" in message and "train_id.txt" in message
    assert f"did you mean data.root={nested}" in message


def test_id_without_mask_is_named(cihp_root):
    root, _ = cihp_root
    missing = root / "Validation" / "Category_ids" / f"{VAL[0]}.png"
    missing.unlink()
    with pytest.raises(UserError, match=f"{missing}: missing"):
        pipeline.decoded_dataset(CIHPSource(str(root)), "val")


@pytest.mark.slow
def test_training_on_cihp_through_the_cli(cihp_root, tmp_path, cache_dir):
    root, _ = cihp_root
    metrics = train_through_cli(
        ["data=cihp", f"data.root={root}"], tmp_path / "run", cache_dir, tmp_path
    )
    assert metrics["num_images"] == len(VAL) and "Right-shoe" in metrics["per_class_iou"]
