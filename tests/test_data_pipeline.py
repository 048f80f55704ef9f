"""The shared tf.data parser (data/pipeline.py, augment.py, decode.py): labels stay exact through
scale / crop / pad / flip, flip pairs, jitter, on_error, seeds, and the data config keys.

The first tests feed in-memory pairs (any source); the later ones read tiny datasets written in
the folder layout (PNG files on disk).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image

from seg_train import config_checks
from seg_train.config_checks import check_config
from seg_train.data import augment, decode, pipeline
from seg_train.data.base import Source
from seg_train.data.options import PipelineOptions
from seg_train.data.readers import DataError, Pair
from seg_train.errors import UserError
from tests.fixture_writers import blocky_mask, write_folder_dataset
from tests.helpers import compose_config, small_pipeline_options


class ArraySource(Source):
    """A source serving in-memory pairs; a pair whose image is None is a broken file."""

    def __init__(self, pairs, **kwargs):
        super().__init__(**kwargs)
        self.pairs = pairs

    def records(self, split):
        self.check_split(split)
        names = [str(i) for i in range(len(self.pairs))]
        return tf.data.Dataset.from_tensor_slices((names, names, names))

    def load(self, name, image, mask):
        image, mask = self.pairs[int(name)]
        if image is None:
            raise DataError(f"image{name}.jpg", "cannot read image (broken)")
        return Pair(image, mask, f"image{name}.jpg", f"mask{name}.png")


def array_options(**overrides):
    base = dict(
        crop_size=[24, 24],
        scale_range=[1.0, 1.0],
        hflip=True,
        ignore_label=255,
        batch_size=2,
        cache=False,
        shuffle_buffer=8,
        num_parallel_calls=None,
        flip_pairs=[],
        jitter=dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0),
    )
    return PipelineOptions.from_mapping({**base, **overrides})


def labelled_pairs(rng, count, shape, values):
    """Masks with a 255 border band; each image's three channels spell out its mask."""
    pairs = []
    for _ in range(count):
        mask = rng.choice(np.asarray(values, np.uint8), size=shape).astype(np.uint8)
        mask[:, :2] = 255
        pairs.append((np.stack([mask] * 3, -1), mask))
    return pairs


def test_ignore_survives_crop_pad_and_flip_aligned_with_the_image():
    rng = np.random.default_rng(0)
    source = ArraySource(labelled_pairs(rng, 6, (20, 30), [0, 1, 5]))
    data = array_options(crop_size=[26, 26])  # taller than the images: padding on every crop
    saw_padding = saw_band = False
    for images, labels in pipeline.train_dataset(source, data, seed=4).repeat(4):
        images, labels = images.numpy(), labels.numpy()
        padded = (images == 0).all(-1) & (labels == 255)
        real = ~padded
        # Outside the padding the label is exactly the value the image carries, 255 included.
        np.testing.assert_array_equal(images[..., 0][real], labels[real].astype(np.float32))
        saw_padding |= padded.any()
        saw_band |= ((labels == 255) & (images[..., 0] == 255)).any()
        assert set(np.unique(labels).tolist()) <= {0, 1, 5, 255}
    assert saw_padding and saw_band


def test_flip_pairs_swap_in_training_batches():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 3  # "left" on the left half
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 200
    source = ArraySource([(image, mask)] * 4)
    data = array_options(crop_size=[8, 8], flip_pairs=[[3, 4]], batch_size=1, shuffle_buffer=1)
    seen = set()
    for images, labels in pipeline.train_dataset(source, data, seed=0).repeat(5):
        left_bright = images.numpy()[0, 0, 0, 0] == 200
        expected = (
            np.where(np.arange(8) < 4, 3, 0) if left_bright else np.where(np.arange(8) >= 4, 4, 0)
        )
        np.testing.assert_array_equal(labels.numpy()[0, 0], expected)
        seen.add(bool(left_bright))
    assert seen == {True, False}


def test_jitter_changes_images_only_and_is_seeded():
    rng = np.random.default_rng(1)
    source = ArraySource(labelled_pairs(rng, 4, (24, 24), [0, 1]))
    plain = array_options(shuffle_buffer=1)
    jitter = array_options(
        shuffle_buffer=1, jitter=dict(brightness=0.2, contrast=0.3, saturation=0.3, hue=0.05)
    )
    base = list(pipeline.train_dataset(source, plain, seed=2).as_numpy_iterator())
    first = list(pipeline.train_dataset(source, jitter, seed=2).as_numpy_iterator())
    again = list(pipeline.train_dataset(source, jitter, seed=2).as_numpy_iterator())
    for (bi, bl), (ji, jl), (ai, _) in zip(base, first, again):
        np.testing.assert_array_equal(bl, jl)  # the same crops and flips
        np.testing.assert_array_equal(ji, ai)  # reproducible
        assert not np.array_equal(bi, ji) and ji.min() >= 0 and ji.max() <= 255


def test_cardinality_is_known_and_broken_files_raise_or_skip(caplog):
    rng = np.random.default_rng(2)
    pairs = labelled_pairs(rng, 3, (10, 12), [0, 1])
    assert int(pipeline.decoded_dataset(ArraySource(pairs), "val").cardinality()) == 3
    pairs[1] = (None, None)
    with (
        pytest.raises(UserError, match=r"image1.jpg: cannot read image.*data.on_error=skip"),
        decode.data_errors_as_user_errors(),
    ):
        list(pipeline.decoded_dataset(ArraySource(pairs), "val"))
    skipping = pipeline.decoded_dataset(ArraySource(pairs, on_error="skip"), "val")
    assert len(list(skipping)) == 2
    # A bad data.on_error is the config check's to refuse: test_config_rules_for_data_keys.


def test_size_mismatch_and_out_of_range_labels_are_problems():
    image = np.zeros((10, 12, 3), np.uint8)
    source = ArraySource([(image, np.full((10, 13), 7, np.uint8))], num_classes=4)
    problems = source.problems(source.load("0", b"", b""))
    assert [p.file for p in problems] == ["mask0.png", "mask0.png"]
    assert "mask is 13x10 but its image image0.jpg is 12x10" in problems[0].problem
    assert "label(s) 7 outside 0..3 and 255" in problems[1].problem


def test_flip_table_swaps_pairs_and_the_config_check_rejects_bad_ones():
    assert augment.flip_table([]) is None
    table = augment.flip_table([[3, 4], [7, 9]])
    assert (table[[3, 4, 7, 9]] == [4, 3, 9, 7]).all() and table[5] == 5 and table[255] == 255
    # flip_table trusts its pairs: the config check refuses bad ones before any data is read.
    for bad in ([[1, 1]], [[1, 2], [2, 3]], [[1, 255]], [[1, 2, 3]]):
        with pytest.raises(UserError, match="data.flip_pairs"):
            config_checks.flip_pairs("data.flip_pairs", OmegaConf.create(bad))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.on_error=ignore", "data.on_error must be one of raise, skip"),
        ("data.jitter.hue=0.7", "data.jitter.hue must be a number in 0..0.5"),
        ("data.flip_pairs=[[14,14]]", "data.flip_pairs must list [left, right]"),
        ("data.source=raw", "for Oxford-IIIT Pet use data.format=raw"),
        ("check.splits=[]", "check.splits must be null"),
    ],
)
def test_config_rules_for_data_keys(override, fragment):
    dataset = ["data=oxford_pets"] if "source" in override else []
    mode = ["mode=check"] if override.startswith("check.") else []
    cfg = compose_config([*dataset, *mode, override])
    with pytest.raises(UserError) as info:
        check_config(cfg)
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["voc", "cihp", "portrait", "oxford_pets", "folder", "synthetic"])
def test_every_data_config_has_the_shared_keys(name):
    cfg = compose_config(
        [f"data={name}", "data.root=/x", "data.num_classes=2", "data.class_names=[a,b]"]
        if name == "folder"
        else [f"data={name}"]
    )
    for key in (
        "name",
        "root",
        "num_classes",
        "class_names",
        "palette",
        "ignore_label",
        "batch_size",
        "crop_size",
        "scale_range",
        "hflip",
        "flip_pairs",
        "jitter",
        "cache",
        "shuffle_buffer",
        "num_parallel_calls",
        "on_error",
        "source",
    ):
        # `key in cfg.data` is False for a `???` value, so look at the key list itself.
        assert key in set(cfg.data.keys()), (name, key)
    assert cfg.data.source._target_.startswith("seg_train.data.")


# --- Tiny datasets in the folder layout ----------------------------------------------------------


@pytest.mark.parametrize("scale_range", [[0.5, 2.0], [1.0, 1.0], [0.3, 0.6]])
def test_augmented_labels_are_a_subset_of_the_originals(tmp_path, scale_range):
    rng = np.random.default_rng(0)
    masks = [blocky_mask(rng, (20, 28), [0, 3, 7, 255]) for _ in range(6)]
    source = write_folder_dataset(tmp_path, masks)
    data = small_pipeline_options(scale_range=scale_range)
    seen = set()
    for images, labels in pipeline.train_dataset(source, data, seed=1).repeat(3):
        assert images.shape == (4, 24, 24, 3) and images.dtype.name == "float32"
        assert labels.shape == (4, 24, 24) and labels.dtype.name == "uint8"
        seen |= set(np.unique(labels.numpy()).tolist())
    # Never a label that was not in a mask (bilinear resizing would invent 1, 2, 4, 5, ...).
    assert seen <= {0, 3, 7, 255}
    # 255 survives: it is in the masks, and padding adds it for crops larger than the image.
    assert 255 in seen


def test_padding_uses_ignore_label_and_zero_image(tmp_path):
    mask = np.ones((8, 8), dtype=int)
    source = write_folder_dataset(tmp_path, [mask], [np.full((8, 8, 3), 200)])
    data = small_pipeline_options(
        crop_size=[16, 16], scale_range=[1.0, 1.0], hflip=False, batch_size=1
    )
    images, labels = next(iter(pipeline.train_dataset(source, data, seed=0)))
    labels, images = labels.numpy()[0], images.numpy()[0]
    assert (labels == 1).sum() == 64 and (labels == 255).sum() == 16 * 16 - 64
    assert set(np.unique(images[labels == 255])) == {0.0}


def test_same_seed_same_batches(tmp_path):
    rng = np.random.default_rng(2)
    source = write_folder_dataset(tmp_path, [blocky_mask(rng, (24, 24), [0, 1]) for _ in range(8)])
    data = small_pipeline_options()
    first = [b[1].numpy() for b in pipeline.train_dataset(source, data, seed=5)]
    second = [b[1].numpy() for b in pipeline.train_dataset(source, data, seed=5)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_val_dataset_resizes_labels_nearest(tmp_path):
    rng = np.random.default_rng(3)
    masks = [blocky_mask(rng, (40, 36), [0, 2, 5, 255]) for _ in range(3)]
    source = write_folder_dataset(tmp_path, masks)
    data = small_pipeline_options(crop_size=[17, 23])
    for images, labels in pipeline.val_dataset(source, data):
        assert images.shape[1:] == (17, 23, 3)
        assert set(np.unique(labels.numpy()).tolist()) <= {0, 2, 5, 255}


def test_palette_mask_decodes_to_indices_not_colours(tmp_path):
    mask = np.array([[0, 1], [15, 255]], dtype=np.uint8)
    source = write_folder_dataset(tmp_path, [mask])
    palette_png = Image.fromarray(mask)
    palette_png.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    palette_png.save(source.root / "masks" / "im0.png")
    assert Image.open(source.root / "masks" / "im0.png").mode == "P"
    _, decoded = next(iter(pipeline.decoded_dataset(source, "val")))
    np.testing.assert_array_equal(decoded.numpy(), mask)


@pytest.mark.parametrize("global_seed", [0, 7])
def test_training_order_depends_on_the_run_seed_only_whatever_the_global_seed(
    tmp_path, global_seed
):
    # seed=0 in the config sets TensorFlow's global seed to 0, which tf.data's shuffle used to
    # trip over while tracing a tensor seed.
    masks = [np.full((24, 24), i % 3, dtype=int) for i in range(6)]
    source = write_folder_dataset(tmp_path, masks)
    data = small_pipeline_options(scale_range=[1.0, 1.0])
    tf.random.set_seed(global_seed)
    first = [
        labels.numpy()[:, 0, 0].tolist()
        for _, labels in pipeline.train_dataset(source, data, seed=3)
    ]
    tf.random.set_seed(global_seed + 1)
    again = [
        labels.numpy()[:, 0, 0].tolist()
        for _, labels in pipeline.train_dataset(source, data, seed=3)
    ]
    assert first == again
