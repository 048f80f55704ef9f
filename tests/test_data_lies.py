"""Data that lies: JPEG masks under .png names, EXIF-rotated photos, sloppy split files.

Expected values come from Pillow (the stored pixels, its own EXIF reader) and NumPy rotations
written here, never from the decoders under test.
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from seg_train.data import decode, pipeline
from seg_train.data.folder import FolderSource
from seg_train.data.readers import DataError
from seg_train.data.voc import VOCSource
from seg_train.errors import UserError
from seg_train.inference.images import load_rgb
from seg_train.tasks.check import check_dataset
from tests.helpers import compose_config

ORIENTATION = 0x0112
RNG = np.random.default_rng(7)
# Stored 24 rows x 40 columns: a 90° rotation makes it 40x24 as displayed.
STORED = RNG.integers(0, 256, (24, 40, 3)).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    """A JPEG written by Pillow, with an EXIF orientation tag when given."""
    out = io.BytesIO()
    image = Image.fromarray(pixels)
    if orientation is None:
        image.save(out, "JPEG", quality=95)
    else:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        image.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def little_endian_exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose EXIF is written by hand in Intel ("II") byte order, three IFD0 entries."""
    entries = [
        (0x010F, 2, 4, b"ab\0\0"),
        (0x0110, 2, 4, b"cd\0\0"),
        (ORIENTATION, 3, 1, struct.pack("<HH", orientation, 0)),
    ]
    ifd = (
        struct.pack("<H", len(entries))
        + b"".join(
            struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries
        )
        + struct.pack("<I", 0)
    )
    tiff = b"II*\0" + struct.pack("<I", 8) + ifd
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=b"Exif\0\0" + tiff)
    return out.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """The JPEG's pixels as stored (Pillow, no orientation applied)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def png_bytes(mask: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(mask).save(out, "PNG")
    return out.getvalue()


def folder(
    root: Path, images: dict[str, bytes], masks: dict[str, bytes], split: str | bytes | None = None
) -> Path:
    """A folder-layout dataset from file names -> bytes; the split lists the image stems."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    for name, data in masks.items():
        (root / "masks" / name).write_bytes(data)
    if split is None:
        split = "\n".join(Path(n).stem for n in images) + "\n"
    for name in ("train", "val"):
        path = root / "splits" / f"{name}.txt"
        path.write_bytes(split if isinstance(split, bytes) else split.encode())
    return root


def decoded(source: FolderSource, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    with decode.data_errors_as_user_errors():
        return list(pipeline.decoded_dataset(source, split).as_numpy_iterator())


def doctor_problems(root: Path) -> list[dict]:
    cfg = compose_config(
        ["data=folder", f"data.root={root}", "data.num_classes=3", "data.class_names=[a,b,c]"]
    )
    source = FolderSource(str(root), num_classes=3)
    return check_dataset(source, cfg.data, ["train"])["errors"]


# --- JPEG masks under PNG names --------------------------------------------------------------
def jpeg_mask(ids: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(ids).save(out, "JPEG", quality=75)
    return out.getvalue()


def test_jpeg_mask_named_png_is_refused_by_training_decode_and_check(tmp_path):
    ids = np.zeros((24, 40), np.uint8)
    ids[5:15, 10:30] = 2
    # What JPEG does to labels: values change at the edges (the issue measured 7%).
    assert (stored_pixels(jpeg_mask(ids))[..., 0] != ids).any()
    root = folder(
        tmp_path,
        {"a.jpg": jpeg_bytes(STORED), "b.jpg": jpeg_bytes(STORED)},
        {"a.png": png_bytes(ids), "b.png": jpeg_mask(ids)},
    )
    source = FolderSource(str(root), num_classes=3)
    with pytest.raises(DataError, match="JPEG") as info:
        source.load("b", str(root / "images/b.jpg"), str(root / "masks/b.png"))
    assert info.value.file.endswith("masks/b.png")
    with pytest.raises(UserError, match=r"masks/b\.png.*JPEG"):
        decoded(source)
    problems = doctor_problems(root)
    assert [p["file"] for p in problems] == [str(root / "masks" / "b.png")]
    assert "JPEG" in problems[0]["problem"]


# --- EXIF orientation -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [jpeg_bytes, little_endian_exif_jpeg], ids=["MM", "II"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_graph_reads_the_orientation_tag_pillow_reads(make, orientation):
    data = make(STORED, orientation)
    with Image.open(io.BytesIO(data)) as image:
        expected = image.getexif().get(ORIENTATION)
    assert expected == orientation
    assert int(decode.jpeg_orientation(tf.constant(data))) == orientation
    # Only upright files stay on the in-graph path, which cannot rotate.
    assert bool(decode.is_plain_jpeg(tf.constant(data))) == (orientation == 1)


def test_jpeg_without_exif_stays_plain():
    data = jpeg_bytes(STORED)
    assert int(decode.jpeg_orientation(tf.constant(data))) == 1
    assert bool(decode.is_plain_jpeg(tf.constant(data)))


# Displayed = stored turned as the tag says: 3 = 180°, 6 = 90° clockwise, 8 = 90° anticlockwise.
TURNS = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", [3, 6])
def test_training_decode_turns_exif_photos_as_displayed_on_both_paths(
    tmp_path, orientation, caplog
):
    rotated = jpeg_bytes(STORED, orientation)
    displayed = TURNS[orientation](stored_pixels(rotated))
    ids = np.zeros(displayed.shape[:2], np.uint8)
    ids[: ids.shape[0] // 2, : ids.shape[1] // 3] = 1
    plain = jpeg_bytes(STORED)
    root = folder(
        tmp_path,
        {"plain.jpg": plain, "turned.jpg": rotated},
        {"plain.png": png_bytes(np.zeros((24, 40), np.uint8)), "turned.png": png_bytes(ids)},
    )
    source = FolderSource(str(root), num_classes=3)
    with caplog.at_level(logging.WARNING):
        (plain_image, _), (image, mask) = decoded(source)
    np.testing.assert_array_equal(plain_image, stored_pixels(plain))
    np.testing.assert_array_equal(image, displayed)
    np.testing.assert_array_equal(mask, ids)
    assert any(
        "turned.jpg" in r.message and f"orientation {orientation}" in r.message
        for r in caplog.records
    )


def test_mask_of_the_stored_size_names_the_exif_cause(tmp_path):
    root = folder(
        tmp_path,
        {"a.jpg": jpeg_bytes(STORED, 6)},
        {"a.png": png_bytes(np.zeros((24, 40), np.uint8))},
    )
    with pytest.raises(UserError) as info:
        decoded(FolderSource(str(root), num_classes=3))
    message = str(info.value)
    assert "masks/a.png" in message and "40x24" in message and "24x40" in message
    assert "EXIF orientation 6" in message


def test_infer_reads_photos_as_displayed(tmp_path):
    path = tmp_path / "photo.jpg"
    data = jpeg_bytes(STORED, 8)
    path.write_bytes(data)
    np.testing.assert_array_equal(load_rgb(path), TURNS[8](stored_pixels(data)))


# --- split files ------------------------------------------------------------------------------
def png_image() -> bytes:
    return png_bytes(STORED)


def mask_png() -> bytes:
    return png_bytes(np.zeros((24, 40), np.uint8))


def test_split_file_with_a_byte_order_mark_and_a_stem_with_spaces(tmp_path):
    root = folder(
        tmp_path,
        {"a.png": png_image(), "my photo.png": png_image()},
        {"a.png": mask_png(), "my photo.png": mask_png()},
        split=b"\xef\xbb\xbfa\r\nmy photo\r\n",
    )
    examples = FolderSource(str(root)).examples("train")
    assert [Path(e.image_path).name for e in examples] == ["a.png", "my photo.png"]


def test_voc_split_file_with_a_byte_order_mark(tmp_path):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "JPEGImages" / "2007_1.jpg").write_bytes(jpeg_bytes(STORED))
    (tmp_path / "SegmentationClass" / "2007_1.png").write_bytes(mask_png())
    for split in ("train", "val"):
        (tmp_path / "ImageSets/Segmentation" / f"{split}.txt").write_bytes(b"\xef\xbb\xbf2007_1\n")
    examples = VOCSource(str(tmp_path)).examples("train")
    assert [Path(e.image_path).name for e in examples] == ["2007_1.jpg"]


@pytest.mark.parametrize(
    ("images", "masks", "listed", "fragments"),
    [
        ({"a.png": 1}, {"a.png": 1}, "a.png", ["'a.png' is listed with its suffix", "'a'"]),
        ({"a.png": 1}, {"a.png": 1}, "A", ["images/a.png", "letter case", "'A'"]),
        ({"a.webp": 1}, {"a.png": 1}, "a", ["images/a.webp", ".webp", ".jpg, .jpeg, .png, .bmp"]),
        ({"a.png": 1}, {"a.jpg": 1}, "a", ["masks/a.jpg", ".jpg", "supported: .png"]),
    ],
)
def test_split_file_slips_are_named(tmp_path, images, masks, listed, fragments):
    root = folder(
        tmp_path,
        {n: png_image() for n in images},
        {n: mask_png() for n in masks},
        split=f"{listed}\n",
    )
    with pytest.raises(UserError) as info:
        FolderSource(str(root)).examples("train")
    for fragment in fragments:
        assert fragment in str(info.value)
