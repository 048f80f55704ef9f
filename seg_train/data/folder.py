"""The generic folder layout: `images/`, `masks/` and `splits/{train,val}.txt` under one root.

    root/
      images/<stem>.jpg|.jpeg|.png|.bmp   RGB (grayscale / RGBA are converted)
      masks/<stem>.png                    class ids, 255 = ignore (8-bit grey or palette PNG)
      splits/train.txt, splits/val.txt   one <stem> per line
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from seg_train.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class Example:
    """One image and its mask on disk."""

    image_path: str
    mask_path: str


def read_mask(path: str | bytes) -> np.ndarray:
    """Reads a class-id mask PNG as uint8 [H, W].

    Pillow is used instead of `tf.io.decode_png` because TensorFlow expands palette PNGs (PASCAL
    VOC style) to RGB, losing the class ids that the palette indices are.
    """
    path = path.decode() if isinstance(path, bytes) else path
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P"):
            raise ValueError(
                f"mask {path} has mode {mask.mode}; expected an 8-bit grey or palette PNG of class "
                "ids (colour masks must be converted to ids first)"
            )
        return np.asarray(mask, dtype=np.uint8)


def decode_image(path: tf.Tensor) -> tf.Tensor:
    """Decodes a JPEG/PNG/BMP file to uint8 RGB [H, W, 3] (grey and RGBA are converted)."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_mask(path: tf.Tensor) -> tf.Tensor:
    """Decodes a class-id mask PNG to uint8 [H, W] inside a tf.data graph."""
    mask = tf.numpy_function(read_mask, [path], tf.uint8, stateful=False)
    mask.set_shape([None, None])
    return mask


class FolderSource:
    """Lists and decodes a dataset stored in the generic folder layout.

    Args:
        root: The dataset's top folder, holding `images/`, `masks/` and `splits/`.
    """

    def __init__(self, root: str):
        self.root = Path(root).expanduser()

    def examples(self, split: str) -> list[Example]:
        """Returns the split's examples in file order.

        Raises:
            UserError: if the root, the split file or any listed image/mask is missing.
        """
        if not self.root.is_dir():
            raise UserError(f"data.root {self.root} is not a directory; point data.root at the "
                            "folder holding images/, masks/ and splits/")
        split_file = self.root / "splits" / f"{split}.txt"
        if not split_file.is_file():
            raise UserError(f"split file {split_file} is missing; write one image stem per line "
                            f"for the '{split}' split")
        stems = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not stems:
            raise UserError(f"split file {split_file} lists no images; add one stem per line")
        examples, no_image, no_mask = [], [], []
        for stem in stems:
            image = self._find_image(stem)
            mask = self.root / "masks" / f"{stem}.png"
            if image is None:
                no_image.append(stem)
            elif not mask.is_file():
                no_mask.append(stem)
            else:
                examples.append(Example(str(image), str(mask)))
        if no_image:
            raise UserError(f"{len(no_image)} stems in {split_file} have no image in "
                            f"{self.root / 'images'} (first: {no_image[0]}); add the images "
                            "or remove the stems")
        if no_mask:
            raise UserError(f"{len(no_mask)} images have no mask in {self.root / 'masks'} "
                            f"(first: {no_mask[0]}.png); add the masks or remove the stems from "
                            f"{split_file}")
        return examples

    def decode(self, image_path: tf.Tensor, mask_path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Decodes one example to (uint8 image [H, W, 3], uint8 mask [H, W])."""
        return decode_image(image_path), decode_mask(mask_path)

    def _find_image(self, stem: str) -> Path | None:
        for suffix in IMAGE_SUFFIXES:
            candidate = self.root / "images" / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
        return None
