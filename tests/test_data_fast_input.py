"""The fast input path: in-graph decoders against Pillow, the fallback rules, the crop-first
augmentation against tf.image.resize, and data.cache=auto."""

import io
import logging
import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image, PngImagePlugin
from scipy import ndimage

from seg_train.data import augment, decode, pipeline
from seg_train.data.folder import FolderSource
from seg_train.errors import UserError


def encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def palette_image(ids: np.ndarray, colours: int, seed: int = 0) -> Image.Image:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(np.random.default_rng(seed).integers(0, 256, 3 * colours).tolist())
    return image


IDS = np.random.default_rng(0).integers(0, 21, (37, 50)).astype(np.uint8)
IDS[0, :5] = 255
TEXT = PngImagePlugin.PngInfo()
TEXT.add_text("Comment", "chunks before the palette")
MASKS = {
    "palette 8-bit (VOC)": encode(palette_image(IDS, 256), format="PNG"),
    "palette 4-bit": encode(palette_image(IDS % 16, 16), format="PNG", bits=4),
    "palette 2-bit": encode(palette_image(IDS % 4, 4), format="PNG", bits=2),
    "palette with transparency": encode(palette_image(IDS, 256), format="PNG", transparency=0),
    "palette with a text chunk": encode(palette_image(IDS, 256), format="PNG", pnginfo=TEXT),
    "palette of one repeated colour": encode(
        Image.fromarray(IDS, mode="P"), format="PNG"
    ),  # Pillow's default grey ramp palette
    "grey 8-bit": encode(Image.fromarray(IDS, mode="L"), format="PNG"),
}
NOT_MASKS = {
    "RGB PNG": encode(Image.fromarray(np.stack([IDS] * 3, -1)), format="PNG"),
    "16-bit grey PNG": encode(Image.fromarray(IDS.astype(np.uint16) * 200), format="PNG"),
    "1-bit grey PNG": encode(Image.fromarray(IDS > 10), format="PNG"),
    "JPEG": encode(Image.fromarray(np.stack([IDS] * 3, -1)), format="JPEG"),
    "cut inside the header": encode(palette_image(IDS, 256), format="PNG")[:30],
    "cut inside the data": encode(palette_image(IDS, 256), format="PNG")[:-20],
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_mask_pngs_decode_to_the_values_pillow_reads(kind):
    readable, png = decode.mask_png_plan(tf.constant(MASKS[kind]))
    assert bool(readable)
    expected = np.asarray(Image.open(io.BytesIO(MASKS[kind])))
    np.testing.assert_array_equal(decode.decode_mask_png(png).numpy(), expected)


@pytest.mark.parametrize("kind", sorted(NOT_MASKS))
def test_other_files_are_left_to_pillow(kind):
    readable, _ = decode.mask_png_plan(tf.constant(NOT_MASKS[kind]))
    assert not bool(readable)


RGB = np.random.default_rng(1).integers(0, 256, (37, 50, 3)).astype(np.uint8)


JPEG_VARIANTS = ["baseline", "progressive", "grey", "cmyk", "444"]


def jpeg_variant(pixels: np.ndarray, variant: str) -> bytes:
    """`pixels` as a JPEG of one of JPEG_VARIANTS (quality 90)."""
    image = Image.fromarray(pixels)
    options = {"format": "JPEG", "quality": 90}
    if variant == "progressive":
        options["progressive"] = True
    elif variant == "grey":
        image = image.convert("L")
    elif variant == "cmyk":
        image = image.convert("CMYK")
    elif variant == "444":
        options["subsampling"] = 0
    return encode(image, **options)


@pytest.mark.parametrize("variant", JPEG_VARIANTS)
def test_plain_jpegs_decode_bit_identical_to_pillow(variant):
    data = jpeg_variant(RGB, variant)
    assert bool(decode.is_plain_jpeg(tf.constant(data)))
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode.decode_image_jpeg(tf.constant(data)).numpy(), expected)


def test_truncated_and_non_jpeg_files_are_not_plain_jpegs():
    jpeg = encode(Image.fromarray(RGB), format="JPEG")
    for data in (
        jpeg[: len(jpeg) // 2],
        jpeg + b"trailing bytes",
        encode(Image.fromarray(RGB), format="PNG"),
        b"",
        b"\xff",
    ):
        assert not bool(decode.is_plain_jpeg(tf.constant(data)))


@pytest.mark.parametrize(
    "accepted_values",
    [
        list(range(21)) + [255],  # VOC: a range of ids plus ignore
        [1, 2, 3],  # Oxford-IIIT Pet trimaps
        list(range(256)),  # no class count: everything
        [0, 5, 255],  # anything else
        list(range(21)) + [100],  # ignore_label=100
    ],
)
def test_label_table_accepts_exactly_the_accepted_values(accepted_values):
    lookup = np.full(256, -1, np.int32)
    lookup[accepted_values] = accepted_values
    table = decode.LabelTable(lookup)
    rng = np.random.default_rng(2)
    accepted = np.array(accepted_values)
    for trial in range(40):
        mask = rng.choice(accepted, (9, 11)).astype(np.uint8)
        if trial % 2:
            mask[rng.integers(9), rng.integers(11)] = rng.integers(256)
        expected = bool(np.isin(mask, accepted).all())
        assert bool(table.accepts(tf.constant(mask))) is expected, mask


def test_label_table_maps_values_through_the_lookup():
    lookup = np.full(256, -1, np.int32)
    lookup[[1, 2, 3]] = [0, 1, 255]
    table = decode.LabelTable(lookup)
    assert not table.identity
    mask = np.array([[1, 2, 3, 3]], np.uint8)
    np.testing.assert_array_equal(table.labels(tf.constant(mask)).numpy(), [[0, 1, 255, 255]])


def write_folder(root, examples):
    """examples: stem -> (image bytes, image suffix, mask bytes)."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, (image, suffix, mask) in examples.items():
        (root / "images" / f"{stem}{suffix}").write_bytes(image)
        (root / "masks" / f"{stem}.png").write_bytes(mask)
    (root / "splits" / "train.txt").write_text("\n".join(examples) + "\n")
    return FolderSource(str(root), num_classes=21)


def test_decoded_dataset_equals_the_pillow_reference_and_stays_in_graph(tmp_path):
    rng = np.random.default_rng(3)
    examples = {}
    for index, mask in enumerate(MASKS.values()):
        image = Image.fromarray(rng.integers(0, 256, (37, 50, 3)).astype(np.uint8))
        examples[f"fast{index}"] = (encode(image, format="JPEG"), ".jpg", mask)
    image = Image.fromarray(rng.integers(0, 256, (37, 50, 3)).astype(np.uint8))
    examples["png_image"] = (encode(image, format="PNG"), ".png", MASKS["grey 8-bit"])
    source = write_folder(tmp_path, examples)
    calls = []
    load = source.load
    source.load = lambda *args: calls.append(args[0]) or load(*args)
    decoded = list(pipeline.decoded_dataset(source, "train").as_numpy_iterator())
    # Only the PNG image (not a plain JPEG) went through Python.
    assert len(calls) == 1
    source.load = load
    for (image, mask), example in zip(decoded, source.examples("train")):
        reference = source.load("", example.image_path, example.mask_path)
        np.testing.assert_array_equal(image, reference.image)
        np.testing.assert_array_equal(mask, reference.mask)


@pytest.mark.parametrize(
    "problem, culprit",
    [
        ("label 50 with 21 classes", "masks/bad.png"),
        ("mask smaller than its image", "masks/bad.png"),
        ("truncated JPEG", "images/bad.jpg"),
    ],
)
def test_doubtful_pairs_fall_back_and_are_named(tmp_path, problem, culprit):
    image = Image.fromarray(RGB)
    jpeg, mask = encode(image, format="JPEG"), MASKS["palette 8-bit (VOC)"]
    if problem.startswith("label"):
        ids = IDS.copy()
        ids[3, 3] = 50
        mask = encode(palette_image(ids, 256), format="PNG")
    elif problem.startswith("mask smaller"):
        mask = encode(palette_image(IDS[:30], 256), format="PNG")
    else:
        jpeg = jpeg[: len(jpeg) // 2]
    source = write_folder(
        tmp_path,
        {
            "good": (encode(image, format="JPEG"), ".jpg", MASKS["grey 8-bit"]),
            "bad": (jpeg, ".jpg", mask),
        },
    )
    with pytest.raises(UserError, match=culprit), decode.data_errors_as_user_errors():
        list(pipeline.decoded_dataset(source, "train"))
    skipping = FolderSource(str(tmp_path), num_classes=21, on_error="skip")
    kept = list(pipeline.decoded_dataset(skipping, "train").as_numpy_iterator())
    assert len(kept) == 1


def corrupt_inside(data: bytes, marker: bytes, skip: int, count: int) -> bytes:
    """`data` with `count` bytes zeroed `skip` bytes after `marker`; start and end intact."""
    at = data.index(marker) + skip
    return data[:at] + bytes(count) + data[at + count :]


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_files_corrupt_inside_give_one_line_or_are_skipped(tmp_path, kind):
    jpeg, mask = encode(Image.fromarray(RGB), format="JPEG"), MASKS["palette 8-bit (VOC)"]
    if kind == "image":
        jpeg = corrupt_inside(jpeg, b"\xff\xc0", 5, 4)  # the frame header's height and width
    else:
        mask = corrupt_inside(mask, b"IDAT", 12, 24)  # the compressed pixel data
    good = (encode(Image.fromarray(RGB), format="JPEG"), ".jpg", MASKS["grey 8-bit"])
    source = write_folder(tmp_path, {"good": good, "bad": (jpeg, ".jpg", mask)})
    with (
        pytest.raises(UserError, match="corrupt inside .*mode=check.*data.on_error=skip"),
        decode.data_errors_as_user_errors(),
    ):
        list(pipeline.decoded_dataset(source, "train"))
    skipping = FolderSource(str(tmp_path), num_classes=21, on_error="skip")
    kept = list(pipeline.decoded_dataset(skipping, "train").as_numpy_iterator())
    assert len(kept) == 1


def augment_config(**overrides):
    data = {
        "crop_size": [8, 8],
        "scale_range": [1.0, 1.0],
        "hflip": False,
        "ignore_label": 255,
        "jitter": None,
        "flip_pairs": None,
    }
    data.update(overrides)
    return OmegaConf.create(data)


def windows(array: np.ndarray, size: int):
    for top in range(array.shape[0] - size + 1):
        for left in range(array.shape[1] - size + 1):
            yield array[top : top + size, left : left + size]


@pytest.mark.parametrize("scale, size", [(1.0, 40), (0.5, 40), (0.25, 48)])
def test_scaled_crop_equals_a_window_of_the_whole_rescaled_pair(scale, size):
    """When a window's source edges fall on whole pixels (scale 1/n), the crop is exactly a
    window of tf.image.resize of the whole pair; other scales round the edges outwards."""
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
    mask = rng.integers(0, 21, (size, size)).astype(np.uint8)
    scaled = int(round(size * scale))
    full_image = tf.image.resize(image, [scaled, scaled], "bilinear").numpy()
    full_mask = tf.image.resize(mask[..., None], [scaled, scaled], "nearest").numpy()[..., 0]
    for seed in range(5):
        out_image, out_mask = augment.random_scaled_crop(
            tf.constant(image),
            tf.constant(mask),
            [scale, scale],
            [8, 8],
            255,
            tf.constant([seed, 7]),
        )
        out_image, out_mask = out_image.numpy(), out_mask.numpy()
        candidates = zip(windows(full_image, 8), windows(full_mask, 8))
        assert any(
            np.allclose(out_image, i, atol=1e-3) and np.array_equal(out_mask, m)
            for i, m in candidates
        ), (scale, seed)


def test_a_mirrored_crop_is_the_same_crop_mirrored():
    """mirror=True gives numpy's left-right flip of the mirror=False crop, padding included
    (which then lies on the left): the mask exactly, the image up to float rounding."""
    rng = np.random.default_rng(8)
    image = rng.integers(0, 256, (30, 41, 3)).astype(np.uint8)
    mask = rng.integers(0, 21, (30, 41)).astype(np.uint8)
    padded = 0
    for seed in range(12):
        crops = [
            augment.random_scaled_crop(
                tf.constant(image),
                tf.constant(mask),
                [0.5, 1.7],
                [24, 24],
                255,
                tf.constant([seed, 3]),
                pad_value=[10, 20, 30],
                mirror=tf.constant(mirror),
            )
            for mirror in (False, True)
        ]
        (plain_image, plain_mask), (mirrored_image, mirrored_mask) = [
            (i.numpy(), m.numpy()) for i, m in crops
        ]
        np.testing.assert_array_equal(mirrored_mask, plain_mask[:, ::-1])
        np.testing.assert_allclose(mirrored_image, plain_image[:, ::-1], atol=1e-3)
        padded += int((plain_mask == 255).any())
    assert padded > 0  # some crops were padded, so the padding's side was checked


def test_the_crop_transform_flips_both_ways_and_swaps_flip_pairs():
    """transform=crop with hflip: each sample is the pair as is or mirrored with the ids of each
    flip pair swapped, and both happen."""
    from tests.helpers import small_pipeline_options

    mask = np.zeros((16, 16), np.uint8)
    mask[:, :5], mask[:, 11:] = 1, 2  # left-side class 1, right-side class 2
    image = np.stack([mask * 100] * 3, -1).astype(np.uint8)
    options = small_pipeline_options(
        crop_size=[16, 16], scale_range=[1.0, 1.0], flip_pairs=[[1, 2]]
    )
    swapped = np.array([0, 2, 1], np.uint8)
    outcomes = set()
    for seed in range(16):
        out_image, out_mask = augment.augment(
            tf.constant(image), tf.constant(mask), tf.constant([seed, 5]), options
        )
        out_image, out_mask = out_image.numpy(), out_mask.numpy()
        flipped = not np.array_equal(out_image, image)
        outcomes.add(flipped)
        if flipped:
            np.testing.assert_array_equal(out_image, image[:, ::-1])
            np.testing.assert_array_equal(out_mask, swapped[mask[:, ::-1]])
        else:
            np.testing.assert_array_equal(out_mask, mask)
    assert outcomes == {True, False}


def test_scaled_crop_pads_with_zero_and_ignore_and_keeps_labels_aligned():
    """Image value = 10 * label. Aligned, every image pixel lies between the values of the labels
    around its own mask pixel (bilinear blends neighbours only); a shift of one pixel breaks it."""
    rng = np.random.default_rng(5)
    mask = np.kron(rng.integers(0, 21, (5, 5)), np.ones((8, 8), int)).astype(np.uint8)
    image = np.repeat((mask * 10)[..., None], 3, -1).astype(np.uint8)
    for seed in range(20):
        out_image, out_mask = augment.random_scaled_crop(
            tf.constant(image), tf.constant(mask), [0.5, 2.5], [32, 32], 255, tf.constant([seed, 1])
        )
        out_image, out_mask = out_image.numpy(), out_mask.numpy()
        assert out_image.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        assert set(np.unique(out_mask)) <= set(np.unique(mask)) | {255}
        padding = out_mask == 255
        assert (out_image[padding] == 0).all()
        values = 10.0 * out_mask
        low = ndimage.minimum_filter(np.where(padding, 1e9, values), size=3)
        high = ndimage.maximum_filter(np.where(padding, -1e9, values), size=3)
        inside = ~ndimage.binary_dilation(padding, np.ones((3, 3)))
        pixel = out_image[..., 0]
        assert ((pixel >= low - 0.5) & (pixel <= high + 0.5))[inside].all(), seed
        shifted = np.roll(pixel, 2, axis=1)
        assert not ((shifted >= low - 0.5) & (shifted <= high + 0.5))[inside].all()


@pytest.mark.parametrize("setting, expected", [(True, True), (False, False)])
def test_cache_setting_true_false_is_obeyed(tmp_path, setting, expected):
    source = write_folder(
        tmp_path, {"a": (encode(Image.fromarray(RGB), format="JPEG"), ".jpg", MASKS["grey 8-bit"])}
    )
    assert pipeline.should_cache(source, "train", setting) is expected


def test_cache_auto_compares_the_estimate_with_the_budget(tmp_path, monkeypatch):
    examples = {
        f"e{i}": (encode(Image.fromarray(RGB), format="JPEG"), ".jpg", MASKS["grey 8-bit"])
        for i in range(3)
    }
    source = write_folder(tmp_path, examples)
    per_example = RGB.nbytes + IDS.nbytes
    assert pipeline.estimated_decoded_bytes(source, "train") == 3 * per_example
    monkeypatch.setattr(pipeline, "AUTO_CACHE_MAX_BYTES", 3 * per_example)
    assert pipeline.should_cache(source, "train", "auto")
    monkeypatch.setattr(pipeline, "AUTO_CACHE_MAX_BYTES", 3 * per_example - 1)
    assert not pipeline.should_cache(source, "train", "auto")


def test_cache_auto_decides_once_per_split_with_one_log_line(tmp_path, monkeypatch, caplog):
    # Training asks for the val split twice (fit's batches, original-resolution validation):
    # one estimate (it decodes examples) and one log line per split, not one per call.
    source = write_folder(
        tmp_path, {"a": (encode(Image.fromarray(RGB), format="JPEG"), ".jpg", MASKS["grey 8-bit"])}
    )
    loads = []
    original_load = source.load
    monkeypatch.setattr(source, "load", lambda *args: loads.append(args) or original_load(*args))
    with caplog.at_level(logging.INFO, logger="seg_train.data.pipeline"):
        decisions = [pipeline.should_cache(source, "train", "auto") for _ in range(3)]
    assert decisions == [True, True, True]
    assert len(loads) == 1
    lines = [r.getMessage() for r in caplog.records if "data.cache=auto" in r.getMessage()]
    assert len(lines) == 1 and "split 'train'" in lines[0], lines


def test_nearest_rows_sample_the_nearest_source_rows_in_eager_and_graph():
    # Reference: the centre of output row i lies at (i + 0.5) * length / count source rows;
    # the row under it is the floor, in exact rational arithmetic. tf.image.resize agrees
    # except at exact ties (a centre on a row boundary), where its float32 may pick the row
    # below, and everywhere when count is a power of two (the scale is exact in binary).
    rng = np.random.default_rng(6)
    in_graph = tf.function(augment._nearest_rows)
    ties = 0
    # 350 rows to 321: row 160's centre falls exactly on source row 175 (160.5 * 350 / 321),
    # where a float32 form of this function gave 174 in a graph and 175 eagerly.
    cases = [(350, 321, 50)] + [tuple(int(v) for v in rng.integers(1, 400, 3)) for _ in range(120)]
    for trial, (length, count, first) in enumerate(cases):
        if trial % 3 == 1:
            count = 2 ** int(rng.integers(0, 10))
        exact = [
            first + min(math.floor(Fraction(2 * i + 1, 2) * length / count), length - 1)
            for i in range(count)
        ]
        args = (tf.constant(first), tf.constant(first + length), tf.constant(count))
        assert augment._nearest_rows(*args).numpy().tolist() == exact
        assert in_graph(*args).numpy().tolist() == exact
        assert in_graph(*args[:2], count).numpy().tolist() == exact  # a constant count
        column = np.arange(first + length, dtype=np.float32).reshape(-1, 1, 1)
        resized = tf.image.resize(column[first:], [count, 1], "nearest").numpy().ravel()
        tie = np.array([(2 * i + 1) * length % (2 * count) == 0 for i in range(count)])
        differ = resized != np.asarray(exact)
        assert not (differ & ~tie).any()
        if count & (count - 1) == 0:
            assert not differ.any()
        ties += tie.sum()
    assert ties > 0  # the cases include ties


@pytest.mark.parametrize("size", [[128, 128], [512, 256], [37, 50]])
def test_resize_pair_gives_what_tf_image_resize_gives(size):
    rng = np.random.default_rng(12)
    image = rng.integers(0, 256, (375, 500, 3)).astype(np.uint8)
    mask = rng.integers(0, 21, (375, 500)).astype(np.uint8)
    resized_image, resized_mask = tf.function(augment.resize_pair)(image, mask, size)
    expected = tf.image.resize(image, size, "bilinear").numpy()
    np.testing.assert_array_equal(resized_image.numpy(), expected)
    expected_mask = tf.image.resize(mask[..., None], size, "nearest").numpy()[..., 0]
    assert resized_mask.dtype == tf.uint8 and resized_mask.shape == tuple(size)
    # No tie here differs: 375 rows to 37 put no row centre on a boundary (375 is odd), and
    # 500 columns to 50 put every one there but at an exact scale (10), as powers of two do.
    np.testing.assert_array_equal(resized_mask.numpy(), expected_mask)
    # Mirrored: numpy's left-right flip of the same resize (the image mirrored before it, so
    # the float sums round apart, the mask's columns gathered in reverse, so exactly).
    mirrored_image, mirrored_mask = tf.function(augment.resize_pair)(
        image, mask, size, tf.constant(True)
    )
    np.testing.assert_allclose(mirrored_image.numpy(), expected[:, ::-1], atol=1e-3)
    np.testing.assert_array_equal(mirrored_mask.numpy(), expected_mask[:, ::-1])


PHOTO = np.asarray(
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (12, 16, 3)).astype(np.uint8)).resize(
        (160, 120), Image.BICUBIC
    )
)


@pytest.mark.parametrize("variant", JPEG_VARIANTS)
def test_jpeg_windows_decode_the_pixels_pillow_decodes(variant):
    # Reference: Pillow's decode of the whole file, sliced. Windows at the corners, edges and
    # inside, of odd sizes and offsets (libjpeg aligns a cropped decode to its 8/16-pixel MCUs).
    data = jpeg_variant(PHOTO, variant)
    whole = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    jpeg = decode.JpegWindows(tf.constant(data))
    assert jpeg.size.numpy().tolist() == [120, 160]
    for row0, row1, col0, col1 in [
        (0, 120, 0, 160),
        (0, 1, 0, 1),
        (119, 120, 159, 160),
        (3, 50, 17, 99),
        (33, 97, 1, 160),
        (61, 120, 77, 131),
    ]:
        window = jpeg.window(row0, row1, col0, col1).numpy()
        np.testing.assert_array_equal(window, whole[row0:row1, col0:col1])


def test_uncached_training_decodes_windows_with_the_cached_samples(tmp_path):
    # Decode-then-crop (the cached path) is the reference for the windowed decode: same seed,
    # same batches, bit for bit, including the examples that fall back (a PNG image, a 4-bit
    # palette mask) and with random scale, pad colour, flip and jitter.
    rng = np.random.default_rng(7)
    examples = {}
    for index in range(5):
        ids = rng.integers(0, 21, (15, 20)).astype(np.uint8)
        big_ids = np.kron(ids, np.ones((8, 8), np.uint8))
        big_ids[:4] = 255
        photo = PHOTO if index % 2 else PHOTO[::-1]
        examples[f"jpeg{index}"] = (
            encode(Image.fromarray(photo), format="JPEG", quality=85),
            ".jpg",
            encode(palette_image(big_ids, 256), format="PNG"),
        )
    examples["png_image"] = (
        encode(Image.fromarray(PHOTO), format="PNG"),
        ".png",
        examples["jpeg0"][2],
    )
    examples["4bit_mask"] = (
        examples["jpeg1"][0],
        ".jpg",
        encode(palette_image(big_ids % 16, 16), format="PNG", bits=4),
    )
    source = write_folder(tmp_path, examples)
    settings = {
        "batch_size": 7,
        "crop_size": [64, 96],
        "scale_range": [0.4, 1.8],
        "hflip": True,
        "flip_pairs": [],
        "jitter": {"brightness": 0.2},
        "shuffle_buffer": 8,
        "num_parallel_calls": 2,
        "ignore_label": 255,
        "pad_value": [10, 20, 30],
    }
    batches = {}
    for cache in (True, False):
        options = pipeline.PipelineOptions.from_mapping(settings | {"cache": cache})
        stream = pipeline.train_dataset(source, options, seed=11, repeat=True)
        batches[cache] = list(stream.take(3).as_numpy_iterator())
    for (cached_x, cached_y), (windowed_x, windowed_y) in zip(batches[True], batches[False]):
        np.testing.assert_array_equal(windowed_x, cached_x)
        np.testing.assert_array_equal(windowed_y, cached_y)


def test_uncached_training_still_names_a_broken_pair(tmp_path):
    ids = IDS.copy()
    ids[3, 3] = 50  # out of range for 21 classes
    source = write_folder(
        tmp_path,
        {
            "good": (encode(Image.fromarray(RGB), format="JPEG"), ".jpg", MASKS["grey 8-bit"]),
            "bad": (
                encode(Image.fromarray(RGB), format="JPEG"),
                ".jpg",
                encode(palette_image(ids, 256), format="PNG"),
            ),
        },
    )
    options = pipeline.PipelineOptions.from_mapping(
        {"batch_size": 2, "crop_size": [16, 16], "cache": False, "shuffle_buffer": 2}
    )
    with pytest.raises(UserError, match="masks/bad.png"), decode.data_errors_as_user_errors():
        list(pipeline.train_dataset(source, options, seed=0).as_numpy_iterator())


def test_voc_layout_palette_masks_are_read_as_grey_indices():
    # IHDR, PLTE, IDAT (VOC, Pillow): rewritten as an 8-bit grey PNG of the indices, whose
    # IHDR CRC (zlib's, over type and data) holds; what Pillow reads from the original file.
    readable, png = decode.mask_png_plan(tf.constant(MASKS["palette 8-bit (VOC)"]))
    png = png.numpy()
    assert bool(readable) and png[25] == 0 and b"PLTE" not in png
    assert zlib.crc32(png[12:29]) == int.from_bytes(png[29:33], "big")
    original = np.asarray(Image.open(io.BytesIO(MASKS["palette 8-bit (VOC)"])))
    np.testing.assert_array_equal(decode.decode_mask_png(tf.constant(png)).numpy(), original)
    # A tRNS (after PLTE) or fewer bits would mean something else in a grey PNG: the ramp stays.
    for kind in ("palette with transparency", "palette 4-bit"):
        _, other = decode.mask_png_plan(tf.constant(MASKS[kind]))
        assert other.numpy()[25] == 3, kind


@pytest.mark.parametrize("lead", [(), (2,)])
def test_pad_image_fills_each_channel_with_its_colour_and_keeps_the_pixels(lead):
    # Reference: numpy's constant pad, channel by channel. Padding on all four sides, given
    # as Python ints and as tensors (the mirrored crop pads on the left).
    rng = np.random.default_rng(11)
    image = rng.uniform(0, 255, (*lead, 3, 4, 3)).astype(np.float32)
    colour = [123.68, 116.779, 103.939]
    (top, bottom), (left, right) = (1, 2), (3, 0)
    lead_pad = [(0, 0)] * len(lead)
    expected = np.stack(
        [
            np.pad(image[..., k], [*lead_pad, (top, bottom), (left, right)], constant_values=c)
            for k, c in enumerate(np.float32(colour))
        ],
        axis=-1,
    )
    for padding in (
        [[top, bottom], [left, right]],
        [tf.constant([top, bottom]), tf.constant([left, right])],
    ):
        padded = augment.pad_image(tf.constant(image), padding, colour).numpy()
        np.testing.assert_array_equal(padded, expected)
