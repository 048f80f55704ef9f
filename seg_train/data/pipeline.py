"""The one shared parser: decoded (uint8 image, uint8 mask) pairs -> batched training tensors.

Every dataset goes through the same steps: parallel decode, optional cache, shuffle, joint
random scale / crop (padding labels with the ignore value) / horizontal flip, batching and
prefetch. Labels are only ever resized nearest-neighbour, so augmentation never invents a class.
Images leave as float32 in 0..255; each model normalises them in its own first layer, so
train, eval, infer and export cannot disagree about preprocessing.

Random choices use stateless ops seeded per element from `tf.data.Dataset.random`, so a run is
reproducible under parallel `map` and differs from epoch to epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
from omegaconf import DictConfig

from seg_train.data.folder import FolderSource

AUTOTUNE = tf.data.AUTOTUNE


def decoded_dataset(source: FolderSource, split: str, num_parallel_calls: int | None = None,
                    shuffle_buffer: int | None = None, seed: int | None = None
                    ) -> tf.data.Dataset:
    """Decodes a split: (uint8 image [H, W, 3], uint8 mask [H, W]) per element.

    Args:
        source: The dataset's decoder.
        split: Split name, e.g. "train".
        num_parallel_calls: Parallel decodes; None = AUTOTUNE.
        shuffle_buffer: If set, file paths are shuffled (cheaply, before decoding) with this
            buffer, anew each epoch; otherwise elements come in file order.
        seed: Shuffle seed.
    """
    examples = source.examples(split)
    paths = tf.data.Dataset.from_tensor_slices(
        ([e.image_path for e in examples], [e.mask_path for e in examples])
    )
    if shuffle_buffer:
        paths = paths.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return paths.map(source.decode, num_parallel_calls=num_parallel_calls or AUTOTUNE)


def resize_pair(image: tf.Tensor, mask: tf.Tensor, size: tf.Tensor | Sequence[int]
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes an image bilinearly (to float32) and its mask nearest-neighbour (keeping dtype)."""
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
    mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
    return image, mask


def random_scale(image: tf.Tensor, mask: tf.Tensor, scale_range: Sequence[float],
                 seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Rescales image and mask together by a factor drawn uniformly from `scale_range`."""
    low, high = float(scale_range[0]), float(scale_range[1])
    if low == high == 1.0:
        return tf.cast(image, tf.float32), mask
    scale = tf.random.stateless_uniform([], seed, low, high)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    return resize_pair(image, mask, new_hw)


def pad_to_size(image: tf.Tensor, mask: tf.Tensor, size: Sequence[int], ignore_label: int
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """Pads bottom/right to at least `size`: image with 0, mask with `ignore_label`."""
    hw = tf.shape(image)[:2]
    pad_h = tf.maximum(size[0] - hw[0], 0)
    pad_w = tf.maximum(size[1] - hw[1], 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
    mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=ignore_label)
    return image, mask


def random_crop(image: tf.Tensor, mask: tf.Tensor, size: Sequence[int], seed: tf.Tensor
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """Crops the same random `size` window from image and mask (both at least `size`)."""
    hw = tf.shape(image)[:2]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    top = tf.random.stateless_uniform([], seeds[0], 0, hw[0] - size[0] + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[1], 0, hw[1] - size[1] + 1, dtype=tf.int32)
    image = image[top : top + size[0], left : left + size[1]]
    mask = mask[top : top + size[0], left : left + size[1]]
    return image, mask


def random_hflip(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirrors image and mask together with probability 0.5."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    mask = tf.cond(flip, lambda: tf.reverse(mask, [1]), lambda: mask)
    return image, mask


def augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, data: DictConfig
            ) -> tuple[tf.Tensor, tf.Tensor]:
    """The training transform: random scale, pad, random crop to `data.crop_size`, flip."""
    crop = list(data.crop_size)
    scale_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image, mask = random_scale(image, mask, data.scale_range, scale_seed)
    image, mask = pad_to_size(image, mask, crop, data.ignore_label)
    image, mask = random_crop(image, mask, crop, crop_seed)
    if data.hflip:
        image, mask = random_hflip(image, mask, flip_seed)
    image = tf.ensure_shape(image, [crop[0], crop[1], 3])
    mask = tf.ensure_shape(mask, [crop[0], crop[1]])
    return image, mask


def train_dataset(source: FolderSource, data: DictConfig, seed: int, repeat: bool = False
                  ) -> tf.data.Dataset:
    """Shuffled, augmented, batched training data: (float32 [B, H, W, 3], uint8 [B, H, W])."""
    parallel = data.num_parallel_calls or AUTOTUNE
    if data.cache:
        # Shuffle after the cache, or every epoch would replay the first epoch's order.
        examples = decoded_dataset(source, "train", parallel).cache()
        examples = examples.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        examples = decoded_dataset(source, "train", parallel, data.shuffle_buffer, seed)
    if repeat:
        examples = examples.repeat()
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    pairs = tf.data.Dataset.zip((examples, seeds))
    batches = pairs.map(lambda pair, s: augment(*pair, s, data), num_parallel_calls=parallel)
    return batches.batch(data.batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def val_dataset(source: FolderSource, data: DictConfig, split: str = "val") -> tf.data.Dataset:
    """Validation data for `fit`: resized to `data.crop_size`, batched, in file order."""
    parallel = data.num_parallel_calls or AUTOTUNE
    examples = decoded_dataset(source, split, parallel)
    if data.cache:
        examples = examples.cache()
    crop = list(data.crop_size)
    resized = examples.map(lambda image, mask: resize_pair(image, mask, crop),
                           num_parallel_calls=parallel)
    return resized.batch(data.batch_size).prefetch(AUTOTUNE)
