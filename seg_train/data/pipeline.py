"""The one shared parser: decoded (uint8 image, uint8 mask) pairs -> batched training tensors.

Every dataset goes through the same steps: parallel decode (in the graph for plain JPEGs and
PNG masks, see `decode.py`; `data.on_error` decides what a broken file does), a cache of the
decoded examples when they fit in memory (`cache`, see `should_cache`), shuffle, the training
transform of `augment.py` (or `matting.py` for alpha targets), batching and prefetch. A
training pass that is not cached fuses decode and transform in one map that decodes only the
part of each JPEG its random crop keeps (`decode.decode_and_crop_op`): the same samples. Images
leave as float32 in 0..255; each model normalises them in its own first layer, so train, eval,
infer and export cannot disagree about preprocessing. Evaluation reads `decoded_dataset`
directly: no augmentation, and labels at their original resolution. A matting source
(`data.task=matting`) gets float alpha targets instead, resized bilinearly.

The settings come as one `PipelineOptions` (`options.py`), never as the config.

Random choices use stateless ops seeded per element from (seed, position in the stream), so a
run is reproducible under parallel `map`, differs from epoch to epoch, and a resumed run continues
the same order (`train_dataset(start_batch=...)`).
"""

from __future__ import annotations

import logging
import os
import weakref

import numpy as np
import tensorflow as tf

from seg_train.data import matting
from seg_train.data.augment import augment, resize_pair
from seg_train.data.base import Source
from seg_train.data.decode import decode_and_crop_op, decode_op
from seg_train.data.options import PipelineOptions
from seg_train.data.readers import DataError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
# data.cache=auto keeps a split in memory if its decoded examples take less than this.
AUTO_CACHE_MAX_BYTES = 4 * 2**30
# data.cache=auto's estimate per source and split: each estimate decodes a few examples, and a
# training run asks twice for the val split (fit's batches and original-resolution validation).
_ESTIMATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoded_dataset(
    source: Source,
    split: str,
    num_parallel_calls: int | None = None,
    shuffle_buffer: int | None = None,
    seed: int | None = None,
    records: tf.data.Dataset | None = None,
    max_images: int | None = None,
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
        max_images: Only the first this many records (`eval.max_images`); None = all.
    """
    source.check_listing(split)
    records = source.records(split) if records is None else records
    if max_images:
        records = records.take(max_images)  # before decoding: the rest is never read
    if shuffle_buffer:
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    decoded = records.map(decode_op(source), num_parallel_calls=num_parallel_calls or AUTOTUNE)
    if source.on_error == "skip":
        # A file corrupt inside makes TensorFlow's decoder fail: drop it too (tf.data logs it).
        decoded = decoded.ignore_errors(log_warning=True)
        decoded = decoded.filter(lambda image, mask, ok: ok)
    return decoded.map(lambda image, mask, ok: (image, mask))


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
    """Resolves `data.cache` (true, false or auto) for one split, logging what auto chose
    (once per source and split: the estimate is kept).

    auto caches a split whose decoded examples are estimated to take under
    `AUTO_CACHE_MAX_BYTES` and under a quarter of the machine's memory.
    """
    if setting != "auto":
        return bool(setting)
    estimates = _ESTIMATES.setdefault(source, {})
    first_time = split not in estimates
    if first_time:
        estimates[split] = estimated_decoded_bytes(source, split)
    estimate = estimates[split]
    budget = min(AUTO_CACHE_MAX_BYTES, _total_memory_bytes() // 4)
    cache = estimate is not None and estimate <= budget
    if estimate is not None and first_time:
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
    source: Source,
    options: PipelineOptions,
    seed: int,
    repeat: bool = False,
    start_batch: int = 0,
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
        options: The pipeline settings (batch and crop size, transform, cache, ...).
        seed: The run's seed.
        repeat: Endless passes (training); otherwise the one pass holding `start_batch`.
        start_batch: Batches already consumed (epoch * steps_per_epoch + step of a resume).
    """
    parallel = options.num_parallel_calls or AUTOTUNE
    first = start_batch * options.batch_size
    first_pass, offset = divmod(first, _split_size(source, "train"))
    passes = tf.data.Dataset.range(first_pass, _ENDLESS if repeat else first_pass + 1)

    def shuffled_pass(dataset: tf.data.Dataset, k: tf.Tensor) -> tf.data.Dataset:
        """Pass k over `dataset`, shuffled with a seed made from (seed, k) only."""
        # tf.data compares (global seed, op seed) with (0, 0) in Python; with a tensor op seed
        # and a global seed of 0 (`seed=0` in the config) that comparison fails while tracing.
        # This pass's op seed alone fixes its order, so the traced graph drops the global one.
        tf.compat.v1.get_default_graph().seed = None
        pass_seed = tf.constant(seed, tf.int64) * 1_000_003 + k
        return dataset.shuffle(options.shuffle_buffer, seed=pass_seed)

    if should_cache(source, "train", options.cache):
        # Shuffle after the cache (shared by all passes), or every pass would replay the first.
        cached = decoded_dataset(source, "train", parallel).cache()
        examples = passes.flat_map(lambda k: shuffled_pass(cached, k)).skip(offset)
    else:
        # Shuffle the records (names and paths), cheaply, before decoding.
        records = source.records("train")
        ordered = passes.flat_map(lambda k: shuffled_pass(records, k)).skip(offset)
        fused = _decode_and_crop(source, options)
        if fused is not None:
            # One map decodes only what each random crop keeps and transforms it: the same
            # samples as decoding first (decode.JpegWindows), at a fraction of the decode.
            source.check_listing("train")
            samples = ordered.enumerate(first).map(
                lambda i, record: fused(*record, _seed(seed, i)), num_parallel_calls=parallel
            )
            return samples.batch(options.batch_size, drop_remainder=True).prefetch(AUTOTUNE)
        examples = decoded_dataset(source, "train", parallel, records=ordered)
    transform = matting.augment if matting.is_matting(source) else augment
    batches = examples.enumerate(first).map(
        lambda i, pair: transform(*pair, _seed(seed, i), options), num_parallel_calls=parallel
    )
    return batches.batch(options.batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def _seed(seed: int, index: tf.Tensor) -> tf.Tensor:
    """The stateless seed (seed, i) of example i of the stream (built inside the example's own
    map: a separate dataset of seeds zipped in costs a map stage per example)."""
    return tf.stack([tf.constant(seed, tf.int64), index])


def _decode_and_crop(source: Source, options: PipelineOptions):
    """`decode.decode_and_crop_op` for a segmentation source under `transform=crop`; None
    where decoding first is needed (matting, `transform=resize`, sources it cannot serve)."""
    if matting.is_matting(source) or options.transform != "crop":
        return None
    return decode_and_crop_op(source, lambda image, mask, s: augment(image, mask, s, options))


# The end of an endless `Dataset.range`.
_ENDLESS = 2**62


def _split_size(source: Source, split: str) -> int:
    """Records in a split (counted when the source cannot say, e.g. a filtered TFDS split)."""
    size = source.num_examples(split)
    if size <= 0:
        size = int(source.records(split).reduce(0, lambda count, _: count + 1))
    return max(size, 1)


def val_dataset(
    source: Source, options: PipelineOptions, split: str = "val", max_images: int | None = None
) -> tf.data.Dataset:
    """Validation data for `fit` (`trainer.val_protocol=resized`): resized to
    `options.crop_size`, batched, in split order; the first `max_images` only where set.

    Labels are resized nearest-neighbour. The final report, and in-training validation under
    `trainer.val_protocol=original`, use `decoded_dataset` at original size instead.
    """
    parallel = options.num_parallel_calls or AUTOTUNE
    examples = decoded_dataset(source, split, parallel, max_images=max_images)
    if should_cache(source, split, options.cache):
        examples = examples.cache()
    crop = options.crop
    resize = matting.resize if matting.is_matting(source) else resize_pair
    resized = examples.map(
        lambda image, mask: resize(image, mask, crop), num_parallel_calls=parallel
    )
    return resized.batch(options.batch_size).prefetch(AUTOTUNE)
