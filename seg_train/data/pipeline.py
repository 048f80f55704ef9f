"""The one shared parser: decoded (uint8 image, uint8 mask) pairs -> batched training tensors.

Every dataset goes through the same steps: parallel decode (in the graph for plain JPEGs and
PNG masks, see `graph_decode.py`; `data.on_error` decides what a broken file does), a cache of
the decoded examples when they fit in memory (`data.cache`), shuffle, the training transform
(`data.transform`): `crop` = joint random scale / crop (padding images with `data.pad_value` and
labels with the ignore value; only the cropped part is resized), or `resize` = the whole image
resized to `data.crop_size`; then horizontal flip (swapping left/right class ids where the
dataset has them), optional photometric jitter, batching and prefetch. Labels are only ever
resized nearest-neighbour, so augmentation never invents a class. Images leave as float32 in
0..255; each model normalises them in its own first layer, so train, eval, infer and export
cannot disagree about preprocessing. Evaluation reads `decoded_dataset` directly: no
augmentation, and labels at their original resolution. A matting source (`data.task=matting`)
gets float alpha targets instead, resized bilinearly (seg_train/data/matting.py).

Random choices use stateless ops seeded per element from (seed, position in the stream), so a
run is reproducible under parallel `map`, differs from epoch to epoch, and a resumed run continues
the same order (`train_dataset(start_batch=...)`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from seg_train.data import graph_decode
from seg_train.data.base import DataError, Source
from seg_train.errors import UserError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
# data.cache=auto keeps a split in memory if its decoded examples take less than this.
AUTO_CACHE_MAX_BYTES = 4 * 2**30
# A `DataError` raised inside the decode op reaches Python as a TensorFlow error whose message
# holds "DataError: <file>: <problem>" followed by the Python traceback.
_DATA_ERROR = re.compile(r"DataError: ([^\n]+)")
# What TensorFlow's own decoders say about a file that passed the in-graph checks (intact start
# and end markers) but is corrupt inside; the op cannot say which file it was.
_GRAPH_DECODE_ERROR = re.compile(r"jpeg::Uncompress failed|Invalid PNG data|Decode(Jpeg|Png)")


class _SkipCounter:
    """Counts the broken files dropped under `data.on_error=skip` (decodes run on threads).

    Each file is logged once, however many epochs meet it again.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.files: set[str] = set()

    @property
    def count(self) -> int:
        return len(self.files)

    def add(self, error: DataError) -> None:
        with self._lock:
            if error.file in self.files:
                return
            self.files.add(error.file)
            count = len(self.files)
        log.warning(
            "data.on_error=skip: skipped %s (%d broken file%s skipped so far)",
            error,
            count,
            "" if count == 1 else "s",
        )


SKIPPED = _SkipCounter()


def _python_decode_op(source: Source):
    """(name, image, mask) record -> (image, mask, ok) through `source.load` (Pillow).

    The reference decode: every format, and the `DataError` naming a broken file.
    """

    def load(name: bytes, image: bytes, mask: bytes):
        try:
            pair = source.decode(name.decode(), image, mask)  # with data.label_map
            problems = source.problems(pair)
            if problems:
                raise problems[0]
            return pair.image, pair.mask, True
        except DataError as error:
            if source.on_error != "skip":
                raise
            SKIPPED.add(error)
            return np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8), False

    def decode(name, image, mask):
        image, mask, ok = tf.numpy_function(
            load, [name, image, mask], [tf.uint8, tf.uint8, tf.bool], stateful=False
        )
        image.set_shape([None, None, 3])
        mask.set_shape([None, None])
        ok.set_shape([])
        return image, mask, ok

    return decode


def _decode_op(source: Source):
    """The map function: (name, image, mask) record -> (image, mask, ok).

    Plain JPEGs with grey or palette PNG masks decode in the graph (`graph_decode.py`); any
    other file, and any pair the graph's checks doubt (sizes differ, a raw value the label
    table does not accept), goes through `_python_decode_op`, which decodes it the same way or
    names what is wrong.
    """
    python_decode = _python_decode_op(source)
    lookup = source.label_lookup()
    if lookup is None:
        return python_decode
    table = graph_decode.LabelTable(lookup)

    def decode(name, image, mask):
        image_bytes = tf.io.read_file(image) if source.records_are_paths else image
        mask_bytes = tf.io.read_file(mask) if source.records_are_paths else mask
        mask_readable, mask_png = graph_decode.mask_png_plan(mask_bytes)

        def in_python():
            return python_decode(name, image, mask)

        def in_graph():
            pixels = graph_decode.decode_image_jpeg(image_bytes)
            raw = graph_decode.decode_mask_png(mask_png)
            same_size = tf.reduce_all(tf.equal(tf.shape(raw), tf.shape(pixels)[:2]))
            return tf.cond(
                tf.logical_and(same_size, table.accepts(raw)),
                lambda: (pixels, table.labels(raw), tf.constant(True)),
                in_python,
            )

        return tf.cond(
            tf.logical_and(graph_decode.is_plain_jpeg(image_bytes), mask_readable),
            in_graph,
            in_python,
        )

    return decode


def decoded_dataset(
    source: Source,
    split: str,
    num_parallel_calls: int | None = None,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
    records: tf.data.Dataset | None = None,
) -> tf.data.Dataset:
    """Decodes a split: (uint8 image [H, W, 3], uint8 mask [H, W]) per element.

    The cardinality is known (the split's size) unless the source skips broken examples
    (`data.on_error=skip`), which makes it unknown.

    Args:
        source: The dataset's decoder.
        split: Split name, e.g. "train".
        num_parallel_calls: Parallel decodes; None = AUTOTUNE.
        shuffle_buffer: If set, records are shuffled (cheaply, before decoding) with this
            buffer, anew each epoch; otherwise elements come in the split's order.
        seed: Shuffle seed.
        records: The split's records in the order to decode them (e.g. already shuffled and
            repeated); None = `source.records(split)`.
    """
    source.check_listing(split)
    records = source.records(split) if records is None else records
    if shuffle_buffer:
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    decoded = records.map(_decode_op(source), num_parallel_calls=num_parallel_calls or AUTOTUNE)
    if source.on_error == "skip":
        # A file corrupt inside makes TensorFlow's decoder fail: drop it too (tf.data logs it).
        decoded = decoded.ignore_errors(log_warning=True)
        decoded = decoded.filter(lambda image, mask, ok: ok)
    return decoded.map(lambda image, mask, ok: (image, mask))


@contextlib.contextmanager
def data_errors_as_user_errors() -> Iterator[None]:
    """Turns a broken example met while iterating a dataset into a one-line `UserError`.

    Wrap the code that pulls data (`model.fit`, evaluation loops): a `DataError` raised in the
    decode op arrives there as a TensorFlow error carrying a traceback.
    """
    try:
        yield
    except tf.errors.OpError as exc:
        match = _DATA_ERROR.search(exc.message or "")
        if match is not None:
            _release_frames(exc)
            raise UserError(
                f"{match.group(1)}; fix or remove the file (seg-train mode=check "
                "lists every broken file), or set data.on_error=skip"
            ) from None
        if _GRAPH_DECODE_ERROR.search(exc.message or ""):
            first = (exc.message or "").strip().splitlines()[0]
            _release_frames(exc)
            raise UserError(
                f"an image or mask is corrupt inside ({first}); seg-train mode=check "
                "with the same data options names it: fix or remove it, or set "
                "data.on_error=skip"
            ) from None
        raise


def _release_frames(error: BaseException) -> None:
    """Frees what the finished frames of an error's traceback hold, then collects garbage.

    Those frames hold the input iterator Keras was running. Kept alive (as the new error's
    context) until the interpreter exits, its decode threads deadlock the exit; released now,
    they stop cleanly. Keras filters its own frames out of tracebacks, so they are reached
    through `f_back` of the frames that remain.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None:
                try:
                    frame.clear()
                except RuntimeError:  # still executing: it and its callers stay intact
                    break
                frame = frame.f_back
            tb = tb.tb_next
        error.__traceback__ = None
        error = error.__context__ or error.__cause__
    gc.collect()


def resize_pair(
    image: tf.Tensor, mask: tf.Tensor, size: tf.Tensor | Sequence[int]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes an image bilinearly (to float32) and its mask nearest-neighbour (keeping dtype)."""
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
    mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
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


def _nearest_rows(first: tf.Tensor, end: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """The rows tf.image.resize(method="nearest") samples when it resizes rows [first, end) to
    `count` rows: floor((i + 0.5) * scale), half-pixel centres. Two gathers with these indices
    give its exact result at a fraction of its cost on a uint8 mask."""
    scale = tf.cast(end - first, tf.float32) / tf.cast(count, tf.float32)
    offsets = tf.cast(tf.floor((tf.cast(tf.range(count), tf.float32) + 0.5) * scale), tf.int32)
    return first + tf.minimum(offsets, end - first - 1)


def pad_colour(pad_value: float | Sequence[float] | None) -> list[float]:
    """`data.pad_value` (0 or [r, g, b] in 0..255) as one float per channel."""
    if pad_value is None:
        return [0.0, 0.0, 0.0]
    if isinstance(pad_value, (int, float)):
        return [float(pad_value)] * 3
    return [float(v) for v in pad_value]


def pad_image(image: tf.Tensor, padding: Sequence[Sequence], colour: Sequence[float]) -> tf.Tensor:
    """Pads a float [..., H, W, 3] image with a constant RGB colour (`padding` covers H, W).

    Each channel is padded with its own constant, so the image's own pixels stay bit-exact.
    """
    lead = [[0, 0]] * (len(image.shape) - 3)
    if not any(colour):
        return tf.pad(image, lead + list(padding) + [[0, 0]])
    channels = [
        tf.pad(image[..., k], lead + list(padding), constant_values=float(c))
        for k, c in enumerate(colour)
    ]
    return tf.stack(channels, axis=-1)


def random_scaled_crop(
    image: tf.Tensor,
    mask: tf.Tensor,
    scale_range: Sequence[float],
    size: Sequence[int],
    ignore_label: int,
    seed: tf.Tensor,
    pad_value: float | Sequence[float] = 0,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Random scale, then a random `size` crop (padded where the scaled image is smaller).

    Equivalent to rescaling the whole pair by a factor drawn from `scale_range`, padding it
    bottom/right to `size` (image `pad_value`, a value or an RGB colour in 0..255; mask
    `ignore_label`) and cutting a random window, but only
    the part of the image under the window is resized, so the cost follows the crop, not the
    image. The window's source rows and columns are rounded outwards to whole pixels, which
    changes the drawn scale by under one source pixel across the window; image (bilinear) and
    mask (nearest) are resized from the same source window, so they stay aligned. At scale 1 the
    crop is an exact copy.

    Returns:
        float32 image [size, size, 3] in 0..255 and a mask of the input dtype.
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    scale_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    hw = tf.shape(image)[:2]
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
    image = tf.image.resize(
        tf.cast(image[row0:row1, col0:col1], tf.float32),
        tf.stack([height, width]),
        method="bilinear",
    )
    mask = tf.gather(
        tf.gather(mask, _nearest_rows(row0, row1, height)), _nearest_rows(col0, col1, width), axis=1
    )
    padding = [[0, size[0] - height], [0, size[1] - width]]
    image = pad_image(image, padding, pad_colour(pad_value))
    mask = tf.pad(mask, padding, constant_values=ignore_label)
    return image, mask


def flip_table(flip_pairs: Sequence[Sequence[int]] | None) -> np.ndarray | None:
    """The 256-entry label map of a horizontal flip: each (left, right) pair swapped.

    Returns None when there is nothing to swap.

    Raises:
        UserError: if a pair is not two distinct labels 0..254 or a label is in two pairs.
    """
    if not flip_pairs:
        return None
    table = np.arange(256, dtype=np.uint8)
    seen: set[int] = set()
    for pair in flip_pairs:
        values = [int(v) for v in pair]
        if (
            len(values) != 2
            or values[0] == values[1]
            or seen & set(values)
            or not all(0 <= v < 255 for v in values)
        ):
            raise UserError(
                f"data.flip_pairs must be distinct [left, right] label pairs in "
                f"0..254, each label once; got {[list(p) for p in flip_pairs]}"
            )
        seen |= set(values)
        table[values[0]], table[values[1]] = values[1], values[0]
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
    table = flip_table(flip_pairs)
    flip = tf.random.stateless_uniform([], seed) < 0.5

    def mirrored():
        flipped = tf.reverse(mask, [1])
        if table is not None:
            flipped = tf.gather(tf.constant(table), tf.cast(flipped, tf.int32))
        return tf.reverse(image, [1]), flipped

    return tf.cond(flip, mirrored, lambda: (image, mask))


def color_jitter(image: tf.Tensor, seed: tf.Tensor, jitter: DictConfig | dict | None) -> tf.Tensor:
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


# data.transform: how a training example becomes a data.crop_size sample.
TRANSFORMS = ("crop", "resize")


def augment(
    image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, data: DictConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    """The training transform to `data.crop_size`, then flip and jitter.

    `data.transform=crop` (default): random scale, pad (`data.pad_value`), random crop.
    `data.transform=resize`: the whole image resized to the crop size (image bilinear, mask
    nearest), so every sample shows the whole scene, as the TF / keras-io tutorials train.
    """
    crop = list(data.crop_size)
    transform = data.get("transform", "crop")
    if transform not in TRANSFORMS:
        raise UserError(
            f"config key data.transform must be one of {', '.join(TRANSFORMS)}, "
            f"got {transform!r}; e.g. data.transform=crop"
        )
    crop_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if transform == "resize":
        image, mask = resize_pair(image, mask, crop)
    else:
        image, mask = random_scaled_crop(
            image,
            mask,
            data.scale_range,
            crop,
            data.ignore_label,
            crop_seed,
            data.get("pad_value", 0),
        )
    if data.hflip:
        image, mask = random_hflip(image, mask, flip_seed, data.get("flip_pairs"))
    image = color_jitter(image, jitter_seed, data.get("jitter"))
    image = tf.ensure_shape(image, [crop[0], crop[1], 3])
    mask = tf.ensure_shape(mask, [crop[0], crop[1]])
    return image, mask


def estimated_decoded_bytes(source: Source, split: str, sample: int = 8) -> int | None:
    """The memory a split takes decoded, from the first `sample` examples (None if unreadable)."""
    sizes = []
    for name, image, mask in source.records(split).take(sample).as_numpy_iterator():
        try:
            pair = source.load(name.decode(), image, mask)
        except DataError:
            continue
        sizes.append(pair.image.nbytes + pair.mask.nbytes)
    if not sizes:
        return None
    return int(np.mean(sizes) * source.num_examples(split))


def should_cache(source: Source, split: str, setting: bool | str) -> bool:
    """Resolves `data.cache` (true, false or auto) for one split, logging what auto chose.

    auto caches a split whose decoded examples are estimated to take under
    `AUTO_CACHE_MAX_BYTES` and under a quarter of the machine's memory.
    """
    if setting != "auto":
        return bool(setting)
    estimate = estimated_decoded_bytes(source, split)
    budget = min(AUTO_CACHE_MAX_BYTES, _total_memory_bytes() // 4)
    cache = estimate is not None and estimate <= budget
    if estimate is not None:
        log.info(
            "data.cache=auto: split '%s' is ~%.2f GB decoded; %s (budget %.1f GB)",
            split,
            estimate / 2**30,
            "caching it in memory after the first epoch" if cache else "decoding it every epoch",
            budget / 2**30,
        )
    return cache


def _total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def train_dataset(
    source: Source, data: DictConfig, seed: int, repeat: bool = False, start_batch: int = 0
) -> tf.data.Dataset:
    """Shuffled, augmented, batched training data: (float32 [B, H, W, 3], uint8 [B, H, W]).

    The stream is a function of `seed` and the position in it only: pass k over the split is
    shuffled with a seed made from (seed, k), and example i of the stream is augmented with the
    stateless seed (seed, i). So a resumed run that starts at `start_batch` sees exactly the
    batches an uninterrupted run sees from there on; the skipped part of the resumed pass is
    skipped as records, before decoding (or as cached examples), never as decoded batches.
    Under `data.on_error=skip` the positions count records, broken ones included.

    Args:
        source: The dataset.
        data: The data config.
        seed: The run's seed.
        repeat: Endless passes (training); otherwise the one pass holding `start_batch`.
        start_batch: Batches already consumed (epoch * steps_per_epoch + step of a resume).
    """
    parallel = data.num_parallel_calls or AUTOTUNE
    first = start_batch * data.batch_size
    first_pass, offset = divmod(first, _split_size(source, "train"))
    passes = tf.data.Dataset.range(first_pass, _ENDLESS if repeat else first_pass + 1)

    def shuffled_pass(dataset: tf.data.Dataset, k: tf.Tensor) -> tf.data.Dataset:
        """Pass k over `dataset`, shuffled with a seed made from (seed, k) only."""
        # tf.data compares (global seed, op seed) with (0, 0) in Python; with a tensor op seed
        # and a global seed of 0 (`seed=0` in the config) that comparison fails while tracing.
        # This pass's op seed alone fixes its order, so the traced graph drops the global one.
        tf.compat.v1.get_default_graph().seed = None
        pass_seed = tf.constant(seed, tf.int64) * 1_000_003 + k
        return dataset.shuffle(data.shuffle_buffer, seed=pass_seed)

    if should_cache(source, "train", data.cache):
        # Shuffle after the cache (shared by all passes), or every pass would replay the first.
        cached = decoded_dataset(source, "train", parallel).cache()
        examples = passes.flat_map(lambda k: shuffled_pass(cached, k)).skip(offset)
    else:
        # Shuffle the records (names and paths), cheaply, before decoding.
        records = source.records("train")
        ordered = passes.flat_map(lambda k: shuffled_pass(records, k)).skip(offset)
        examples = decoded_dataset(source, "train", parallel, records=ordered)
    seeds = tf.data.Dataset.range(first, _ENDLESS).map(
        lambda i: tf.stack([tf.constant(seed, tf.int64), i])
    )
    pairs = tf.data.Dataset.zip((examples, seeds))
    transform = _matting().augment if _matting().is_matting(source) else augment
    batches = pairs.map(lambda pair, s: transform(*pair, s, data), num_parallel_calls=parallel)
    return batches.batch(data.batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def _matting():
    """seg_train.data.matting (alpha targets), imported late: it builds on this module."""
    from seg_train.data import matting as matting_data

    return matting_data


# The end of an endless `Dataset.range`.
_ENDLESS = 2**62


def _split_size(source: Source, split: str) -> int:
    """Records in a split (counted when the source cannot say, e.g. a filtered TFDS split)."""
    size = source.num_examples(split)
    if size <= 0:
        size = int(source.records(split).reduce(0, lambda count, _: count + 1))
    return max(size, 1)


def val_dataset(source: Source, data: DictConfig, split: str = "val") -> tf.data.Dataset:
    """Validation data for `fit` (`trainer.val_protocol=resized`): resized to `data.crop_size`,
    batched, in split order.

    Labels are resized nearest-neighbour. The final report, and in-training validation under
    `trainer.val_protocol=original`, use `decoded_dataset` at original size instead.
    """
    parallel = data.num_parallel_calls or AUTOTUNE
    examples = decoded_dataset(source, split, parallel)
    if should_cache(source, split, data.cache):
        examples = examples.cache()
    crop = list(data.crop_size)
    resize = _matting().resize if _matting().is_matting(source) else resize_pair
    resized = examples.map(
        lambda image, mask: resize(image, mask, crop), num_parallel_calls=parallel
    )
    return resized.batch(data.batch_size).prefetch(AUTOTUNE)
