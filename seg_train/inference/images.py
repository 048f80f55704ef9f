"""The images `mode=infer` predicts: finding them from a path or glob, and reading them."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from seg_train.data.readers import IMAGE_SUFFIXES, displayed
from seg_train.errors import UserError


def find_images(pattern: str, recursive: bool = False) -> list[Path]:
    """Lists the images named by a file path, a directory or a glob, sorted."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = path.rglob("*") if recursive else path.glob("*")
    else:
        candidates = (Path(p) for p in glob.glob(str(path), recursive=True))
    images = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(
            f"infer.input {pattern} matches no image ({', '.join(IMAGE_SUFFIXES)}); "
            "pass an image file, a directory of images or a quoted glob"
        )
    return images


def load_rgb(path: Path) -> np.ndarray:
    """Reads any Pillow-readable image as uint8 RGB (grayscale and RGBA converted), turned as
    its EXIF orientation says, as training saw it (outputs follow the displayed image)."""
    try:
        with Image.open(path) as image:
            return np.asarray(displayed(image, str(path)).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); remove it from infer.input") from exc
