"""Decoding records into (image, mask) pairs, in the graph where it can and else by Pillow.

The Pillow decode (`Source.load`, `readers.py`) is the reference: it reads every format, names
a broken file and decides what `data.on_error` does. It runs through `tf.numpy_function`,
though, which costs a Python call, two copies and the GIL per example. So `decode_op` decodes
the two kinds that make up almost every segmentation dataset with TensorFlow's own C++ decoders
instead:

* images that are complete baseline/progressive JPEGs (start-of-image marker first, end-of-image
  marker last; a truncated file lacks the latter), via `tf.io.decode_jpeg`;
* masks that are 8-bit grey or palette PNGs. TensorFlow has no way to read a palette PNG
  as its indices (it expands the palette to colours), so the palette chunk is swapped for a
  grey ramp (entry i = (i, i, i)) before `tf.io.decode_png(channels=1)`: the grey value it
  returns is then the palette index. The ramp chunk's CRC is computed once here.

Everything else (PNG images, truncated JPEGs or PNGs, 16-bit or colour masks) and every example
whose decoded pair fails the checks (sizes differ, a label out of range) goes to the Pillow path,
which gives the same result, or the same error naming the file. A file with intact start and end
markers but corrupt data inside fails in TensorFlow's decoder, which cannot name it:
`data_errors_as_user_errors` turns that into a one-line error pointing at `seg-train
mode=check`, and the pipeline skips it under `data.on_error=skip` (`SKIPPED` counts the files
skipped by the Pillow path).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import threading
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from seg_train.data.base import Source
from seg_train.data.readers import DataError
from seg_train.errors import UserError

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The IEND chunk every complete PNG ends with (length 0, type, CRC); a truncated file lacks it.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
# IHDR is the first chunk: its data starts at byte 16; bit depth at 24, colour type at 25.
_BIT_DEPTH_AT, _COLOUR_TYPE_AT, _FIRST_CHUNK_AFTER_IHDR = 24, 25, 33
_GREY, _PALETTE = 0, 3
# Palette PNGs written by common tools put PLTE within the first few chunks after IHDR;
# a file that does not is decoded by Pillow.
_MAX_CHUNKS_BEFORE_PLTE = 16
# A JPEG's EXIF: an APP1 segment holding "Exif\0\0" then a TIFF header and IFD0, whose entries
# (12 bytes: tag, type, count, value) may hold the orientation tag. Camera files put APP1 first
# or after JFIF's APP0; IFD0 rarely holds more than a dozen entries.
EXIF_HEADER = b"Exif\x00\x00"
EXIF_ORIENTATION_TAG = 0x0112
_MAX_SEGMENTS_BEFORE_EXIF = 16
_MAX_IFD_ENTRIES = 64


def _ramp_palette_chunk() -> bytes:
    data = b"PLTE" + bytes(np.repeat(np.arange(256, dtype=np.uint8), 3))
    return (768).to_bytes(4, "big") + data + zlib.crc32(data).to_bytes(4, "big")


RAMP_PLTE_CHUNK = _ramp_palette_chunk()
# IHDR's colour type byte and CRC (file offsets); CRC-32 is linear, so setting the colour type
# from 3 (palette) to 0 (grey) changes any IHDR's CRC by this constant XOR.
_COLOUR_TYPE_BYTE, _IHDR_CRC_AT = 25, 29
_PALETTE_TO_GREY_CRC = (
    zlib.crc32(b"IHDR" + bytes(9) + b"\x03" + bytes(3)) ^ zlib.crc32(b"IHDR" + bytes(13))
).to_bytes(4, "big")


def _tail(contents: tf.Tensor, size: int) -> tf.Tensor:
    """The last `size` bytes (all of a shorter string), without the error a negative pos has."""
    return tf.strings.substr(contents, tf.maximum(tf.strings.length(contents) - size, 0), size)


def is_plain_jpeg(contents: tf.Tensor) -> tf.Tensor:
    """True for a JPEG that starts with SOI and ends with EOI (truncated files do not) and is
    stored as displayed (no EXIF orientation other than 1, which only Pillow applies)."""
    complete = tf.logical_and(
        tf.equal(tf.strings.substr(contents, 0, 3), JPEG_START),
        tf.equal(_tail(contents, 2), JPEG_END),
    )
    return tf.logical_and(complete, tf.equal(jpeg_orientation(contents), 1))


def _bytes_at(contents: tf.Tensor, offset, size: int) -> tf.Tensor:
    """`size` bytes from `offset` as int32 [size], zeros past the end (never an error)."""
    padded = tf.strings.substr(
        tf.strings.join([contents, b"\0" * size]),
        tf.minimum(offset, tf.strings.length(contents)),
        size,
    )
    return tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int32)


def _find_exif(contents: tf.Tensor) -> tf.Tensor:
    """Offset of the JPEG's first APP1 "Exif" segment, or -1 (markers before the scan only)."""
    length = tf.strings.length(contents)

    def keep_looking(step, offset, found):
        marker = _bytes_at(contents, offset, 2)
        # 0xDA starts the scan: no metadata segment comes after it.
        is_segment = tf.logical_and(tf.equal(marker[0], 0xFF), tf.not_equal(marker[1], 0xDA))
        return tf.logical_and(
            tf.logical_and(step < _MAX_SEGMENTS_BEFORE_EXIF, found < 0),
            tf.logical_and(offset + 4 <= length, is_segment),
        )

    def next_segment(step, offset, found):
        header = _bytes_at(contents, offset, 10)
        is_exif = tf.logical_and(
            tf.equal(header[1], 0xE1), tf.reduce_all(tf.equal(header[4:], list(EXIF_HEADER)))
        )
        return (
            step + 1,
            offset + 2 + header[2] * 256 + header[3],
            tf.where(is_exif, offset, found),
        )

    def walk_segments():
        _, _, found = tf.while_loop(
            keep_looking, next_segment, (tf.constant(0), tf.constant(2), tf.constant(-1))
        )
        return found

    # Most files hold no "Exif\0\0" at all: one substring search instead of the walk over
    # their segments, which costs as much as a third of a JPEG decode in small ops.
    # The raw op, told to stop at the first match, is 3 nodes; tf.strings.split builds a ragged
    # result of ~35.
    pieces = tf.raw_ops.StringSplitV2(
        input=tf.reshape(contents, [1]), sep=EXIF_HEADER.decode("latin-1"), maxsplit=1
    )
    has_exif_bytes = pieces.shape[1] > 1
    return tf.cond(has_exif_bytes, walk_segments, lambda: tf.constant(-1))


def jpeg_orientation(contents: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation tag of a JPEG as Pillow reads it: int32, 1 when absent or invalid.

    Reads IFD0 of the first APP1 Exif segment in either byte order; a file whose IFD0 holds
    more entries than are looked at gives 0 (doubtful: not 1, so Pillow decides).
    """
    exif = _find_exif(contents)
    # Most files hold no EXIF: skip the IFD parse's few dozen small ops for them.
    return tf.cond(exif < 0, lambda: tf.constant(1), lambda: _exif_orientation(contents, exif))


def _exif_orientation(contents: tf.Tensor, exif: tf.Tensor) -> tf.Tensor:
    """`jpeg_orientation` of a JPEG whose APP1 Exif segment starts at `exif`."""
    tiff = exif + 10
    order = _bytes_at(contents, tiff, 8)
    little = tf.logical_and(tf.equal(order[0], ord("I")), tf.equal(order[1], ord("I")))

    def number(b):  # unsigned integer of the bytes on the last axis, in the file's byte order
        weights = 256 ** tf.range(tf.shape(b)[-1])
        return tf.reduce_sum(b * tf.where(little, weights, tf.reverse(weights, [0])), axis=-1)

    ifd = tf.maximum(tiff + number(order[4:8]), 0)  # int32 wraps for absurd offsets
    count = number(_bytes_at(contents, ifd, 2))
    entries = tf.reshape(
        _bytes_at(contents, ifd + 2, 12 * _MAX_IFD_ENTRIES), [_MAX_IFD_ENTRIES, 12]
    )
    is_tag = tf.logical_and(
        tf.range(_MAX_IFD_ENTRIES) < count, tf.equal(number(entries[:, :2]), EXIF_ORIENTATION_TAG)
    )
    value = tf.reduce_max(tf.where(is_tag, number(entries[:, 8:10]), 0))
    valid = tf.logical_and(tf.reduce_any(is_tag), tf.logical_and(value >= 1, value <= 8))
    orientation = tf.where(valid, value, 1)
    doubtful = tf.logical_and(count > _MAX_IFD_ENTRIES, tf.logical_not(tf.reduce_any(is_tag)))
    return tf.where(doubtful, 0, orientation)


def _chunk_length(header: tf.Tensor) -> tf.Tensor:
    """A PNG chunk's data length: its first 4 bytes (int32 values), big-endian."""
    return header[0] * 16777216 + header[1] * 65536 + header[2] * 256 + header[3]


def _find_palette(contents: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(offset, data length) of the PLTE chunk, or offset -1 when it is not found early."""
    length = tf.strings.length(contents)

    def keep_looking(step, offset, found, size):
        return tf.logical_and(
            tf.logical_and(step < _MAX_CHUNKS_BEFORE_PLTE, found < 0), offset + 8 <= length
        )

    def next_chunk(step, offset, found, size):
        header = _bytes_at(contents, offset, 8)
        chunk_size = _chunk_length(header)
        is_plte = tf.reduce_all(tf.equal(header[4:], list(b"PLTE")))
        return (
            step + 1,
            offset + 12 + chunk_size,
            tf.where(is_plte, offset, found),
            tf.where(is_plte, chunk_size, size),
        )

    def walk_chunks():
        _, _, found, size = tf.while_loop(
            keep_looking,
            next_chunk,
            (tf.constant(0), tf.constant(_FIRST_CHUNK_AFTER_IHDR), tf.constant(-1), tf.constant(0)),
        )
        return found, size

    # Most palette PNGs put PLTE right after IHDR: read it there without the loop's small ops.
    first = _bytes_at(contents, _FIRST_CHUNK_AFTER_IHDR, 8)
    first_is_plte = tf.reduce_all(tf.equal(first[4:], list(b"PLTE")))
    first_size = _chunk_length(first)
    return tf.cond(
        first_is_plte,
        lambda: (tf.constant(_FIRST_CHUNK_AFTER_IHDR), first_size),
        walk_chunks,
    )


def mask_png_plan(contents: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """How to read a mask file's pixel values with `decode_mask_png`.

    Returns:
        (readable, png): readable is true for a complete (IEND last) 8-bit grey PNG and for a
        complete palette PNG (1 to 8 bits) whose palette chunk was found; png is the file to
        decode, for a palette PNG with its palette swapped for the ramp. Grey PNGs of fewer
        bits are not readable here (libpng would scale their values to 0..255); other files
        neither.
    """
    header = _bytes_at(contents, 0, _FIRST_CHUNK_AFTER_IHDR)
    is_png = tf.logical_and(
        tf.equal(tf.strings.substr(contents, 0, 8), PNG_SIGNATURE),
        tf.equal(_tail(contents, len(PNG_END)), PNG_END),
    )
    depth, colour = header[_BIT_DEPTH_AT], header[_COLOUR_TYPE_AT]
    grey = tf.logical_and(tf.equal(colour, _GREY), tf.equal(depth, 8))
    palette = tf.logical_and(tf.equal(colour, _PALETTE), depth <= 8)
    offset, size = _find_palette(contents)
    start = tf.maximum(offset, 0)
    rest = tf.minimum(start + 12 + size, tf.strings.length(contents))
    readable = tf.logical_and(is_png, tf.logical_or(grey, tf.logical_and(palette, offset >= 0)))
    # The common layout (IHDR, PLTE, IDAT...: VOC's masks, what Pillow writes) of an 8-bit
    # palette PNG becomes the grey PNG of its indices instead: colour type 0, PLTE dropped.
    # libpng then copies the indices rather than expanding them to RGB and back to grey
    # through the ramp, a mask decode ~2.5x cheaper. Any other chunk order (a tRNS or bKGD
    # would mean something else in a grey PNG) keeps the ramp.
    plain_layout = tf.logical_and(
        tf.equal(offset, _FIRST_CHUNK_AFTER_IHDR),
        tf.reduce_all(tf.equal(_bytes_at(contents, rest + 4, 4), list(b"IDAT"))),
    )
    as_grey = tf.logical_and(tf.logical_and(palette, tf.equal(depth, 8)), plain_layout)
    # Conditions, not selects: only the rewrite a file needs is built (each copies the file).
    png = tf.cond(
        as_grey,
        lambda: _palette_as_grey(contents, rest),
        lambda: tf.cond(palette, lambda: _with_ramp(contents, start, rest), lambda: contents),
    )
    return readable, png


def _with_ramp(contents: tf.Tensor, start: tf.Tensor, rest: tf.Tensor) -> tf.Tensor:
    """The PNG with its palette chunk [start, rest) replaced by the grey ramp."""
    # The ramp always has 256 entries, so an index beyond the file's own palette (which
    # Pillow reads as is) still decodes to itself.
    return tf.strings.join(
        [
            tf.strings.substr(contents, 0, start),
            RAMP_PLTE_CHUNK,
            tf.strings.substr(contents, rest, tf.strings.length(contents) - rest),
        ]
    )


def _palette_as_grey(contents: tf.Tensor, rest: tf.Tensor) -> tf.Tensor:
    """An 8-bit palette PNG laid out IHDR, PLTE, IDAT... as the grey PNG of its indices: IHDR
    with colour type 0 (its CRC updated by the constant XOR), the PLTE chunk before `rest`
    dropped."""
    crc = tf.bitwise.bitwise_xor(_bytes_at(contents, _IHDR_CRC_AT, 4), list(_PALETTE_TO_GREY_CRC))
    single_bytes = tf.constant([bytes([value]) for value in range(256)])
    header = tf.strings.join([contents, b"\0" * _IHDR_CRC_AT])  # never out of range
    return tf.strings.join(
        [
            tf.strings.substr(header, 0, _COLOUR_TYPE_BYTE),
            b"\x00",
            tf.strings.substr(header, _COLOUR_TYPE_BYTE + 1, 3),
            tf.strings.reduce_join(tf.gather(single_bytes, crc)),
            tf.strings.substr(contents, rest, tf.strings.length(contents) - rest),
        ]
    )


def decode_mask_png(png: tf.Tensor) -> tf.Tensor:
    """Decodes the `png` of a readable `mask_png_plan` to its pixel values: uint8 [H, W]."""
    return tf.io.decode_png(png, channels=1)[..., 0]


def decode_image_jpeg(contents: tf.Tensor) -> tf.Tensor:
    """Decodes a plain JPEG (see `is_plain_jpeg`) to uint8 RGB [H, W, 3]; grey becomes RGB."""
    # TensorFlow's default is the fast integer IDCT; the accurate one is what Pillow (libjpeg's
    # default) uses, which makes both paths decode bit-identical pixels.
    return tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")


# libjpeg's pixels near the edge of a window decoded alone can differ by a few levels from the
# whole image's (chroma upsampling and block alignment reach up to one 16-pixel MCU): a window
# decoded this much larger on every side, then sliced, is bit-identical to the whole decode.
JPEG_WINDOW_MARGIN = 16


class JpegWindows:
    """A plain JPEG (see `is_plain_jpeg`) not decoded yet: its size from the header, and any
    window of it decoded on its own.

    `augment.random_scaled_crop` takes one in place of a decoded image, so a random crop
    decodes only the rows and columns it keeps (`tf.image.decode_and_crop_jpeg` skips the IDCT
    and colour conversion of the rest), with the same pixels as decoding the whole file.

    Args:
        contents: The JPEG file's bytes (a scalar string tensor).
    """

    def __init__(self, contents: tf.Tensor):
        self._contents = contents
        self.size = tf.image.extract_jpeg_shape(contents)[:2]

    def window(self, row0: tf.Tensor, row1: tf.Tensor, col0: tf.Tensor, col1: tf.Tensor):
        """Pixels [row0:row1, col0:col1] as uint8 RGB, as `decode_image_jpeg(...)[...]` gives."""
        top = tf.maximum(row0 - JPEG_WINDOW_MARGIN, 0)
        left = tf.maximum(col0 - JPEG_WINDOW_MARGIN, 0)
        bottom = tf.minimum(row1 + JPEG_WINDOW_MARGIN, self.size[0])
        right = tf.minimum(col1 + JPEG_WINDOW_MARGIN, self.size[1])
        pixels = tf.image.decode_and_crop_jpeg(
            self._contents,
            tf.stack([top, left, bottom - top, right - left]),
            channels=3,
            dct_method="INTEGER_ACCURATE",  # as decode_image_jpeg
        )
        return pixels[row0 - top : row1 - top, col0 - left : col1 - left]


class LabelTable:
    """Applies a source's `label_lookup` to decoded masks in the graph.

    Args:
        lookup: int32 [256]: the label of each raw mask value, -1 for values to reject.
    """

    def __init__(self, lookup: np.ndarray):
        lookup = np.asarray(lookup, np.int32)
        self._accepted = lookup >= 0
        # Every accepted value is its own label (the usual case): nothing to look up.
        self.identity = bool(np.array_equal(lookup[self._accepted], np.flatnonzero(self._accepted)))
        self._labels = tf.constant(np.where(lookup < 0, 0, lookup).astype(np.uint8))

    def accepts(self, raw: tf.Tensor) -> tf.Tensor:
        """True when every raw value of a uint8 mask is in the table.

        The accepted values are nearly always a range of class ids, maybe with 255 = ignore on
        top: those are checked with one or two reductions, which cost far less than a table
        lookup per pixel; any other set with a histogram.
        """
        accepted = self._accepted
        if accepted.all():
            return tf.constant(True)
        core = accepted.copy()
        core[255] = False
        values = np.flatnonzero(core)
        contiguous = values.size and core[values[0] : values[-1] + 1].all()
        if contiguous and accepted[255] and values[0] == 0:
            # uint8 arithmetic wraps: 255 + 1 = 0, class c -> c + 1.
            return tf.reduce_max(raw + 1) <= int(values[-1]) + 1
        if contiguous and not accepted[255]:
            return tf.logical_and(
                tf.reduce_min(raw) >= int(values[0]), tf.reduce_max(raw) <= int(values[-1])
            )
        counts = tf.math.bincount(tf.cast(raw, tf.int32), minlength=256, maxlength=256)
        return tf.reduce_all(tf.logical_or(tf.constant(accepted), tf.equal(counts, 0)))

    def labels(self, raw: tf.Tensor) -> tf.Tensor:
        """The class ids of a uint8 mask whose values `accepts`."""
        if self.identity:
            return raw
        return tf.gather(self._labels, tf.cast(raw, tf.int32))


# ----- the decode op ---------------------------------------------------------------------------
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


def _record_bytes(source: Source, image: tf.Tensor, mask: tf.Tensor) -> tuple:
    """The image and mask files' bytes of a record (read here when it holds paths)."""
    if source.records_are_paths:
        return tf.io.read_file(image), tf.io.read_file(mask)
    return image, mask


def decode_op(source: Source):
    """The map function: (name, image, mask) record -> (image, mask, ok).

    Plain JPEGs with grey or palette PNG masks decode in the graph (the functions above); any
    other file, and any pair the graph's checks doubt (sizes differ, a raw value the label
    table does not accept), goes through `_python_decode_op`, which decodes it the same way or
    names what is wrong.
    """
    python_decode = _python_decode_op(source)
    lookup = source.label_lookup()
    if lookup is None:
        return python_decode
    table = LabelTable(lookup)

    def decode(name, image, mask):
        image_bytes, mask_bytes = _record_bytes(source, image, mask)
        mask_readable, mask_png = mask_png_plan(mask_bytes)

        def in_python():
            return python_decode(name, image, mask)

        def in_graph():
            pixels = decode_image_jpeg(image_bytes)
            raw = decode_mask_png(mask_png)
            same_size = tf.reduce_all(tf.equal(tf.shape(raw), tf.shape(pixels)[:2]))
            return tf.cond(
                tf.logical_and(same_size, table.accepts(raw)),
                lambda: (pixels, table.labels(raw), tf.constant(True)),
                in_python,
            )

        return tf.cond(
            tf.logical_and(is_plain_jpeg(image_bytes), mask_readable),
            in_graph,
            in_python,
        )

    return decode


def decode_and_crop_op(source: Source, crop: Callable) -> Callable | None:
    """The map function of an uncached training pass: (name, image, mask, seed) -> the
    transformed (image, mask), decoding only the part of each JPEG the crop keeps.

    `crop(image, mask, seed)` is the training transform (`augment` with its options), and must
    accept a `JpegWindows` as its image. Pairs the graph cannot read or check (see `decode_op`)
    are decoded whole by Pillow first (where `decode_op` sends them too), so every example gives
    exactly what decode-then-transform gives, errors included.

    Returns:
        The function, or None for a source it cannot serve: no label table for the graph, or
        `data.on_error=skip` (whose skipped examples need `decoded_dataset`'s filter).
    """
    lookup = source.label_lookup()
    if lookup is None or source.on_error == "skip":
        return None
    table = LabelTable(lookup)
    # The pairs that leave the window path are exactly those `decode_op` would send to Pillow
    # (the same two conditions): go there directly. A second in-graph decode here would only
    # ever be skipped, yet its few hundred nodes cost ~0.2 ms per example as dead branches.
    python_decode = _python_decode_op(source)

    def decode_and_crop(name, image, mask, seed):
        image_bytes, mask_bytes = _record_bytes(source, image, mask)
        mask_readable, mask_png = mask_png_plan(mask_bytes)

        def whole():
            pixels, labels, _ = python_decode(name, image, mask)
            return crop(pixels, labels, seed)

        def windowed():
            jpeg = JpegWindows(image_bytes)
            raw = decode_mask_png(mask_png)
            same_size = tf.reduce_all(tf.equal(tf.shape(raw), jpeg.size))
            return tf.cond(
                tf.logical_and(same_size, table.accepts(raw)),
                lambda: crop(jpeg, table.labels(raw), seed),
                whole,
            )

        return tf.cond(tf.logical_and(is_plain_jpeg(image_bytes), mask_readable), windowed, whole)

    return decode_and_crop


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
