"""The generic folder layout: `images/`, `masks/` and `splits/{train,val}.txt` under one root.

    root/
      images/<stem>.jpg|.jpeg|.png|.bmp   RGB (grayscale / RGBA are converted)
      masks/<stem>.png                    class ids, 255 = ignore (8-bit grey or palette PNG)
      splits/train.txt, splits/val.txt   one <stem> per line (the whole line: spaces allowed)

Images in other formats (.webp, .tif) and masks in any format but PNG are refused by name.
"""

from __future__ import annotations

from pathlib import Path

from seg_train.data.base import FileSource
from seg_train.data.readers import (
    IGNORE_LABEL,
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    DataError,
    Example,
    missing_file_hint,
    read_id_list,
    read_mask,
)
from seg_train.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "Example", "FolderSource", "read_mask"]


class FolderSource(FileSource):
    """Lists and decodes a dataset stored in the generic folder layout.

    Args:
        root: The dataset's top folder, holding `images/`, `masks/` and `splits/`.
        num_classes: `data.num_classes`, for the label range check (None = no check).
        ignore_label: `data.ignore_label`.
        on_error: `data.on_error`: raise or skip on broken examples.
    """

    name = "folder"
    layout = "root/{images/<stem>.jpg|png, masks/<stem>.png, splits/{train,val}.txt}"

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

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise UserError(
                f"data.root {self.root} is not a directory; point data.root at the "
                "folder holding images/, masks/ and splits/"
            )

    def describe_split(self, split: str) -> str:
        return str(self.root / "splits" / f"{split}.txt")

    def check_split(self, split: str) -> None:
        # Any splits/<name>.txt is a split of this layout; a missing one is reported by scan.
        pass

    def scan(self, split: str) -> tuple[list[Example], list[DataError]]:
        split_file = self.root / "splits" / f"{split}.txt"
        if not split_file.is_file():
            raise UserError(
                f"split file {split_file} is missing; write one image stem per line "
                f"for the '{split}' split"
            )
        examples, problems = [], []
        images, masks = self.root / "images", self.root / "masks"
        for stem in read_id_list(split_file, f"split '{split}'", whole_line=True):
            image = self._find_image(stem)
            mask = masks / f"{stem}.png"
            if image is None:
                hint = missing_file_hint(images, stem, IMAGE_SUFFIXES)
                problems.append(
                    DataError(
                        images / f"{stem}.*",
                        f"no image for stem '{stem}' listed in {split_file}{hint}",
                    )
                )
            elif not mask.is_file():
                hint = missing_file_hint(masks, stem, MASK_SUFFIXES)
                problems.append(DataError(mask, f"no mask for image {image}{hint}"))
            else:
                examples.append(Example(str(image), str(mask)))
        return examples, problems

    def _find_image(self, stem: str) -> Path | None:
        for suffix in IMAGE_SUFFIXES:
            candidate = self.root / "images" / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
        return None
