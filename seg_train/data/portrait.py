"""The classic portrait matting set: photos with 0..255 alpha mattes, binarised to person masks.

`data.root` is the folder holding `training/` and `testing/`:

    <root>/                              <- data.root
      training/NNNNN.png                 the portrait (RGB)
      training/NNNNN_matte.png           its alpha matte, 0..255
      testing/NNNNN.png
      testing/NNNNN_matte.png

A pixel is "person" when its alpha exceeds `data.matte_threshold`; the classic U-Net recipe
uses any alpha > 0. With `data.task=matting` the mattes are kept as they are (0..255 alpha,
no threshold, no class-id check); the pipeline then turns them into float alpha targets (see
seg_train/data/matting.py). There are no split files: every image of a folder with a matte
beside it is one example, in file-name order.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from seg_train.data.base import FileSource
from seg_train.data.readers import (
    IGNORE_LABEL,
    IMAGE_SUFFIXES,
    PIL_ERRORS,
    DataError,
    Example,
)
from seg_train.errors import UserError

CLASS_NAMES = ("background", "person")
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = [[0, 0, 0], [192, 128, 128]]
MATTE_SUFFIX = "_matte"
LAYOUT = "<root>/{training,testing}/{NNNNN.png, NNNNN_matte.png}"
DEFAULT_SPLITS = {"train": "training", "val": "testing"}
TASKS = ("segmentation", "matting")


def binarise(alpha: np.ndarray, threshold: int) -> np.ndarray:
    """Class ids from an alpha matte: 1 (person) where alpha > threshold, else 0."""
    return (alpha > threshold).astype(np.uint8)


class PortraitSource(FileSource):
    """Lists and decodes the portrait matting set.

    Args:
        root: The folder holding `training/` and `testing/`.
        splits: Split name -> folder under root (default: train = training, val = testing).
        matte_threshold: Alpha above which a pixel is person (0..254).
        task: "segmentation" (binarised mattes) or "matting" (the raw 0..255 alpha).
        num_classes: `data.num_classes`; must be 2.
        ignore_label: `data.ignore_label`.
        on_error: `data.on_error`: raise or skip on broken examples.
    """

    name = "portrait"
    layout = LAYOUT
    dataset_num_classes = NUM_CLASSES

    def __init__(
        self,
        root: str,
        splits: Mapping[str, str] | None = None,
        matte_threshold: int = 0,
        num_classes: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        on_error: str = "raise",
        task: str = "segmentation",
    ):
        if task not in TASKS:
            raise UserError(f"data.task must be one of {', '.join(TASKS)}, got {task!r}")
        self.task = task
        self.folders = dict(splits or DEFAULT_SPLITS)
        self.splits = tuple(self.folders)
        if not (isinstance(matte_threshold, int) and 0 <= matte_threshold < 255):
            raise UserError(
                f"data.matte_threshold must be an integer in 0..254, got {matte_threshold!r}"
            )
        self.matte_threshold = matte_threshold
        # Alpha values are no class ids: matting skips the label range checks.
        super().__init__(
            root,
            num_classes=None if task == "matting" else num_classes,
            ignore_label=ignore_label,
            on_error=on_error,
        )

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise UserError(
                f"data.root {self.root} is not a directory; expected {LAYOUT} "
                "(see configs/data/portrait.yaml)"
            )
        missing = [f for f in self.folders.values() if not (self.root / f).is_dir()]
        if missing:
            raise UserError(
                f"data.root {self.root} has no {missing[0]}/ folder; expected "
                f"{LAYOUT} (see configs/data/portrait.yaml)"
            )

    def describe_split(self, split: str) -> str:
        return str(self.root / self.folders[split])

    def scan(self, split: str) -> tuple[list[Example], list[DataError]]:
        folder = self.root / self.folders[split]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images = [p for p in files if not p.stem.endswith(MATTE_SUFFIX)]
        mattes = {p.stem[: -len(MATTE_SUFFIX)]: p for p in files if p.stem.endswith(MATTE_SUFFIX)}
        examples, problems = [], []
        for image in images:
            matte = mattes.pop(image.stem, None)
            if matte is None:
                problems.append(
                    DataError(
                        folder / f"{image.stem}{MATTE_SUFFIX}.png",
                        f"missing: image {image.name} has no matte",
                    )
                )
            else:
                examples.append(Example(str(image), str(matte)))
        for stem, matte in sorted(mattes.items()):
            problems.append(DataError(matte, f"matte without an image {stem}.png"))
        return examples, problems

    def read_label(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as matte:
                # Grey mattes stay as they are; RGB ones saved by some tools go to luminance.
                alpha = np.asarray(matte.convert("L"))
        except FileNotFoundError:
            raise DataError(path, "matte file is missing") from None
        except PIL_ERRORS as exc:
            raise DataError(path, f"cannot read matte ({exc})") from None
        if self.task == "matting":
            return alpha
        return binarise(alpha, self.matte_threshold)
