"""The training transform: joint geometry of image and mask, then flip and photometric jitter.

`augment` turns one decoded (uint8 image, uint8 mask) pair into a `crop_size` sample:
`transform=crop` = joint random scale / crop (padding images with `pad_value` and labels with
the ignore value; only the cropped part is resized), or `transform=resize` = the whole image
resized to the crop size; then horizontal flip (swapping left/right class ids where the dataset
has them) and optional colour jitter. Labels are only ever resized nearest-neighbour, so
augmentation never invents a class. Images leave as float32 in 0..255.

Every random choice is drawn with stateless ops from the `seed` passed in, so the pipeline can
make a run reproducible under parallel `map` (see `pipeline.train_dataset`). The matting
transform (`matting.py`) runs these same operations on image + alpha.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from seg_train.data.decode import JpegWindows
from seg_train.data.options import PipelineOptions


def resize_pair(
    image: tf.Tensor,
    mask: tf.Tensor,
    size: tf.Tensor | Sequence[int],
    mirror: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes an image bilinearly (to float32) and its mask nearest-neighbour (keeping dtype),
    mirrored left to right where `mirror` (a bool tensor) is true.

    The mask is resized by two gathers (`_nearest_window`): the pixels tf.image.resize picks
    (up to exact ties, see `_nearest_rows`) at ~1/10 of its cost on a uint8 mask (4.4 ms of a
    500x375 pair's 6.7 at 512x512 on one thread). The image stays uint8 into the resize:
    casting the whole image first (as the crop does with its window) costs more than the
    float kernel saves here. The mask is mirrored by gathering its columns in reverse (exactly
    the mirrored resized mask), the image before or after the resize, whichever reverses fewer
    bytes: the uint8 source, or the float32 result (4 bytes a value; e.g. a 500x375 source
    mirrored before a resize to 512x512 reverses 0.56 MB instead of 3.1 MB, ~0.3 vs ~0.65 ms,
    and after one to 128x128 0.2 MB instead). Bilinear resizing with half-pixel centres
    commutes with the mirror, so both give the same values up to float rounding.
    """
    if mirror is not None:
        small_source = tf.size(image) < 4 * size[0] * size[1] * 3
        before = tf.logical_and(mirror, small_source)
        image = tf.cond(before, lambda: tf.reverse(image, [1]), lambda: image)
    image = tf.image.resize(image, size, method="bilinear")  # float32
    if mirror is not None:
        after = tf.logical_and(mirror, tf.logical_not(small_source))
        image = tf.cond(after, lambda: tf.reverse(image, [1]), lambda: image)
    height, width = tf.shape(mask)[0], tf.shape(mask)[1]
    mirrored = False if mirror is None else mirror
    mask = _nearest_window(mask, 0, height, size[0], 0, width, size[1], mirrored)
    return image, mask


def _source_span(
    size: tf.Tensor, scaled_size: tf.Tensor, start: tf.Tensor, count: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """The source rows [first, end) behind rows [start, start + count) of a rescaled axis."""
    ratio = tf.cast(size, tf.float32) / tf.cast(scaled_size, tf.float32)
    first = tf.cast(tf.floor(tf.cast(start, tf.float32) * ratio), tf.int32)
    first = tf.clip_by_value(first, 0, size - 1)
    end = tf.cast(tf.math.ceil(tf.cast(start + count, tf.float32) * ratio), tf.int32)
    return first, tf.clip_by_value(end, first + 1, size)


def _nearest_rows(first: tf.Tensor, end: tf.Tensor, count) -> tf.Tensor:
    """The rows a nearest-neighbour resize with half-pixel centres samples when it resizes rows
    [first, end) to `count` rows: first + floor((i + 0.5) * (end - first) / count).

    Computed exactly, in integers. tf.image.resize(method="nearest") computes the same product
    in float32: identical wherever the scale is exact in binary (counts that are powers of two,
    e.g. 128, 256, 512), otherwise it can pick the row below where a centre falls exactly on a
    row boundary; and in a graph with a constant `count` TensorFlow's rewrites of a float form
    of this function moved such ties too. Two gathers with these indices resize a uint8 mask at
    a fraction of tf.image.resize's cost.
    """
    length = tf.cast(end - first, tf.int64)  # int64: the products below pass 2**31 at ~46k px
    count = tf.cast(count, tf.int64)
    offsets = ((2 * tf.range(count) + 1) * length) // (2 * count)
    return first + tf.cast(tf.minimum(offsets, length - 1), tf.int32)


def _nearest_window(
    mask: tf.Tensor,
    row0: tf.Tensor,
    row1: tf.Tensor,
    height: tf.Tensor,
    col0: tf.Tensor,
    col1: tf.Tensor,
    width: tf.Tensor,
    mirror: tf.Tensor | bool = False,
) -> tf.Tensor:
    """Rows [row0, row1) and columns [col0, col1) of a mask resized nearest to height x width,
    mirrored left to right where `mirror` (the same gather, its columns in reverse order).

    The columns are gathered as rows of the transposed mask: a gather along the inner axis
    copies one byte at a time and costs ~5x more than two transposes of the small window.
    """
    rows = tf.gather(mask, _nearest_rows(row0, row1, height))
    columns = _nearest_rows(col0, col1, width)
    columns = tf.where(mirror, tf.reverse(columns, [0]), columns)
    return tf.transpose(tf.gather(tf.transpose(rows), columns))


def pad_colour(pad_value: float | Sequence[float] | None) -> list[float]:
    """`data.pad_value` (0 or [r, g, b] in 0..255) as one float per channel."""
    if pad_value is None:
        return [0.0, 0.0, 0.0]
    if isinstance(pad_value, (int, float)):
        return [float(pad_value)] * 3
    return [float(v) for v in pad_value]


def pad_image(image: tf.Tensor, padding: Sequence[Sequence], colour: Sequence[float]) -> tf.Tensor:
    """Pads a float [..., H, W, C] image with a constant colour of C values (`padding` =
    [[top, bottom], [left, right]]); the image's own pixels are copied bit-exact.
    """
    if not any(colour):
        lead = [[0, 0]] * (len(image.shape) - 3)
        return tf.pad(image, lead + list(padding) + [[0, 0]])
    # Blocks of the colour concatenated around the image. tf.pad takes one constant for all
    # channels, and padding each channel alone then stacking them (the obvious way) costs
    # ~2.3 ms per 321x321 crop in the stack (an inner-axis interleave), more than the crop's
    # JPEG decode. A block is one row of the colour (tiled) broadcast down its rows:
    # broadcasting the C values straight to [rows, columns, C] costs ~2x more (measured).
    fill = tf.constant(colour, image.dtype)
    shape = tf.shape(image)
    (top, bottom), (left, right) = (padding[0][0], padding[0][1]), (padding[1][0], padding[1][1])
    lead = shape[:-3]

    def block(rows, columns):
        row = tf.reshape(
            tf.tile(fill, [columns]), tf.concat([tf.ones_like(lead), [1, columns, -1]], 0)
        )
        return tf.broadcast_to(row, tf.concat([lead, [rows, columns, shape[-1]]], 0))

    rows = tf.concat([block(shape[-3], left), image, block(shape[-3], right)], axis=-2)
    width = shape[-2] + left + right
    return tf.concat([block(top, width), rows, block(bottom, width)], axis=-3)


def random_scaled_crop(
    image: tf.Tensor | JpegWindows,
    mask: tf.Tensor,
    scale_range: Sequence[float],
    size: Sequence[int],
    ignore_label: int,
    seed: tf.Tensor,
    pad_value: float | Sequence[float] = 0,
    mirror: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Random scale, then a random `size` crop (padded where the scaled image is smaller),
    mirrored left to right where `mirror` (a bool tensor) is true.

    Equivalent to rescaling the whole pair by a factor drawn from `scale_range`, padding it
    bottom/right to `size` (image `pad_value`, a value or an RGB colour in 0..255; mask
    `ignore_label`) and cutting a random window, but only
    the part of the image under the window is resized, so the cost follows the crop, not the
    image. The window's source rows and columns are rounded outwards to whole pixels, which
    changes the drawn scale by under one source pixel across the window; image (bilinear) and
    mask (nearest) are resized from the same source window, so they stay aligned. At scale 1 the
    crop is an exact copy. A `JpegWindows` image decodes only that source window.

    The mirror is taken on the uint8 source window before the resize (bilinear resizing commutes
    with it) and by gathering the mask's columns in reverse: TensorFlow reverses a uint8 RGB
    image along its width with a dedicated kernel, a float32 one ~2x slower per pixel, and the
    window is no larger than the crop for scales >= 1. The padding then lies on the left.

    Returns:
        float32 image [size, size, 3] in 0..255 and a mask of the input dtype.
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    scale_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    lazy = isinstance(image, JpegWindows)  # decodes only the window below
    hw = image.size if lazy else tf.shape(image)[:2]
    scale = tf.random.stateless_uniform([], scale_seed, low, high)
    scaled = (
        hw
        if low == high == 1.0
        else tf.maximum(tf.cast(tf.round(tf.cast(hw, tf.float32) * scale), tf.int32), 1)
    )
    canvas = tf.maximum(scaled, size)
    top = tf.random.stateless_uniform([], top_seed, 0, canvas[0] - size[0] + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, canvas[1] - size[1] + 1, dtype=tf.int32)
    # The window's part that lies on the scaled image; the rest is padding.
    height = tf.minimum(size[0], scaled[0] - top)
    width = tf.minimum(size[1], scaled[1] - left)
    row0, row1 = _source_span(hw[0], scaled[0], top, height)
    col0, col1 = _source_span(hw[1], scaled[1], left, width)
    window = image.window(row0, row1, col0, col1) if lazy else image[row0:row1, col0:col1]
    mirrored = tf.constant(False) if mirror is None else mirror
    if mirror is not None:
        window = tf.cond(mirror, lambda: tf.reverse(window, [1]), lambda: window)
    # Cast first: TensorFlow's bilinear kernel is ~1.5x slower on uint8 than on float32 input,
    # more than the cast costs; the result is the same.
    image = tf.image.resize(tf.cast(window, tf.float32), tf.stack([height, width]), "bilinear")
    mask = _nearest_window(mask, row0, row1, height, col0, col1, width, mirrored)
    width_padding = size[1] - width
    padding = [
        [0, size[0] - height],
        tf.where(mirrored, tf.stack([width_padding, 0]), tf.stack([0, width_padding])),
    ]
    colour = pad_colour(pad_value)
    # Most crops lie wholly on the scaled image: skip the pads' copies for them.
    return tf.cond(
        tf.logical_and(tf.equal(height, size[0]), tf.equal(width, size[1])),
        lambda: (image, mask),
        lambda: (
            pad_image(image, padding, colour),
            tf.pad(mask, padding, constant_values=ignore_label),
        ),
    )


def flip_table(flip_pairs: Sequence[Sequence[int]] | None) -> np.ndarray | None:
    """The 256-entry label map of a horizontal flip: each (left, right) pair swapped.

    The pairs are taken as valid: the config check (`data.flip_pairs` in
    `seg_train.config_checks`) refuses pairs that are not two distinct labels 0..254 or that
    repeat a label, before any data is read.

    Returns:
        uint8 [256], or None when there is nothing to swap.
    """
    if not flip_pairs:
        return None
    table = np.arange(256, dtype=np.uint8)
    for left, right in flip_pairs:
        table[left], table[right] = right, left
    return table


def random_hflip(
    image: tf.Tensor,
    mask: tf.Tensor,
    seed: tf.Tensor,
    flip_pairs: Sequence[Sequence[int]] | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirrors image and mask together with probability 0.5.

    A mirrored person's left arm is on the right: with `flip_pairs` (e.g. CIHP's
    [[14, 15], ...]) the mirrored mask also swaps the ids of each pair.
    """
    return tf.cond(
        flip_draw(seed),
        lambda: (tf.reverse(image, [1]), swap_sides(tf.reverse(mask, [1]), flip_pairs)),
        lambda: (image, mask),
    )


def flip_draw(seed: tf.Tensor) -> tf.Tensor:
    """The horizontal flip's coin (a bool tensor): true with probability 0.5."""
    return tf.random.stateless_uniform([], seed) < 0.5


def swap_sides(mask: tf.Tensor, flip_pairs: Sequence[Sequence[int]] | None) -> tf.Tensor:
    """A mirrored mask with the ids of each (left, right) pair swapped (see `flip_table`)."""
    table = flip_table(flip_pairs)
    if table is None:
        return mask
    return tf.gather(tf.constant(table), tf.cast(mask, tf.int32))


def color_jitter(
    image: tf.Tensor, seed: tf.Tensor, jitter: Mapping[str, float] | None
) -> tf.Tensor:
    """Random brightness / contrast / saturation / hue on a float32 0..255 image.

    Args:
        image: float32 [H, W, 3] in 0..255.
        seed: Stateless seed [2].
        jitter: Strengths, each 0 = off: `brightness` (max shift as a fraction of 255),
            `contrast` and `saturation` (max relative change), `hue` (max shift as a fraction
            of the colour wheel, at most 0.5).
    """
    jitter = jitter or {}
    brightness, contrast = float(jitter.get("brightness", 0)), float(jitter.get("contrast", 0))
    saturation, hue = float(jitter.get("saturation", 0)), float(jitter.get("hue", 0))
    if not (brightness or contrast or saturation or hue):
        return image
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    image = image / 255.0
    if brightness:
        image = tf.image.stateless_random_brightness(image, brightness, seeds[0])
    if contrast:
        image = tf.image.stateless_random_contrast(image, 1 - contrast, 1 + contrast, seeds[1])
    if saturation:
        image = tf.image.stateless_random_saturation(
            image, 1 - saturation, 1 + saturation, seeds[2]
        )
    if hue:
        image = tf.image.stateless_random_hue(image, hue, seeds[3])
    return tf.clip_by_value(image, 0.0, 1.0) * 255.0


def augment(
    image: tf.Tensor | JpegWindows, mask: tf.Tensor, seed: tf.Tensor, options: PipelineOptions
) -> tuple[tf.Tensor, tf.Tensor]:
    """The training transform to `options.crop_size` (flip included), then colour jitter.

    The image may be a `JpegWindows` (not decoded yet) under `transform="crop"` only.

    `transform="crop"` (default): random scale, pad (`pad_value`), random crop.
    `transform="resize"`: the whole image resized to the crop size (image bilinear, mask
    nearest), so every sample shows the whole scene, as the TF / keras-io tutorials train.
    """
    crop = options.crop
    crop_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    # The flip rides in the resize or the crop (see each one's docstring): random_hflip's coin.
    mirror = flip_draw(flip_seed) if options.hflip else None
    if options.transform == "resize":
        image, mask = resize_pair(image, mask, crop, mirror)
    else:
        image, mask = random_scaled_crop(
            image,
            mask,
            options.scale_range,
            crop,
            options.ignore_label,
            crop_seed,
            options.pad_value,
            mirror,
        )
    if mirror is not None and options.flip_pairs:
        mask = tf.cond(mirror, lambda: swap_sides(mask, options.flip_pairs), lambda: mask)
    image = color_jitter(image, jitter_seed, options.jitter)
    image = tf.ensure_shape(image, [crop[0], crop[1], 3])
    mask = tf.ensure_shape(mask, [crop[0], crop[1]])
    return image, mask
