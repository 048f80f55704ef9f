"""The shared tf.data parser keeps labels exact through scale / pad / crop / flip."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from seg_train.data import pipeline
from seg_train.data.folder import FolderSource
from seg_train.data.options import PipelineOptions


def write_folder_dataset(root, masks, images=None):
    """Writes masks (and images) in the folder layout; all stems go to both splits."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for i, mask in enumerate(masks):
        stem = f"im{i}"
        image = images[i] if images is not None else np.stack([mask] * 3, -1)
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{stem}.png")
        stems.append(stem)
    for split in ("train", "val"):
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems))
    return FolderSource(str(root))


def data_config(**overrides):
    base = dict(
        crop_size=[24, 24],
        scale_range=[0.5, 2.0],
        hflip=True,
        ignore_label=255,
        batch_size=4,
        cache=False,
        shuffle_buffer=16,
        num_parallel_calls=None,
    )
    return PipelineOptions.from_mapping({**base, **overrides})


def blocky_mask(rng, shape, labels):
    """A mask of 4x4 blocks with random labels from `labels`."""
    blocks = rng.choice(labels, size=(shape[0] // 4, shape[1] // 4))
    return np.kron(blocks, np.ones((4, 4), dtype=int))


@pytest.mark.parametrize("scale_range", [[0.5, 2.0], [1.0, 1.0], [0.3, 0.6]])
def test_augmented_labels_are_a_subset_of_the_originals(tmp_path, scale_range):
    rng = np.random.default_rng(0)
    masks = [blocky_mask(rng, (20, 28), [0, 3, 7, 255]) for _ in range(6)]
    source = write_folder_dataset(tmp_path, masks)
    data = data_config(scale_range=scale_range)
    seen = set()
    for images, labels in pipeline.train_dataset(source, data, seed=1).repeat(3):
        assert images.shape == (4, 24, 24, 3) and images.dtype.name == "float32"
        assert labels.shape == (4, 24, 24) and labels.dtype.name == "uint8"
        seen |= set(np.unique(labels.numpy()).tolist())
    # Never a label that was not in a mask (bilinear resizing would invent 1, 2, 4, 5, ...).
    assert seen <= {0, 3, 7, 255}
    # 255 survives: it is in the masks, and padding adds it for crops larger than the image.
    assert 255 in seen


def test_image_and_mask_stay_aligned(tmp_path):
    """The image encodes its mask (pixel value = 30 * label): after augmentation they agree."""
    rng = np.random.default_rng(1)
    masks = [blocky_mask(rng, (32, 32), [0, 1, 2, 3]) for _ in range(4)]
    images = [np.stack([m * 30] * 3, -1) for m in masks]
    source = write_folder_dataset(tmp_path, masks, images)
    data = data_config(crop_size=[16, 16], scale_range=[1.0, 1.0])
    for batch_images, batch_labels in pipeline.train_dataset(source, data, seed=2).repeat(4):
        expected = batch_labels.numpy().astype(np.float32) * 30
        np.testing.assert_array_equal(batch_images.numpy()[..., 0], expected)


def test_padding_uses_ignore_label_and_zero_image(tmp_path):
    mask = np.ones((8, 8), dtype=int)
    source = write_folder_dataset(tmp_path, [mask], [np.full((8, 8, 3), 200)])
    data = data_config(crop_size=[16, 16], scale_range=[1.0, 1.0], hflip=False, batch_size=1)
    images, labels = next(iter(pipeline.train_dataset(source, data, seed=0)))
    labels, images = labels.numpy()[0], images.numpy()[0]
    assert (labels == 1).sum() == 64 and (labels == 255).sum() == 16 * 16 - 64
    assert set(np.unique(images[labels == 255])) == {0.0}


def test_same_seed_same_batches(tmp_path):
    rng = np.random.default_rng(2)
    source = write_folder_dataset(tmp_path, [blocky_mask(rng, (24, 24), [0, 1]) for _ in range(8)])
    data = data_config()
    first = [b[1].numpy() for b in pipeline.train_dataset(source, data, seed=5)]
    second = [b[1].numpy() for b in pipeline.train_dataset(source, data, seed=5)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_val_dataset_resizes_labels_nearest(tmp_path):
    rng = np.random.default_rng(3)
    masks = [blocky_mask(rng, (40, 36), [0, 2, 5, 255]) for _ in range(3)]
    source = write_folder_dataset(tmp_path, masks)
    data = data_config(crop_size=[17, 23])
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
    data = data_config(scale_range=[1.0, 1.0])
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
