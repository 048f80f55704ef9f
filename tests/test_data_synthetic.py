"""The embedded synthetic dataset: deterministic, in the folder layout, with ignore borders."""

import numpy as np
from PIL import Image

from seg_train.data.synthetic import IGNORE_LABEL, SyntheticSource, generate_scene


def test_scene_is_deterministic_and_has_expected_labels():
    image_a, mask_a = generate_scene(np.random.default_rng([0, 5]), 64)
    image_b, mask_b = generate_scene(np.random.default_rng([0, 5]), 64)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert image_a.shape == (64, 64, 3) and image_a.dtype == np.uint8
    assert set(np.unique(mask_a)) <= {0, 1, 2, 3, IGNORE_LABEL}


def test_every_object_border_is_ignored():
    _, mask = generate_scene(np.random.default_rng([1, 2]), 96)
    # No two 4-neighbours may carry different real classes: a 255 band always separates them.
    for a, b in ((mask[1:, :], mask[:-1, :]), (mask[:, 1:], mask[:, :-1])):
        differ = (a != b) & (a != IGNORE_LABEL) & (b != IGNORE_LABEL)
        assert not differ.any()
    ignored_share = (mask == IGNORE_LABEL).mean()
    assert 0 < ignored_share < 0.2  # a thin band, not whole regions


def test_dataset_covers_all_classes_in_folder_layout(tmp_path):
    root = tmp_path / "synthetic"
    source = SyntheticSource(str(root), num_train=30, num_val=6, image_size=32, seed=3)
    train, val = source.examples("train"), source.examples("val")
    assert len(train) == 30 and len(val) == 6
    assert (root / "splits" / "train.txt").read_text().split()[0] == "train_00000"
    seen = set()
    for example in train:
        mask = np.asarray(Image.open(example.mask_path))
        assert mask.shape == (32, 32)
        seen |= set(np.unique(mask).tolist())
    assert seen == {0, 1, 2, 3, IGNORE_LABEL}
    assert not list(tmp_path.glob(".*tmp*")), "the staging folder must be renamed away"


def test_existing_dataset_is_reused_not_regenerated(tmp_path):
    root = tmp_path / "synthetic"
    SyntheticSource(str(root), num_train=4, num_val=2, image_size=32)
    marker = root / "images" / "train_00000.png"
    stamp = marker.stat().st_mtime_ns
    SyntheticSource(str(root), num_train=4, num_val=2, image_size=32)
    assert marker.stat().st_mtime_ns == stamp


def test_scene_depends_only_on_seed_and_index(tmp_path):
    small = SyntheticSource(str(tmp_path / "a"), num_train=3, num_val=1, image_size=32, seed=9)
    large = SyntheticSource(str(tmp_path / "b"), num_train=5, num_val=1, image_size=32, seed=9)
    first_small = np.asarray(Image.open(small.examples("train")[2].image_path))
    first_large = np.asarray(Image.open(large.examples("train")[2].image_path))
    np.testing.assert_array_equal(first_small, first_large)
