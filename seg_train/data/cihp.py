"""CIHP (Crowd Instance-level Human Parsing): 20 human-part classes.

`data.root` is the `instance-level_human_parsing` folder of the release:

    instance-level_human_parsing/       <- data.root
      human_colormap.mat                the palette (optional; a built-in copy is used otherwise)
      Training/
        Images/<id>.jpg
        Category_ids/<id>.png           8-bit grey, pixel value = class id 0..19
        train_id.txt
      Validation/
        Images/<id>.jpg
        Category_ids/<id>.png
        val_id.txt

Left/right classes (arms, legs, shoes) must swap when an image is mirrored; `FLIP_PAIRS` lists
them for the pipeline (`data.flip_pairs`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from seg_train.data.base import FileSource
from seg_train.data.readers import (
    IGNORE_LABEL,
    DataError,
    Example,
    pair_ids,
    read_id_list,
    subdir_hint,
)
from seg_train.errors import UserError

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "Background",
    "Hat",
    "Hair",
    "Glove",
    "Sunglasses",
    "UpperClothes",
    "Dress",
    "Coat",
    "Socks",
    "Pants",
    "Torso-skin",
    "Scarf",
    "Skirt",
    "Face",
    "Left-arm",
    "Right-arm",
    "Left-leg",
    "Right-leg",
    "Left-shoe",
    "Right-shoe",
)
NUM_CLASSES = len(CLASS_NAMES)
# The standard CIHP/LIP colours, as stored (scaled to 0..1) in the release's human_colormap.mat.
PALETTE = [
    [0, 0, 0],
    [128, 0, 0],
    [255, 0, 0],
    [0, 85, 0],
    [170, 0, 51],
    [255, 85, 0],
    [0, 0, 85],
    [0, 119, 221],
    [85, 85, 0],
    [0, 85, 85],
    [85, 51, 0],
    [52, 86, 128],
    [0, 128, 0],
    [0, 0, 255],
    [51, 170, 221],
    [0, 255, 255],
    [85, 255, 170],
    [170, 255, 85],
    [255, 255, 0],
    [255, 170, 0],
]
# (left, right) ids that trade places under a horizontal flip.
FLIP_PAIRS = ((14, 15), (16, 17), (18, 19))
COLORMAP_FILE = "human_colormap.mat"
LAYOUT = (
    "instance-level_human_parsing/{Training/{Images/<id>.jpg, Category_ids/<id>.png, "
    "train_id.txt}, Validation/{Images, Category_ids, val_id.txt}}"
)
# split -> (folder, id list)
SPLIT_FILES = {"train": ("Training", "train_id.txt"), "val": ("Validation", "val_id.txt")}


def load_palette(path: str | Path) -> list[list[int]]:
    """Reads a `human_colormap.mat` (MATLAB [N, 3] colours in 0..1) as 0..255 RGB triples.

    Raises:
        DataError: if the file cannot be read or holds no [N, 3] `colormap`.
        ImportError: if SciPy is not installed.
    """
    import scipy.io  # optional: only needed when the release's colormap is present

    try:
        colormap = np.asarray(scipy.io.loadmat(str(path))["colormap"], dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - SciPy raises many types for a damaged file
        raise DataError(path, f"cannot read the colormap ({exc!r})") from None
    if colormap.ndim != 2 or colormap.shape[1] != 3 or colormap.max() > 1.0 + 1e-6:
        raise DataError(path, f"colormap has shape {colormap.shape}; expected [N, 3] in 0..1")
    return np.rint(colormap * 255).astype(int).tolist()


class CIHPSource(FileSource):
    """Lists and decodes CIHP in the release layout.

    Args:
        root: The `instance-level_human_parsing` folder.
        num_classes: `data.num_classes`; must be 20.
        ignore_label: `data.ignore_label`.
        on_error: `data.on_error`: raise or skip on broken examples.

    Attributes:
        palette: The release's colours from `human_colormap.mat` when readable, else `PALETTE`.
        palette_origin: Where `palette` came from, for reports.
    """

    name = "cihp"
    layout = LAYOUT
    splits = ("train", "val")
    dataset_num_classes = NUM_CLASSES

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        on_error: str = "raise",
    ):
        super().__init__(
            root, num_classes=num_classes, ignore_label=ignore_label, on_error=on_error
        )
        self.palette, self.palette_origin = self._palette()

    def _palette(self) -> tuple[list[list[int]], str]:
        path = self.root / COLORMAP_FILE
        if not path.is_file():
            return PALETTE, f"built-in ({COLORMAP_FILE} not found)"
        try:
            return load_palette(path)[:NUM_CLASSES], str(path)
        except (DataError, ImportError) as exc:
            # Only overlays use the palette, so a bad colormap must not stop training.
            log.warning("Using the built-in CIHP palette: %s", exc)
            return PALETTE, f"built-in ({exc})"

    def check_root(self) -> None:
        if not (self.root / "Training" / "Category_ids").is_dir():
            hint = subdir_hint(
                self.root,
                (
                    "instance-level_human_parsing",
                    "instance-level_human_parsing/instance-level_human_parsing",
                ),
            )
            raise UserError(
                f"data.root {self.root} is not the CIHP folder{hint}; expected "
                f"{LAYOUT} (see configs/data/cihp.yaml)"
            )

    def describe_split(self, split: str) -> str:
        folder, id_file = SPLIT_FILES[split]
        return str(self.root / folder / id_file)

    def scan(self, split: str) -> tuple[list[Example], list[DataError]]:
        folder, id_file = SPLIT_FILES[split]
        base = self.root / folder
        split_file = base / id_file
        ids = read_id_list(split_file, f"CIHP split '{split}'")
        return pair_ids(ids, f"id listed in {split_file}", base / "Images", base / "Category_ids")
