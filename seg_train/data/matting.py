"""Matting targets in the shared pipeline: float alpha = matte / 255, resized bilinearly.

A matting source (`source.task == "matting"`, e.g. the portrait set with `data.task=matting`)
decodes each matte as its raw uint8 alpha. Here the training transform stacks that alpha onto
the image as a fourth channel and runs the segmentation transform's own image operations
(`augment.py`) on the stack (random scale and crop, or resize; flip), so image and alpha get
exactly the same geometry and both are interpolated bilinearly (alpha is continuous;
nearest-neighbour is for class ids). Crop padding gives alpha 0 (background). Colour jitter
touches the image only. `pipeline.py` picks these functions for a source that `is_matting`.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from seg_train.data.augment import color_jitter, pad_colour, random_hflip, random_scaled_crop
from seg_train.data.base import Source
from seg_train.data.options import PipelineOptions

MATTING = "matting"


def is_matting(source: Source) -> bool:
    """Whether a source decodes alpha mattes (its `task` attribute is "matting")."""
    return getattr(source, "task", "segmentation") == MATTING


def _stack(image: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """float32 [H, W, 4]: RGB and alpha, all on the 0..255 scale."""
    return tf.concat([tf.cast(image, tf.float32), tf.cast(alpha, tf.float32)[..., None]], -1)


def _split(stacked: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """float32 image [H, W, 3] in 0..255 and alpha [H, W] in 0..1."""
    return stacked[..., :3], tf.clip_by_value(stacked[..., 3] / 255.0, 0.0, 1.0)


def resize(image: tf.Tensor, alpha: tf.Tensor, size: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
    """Image and uint8 alpha resized bilinearly -> float32 image, alpha in 0..1.

    Each is resized on its own: bilinear resizing works channel by channel, so the values are
    those of resizing them stacked, without the channel-axis concat (an interleaving copy of
    the whole image: 3.9 ms of an 800x600 pair's 6.5 at 256x256, one thread).
    """
    image = tf.image.resize(image, size, method="bilinear")
    alpha = tf.image.resize(alpha[..., None], size, method="bilinear")[..., 0]
    return image, tf.clip_by_value(alpha / 255.0, 0.0, 1.0)


def augment(
    image: tf.Tensor, alpha: tf.Tensor, seed: tf.Tensor, options: PipelineOptions
) -> tuple[tf.Tensor, tf.Tensor]:
    """The training transform of `augment.augment`, with a continuous alpha target.

    Draws from the same stateless seeds as `augment.augment`, so a matting run's crops and
    flips are those a segmentation run of the same seed would take.

    Returns:
        float32 image [crop, crop, 3] in 0..255 and float32 alpha [crop, crop] in 0..1.
    """
    crop = options.crop
    crop_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if options.transform == "resize":
        image, alpha = resize(image, alpha, crop)
    else:
        # The segmentation crop carries a mask; ours rides in the image, theirs is a dummy.
        stacked = _stack(image, alpha)
        dummy = tf.zeros(tf.shape(stacked)[:2], tf.uint8)
        fill = [*pad_colour(options.pad_value), 0.0]  # alpha 0 where padded
        stacked, _ = random_scaled_crop(
            stacked, dummy, options.scale_range, crop, options.ignore_label, crop_seed, fill
        )
        image, alpha = _split(stacked)
    if options.hflip:  # the alpha mirrors as a mask does (no flip pairs)
        image, alpha = random_hflip(image, alpha, flip_seed)
    image = color_jitter(image, jitter_seed, options.jitter)
    return tf.ensure_shape(image, [*crop, 3]), tf.ensure_shape(alpha, crop)
