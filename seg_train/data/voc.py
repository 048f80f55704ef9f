"""PASCAL VOC 2012 segmentation, optionally with the SBD-augmented training set ("aug").

`data.root` is the `VOC2012` folder of the official release (VOCtrainval_11-May-2012.tar):

    VOCdevkit/VOC2012/                  <- data.root
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png        palette PNGs: pixel value = class id, 255 = boundary
      ImageSets/Segmentation/{train,val,trainval}.txt
      SegmentationClassAug/<id>.png     with data.aug=true (scripts/prepare_voc_aug.py)
      ImageSets/Segmentation/train_aug.txt
      ImageSets/Segmentation/train_sbd.txt  SBD train (8,498 ids), data.train_list=train_sbd

The masks are read as palette *indices* (by Pillow, or in the graph by `decode.py`);
decoding them through RGB would give colours, not ids. With `data.aug=true` the train split
becomes the 10,582 images of `train_aug.txt` = (VOC train + SBD train + SBD val) - VOC val with
their SegmentationClassAug masks, as in DeepLab; val stays the official 1,449 images.
`data.train_list` names another training list in ImageSets/Segmentation: `train_sbd` is the
8,498 ids of SBD's own train.txt that the FCN reference trains on (also written by
scripts/prepare_voc_aug.py; its masks come from SegmentationClassAug, so it needs data.aug).
"""

from __future__ import annotations

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
from seg_train.viz import voc_palette

CLASS_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
NUM_CLASSES = len(CLASS_NAMES)


# The devkit colour map (bit-interleaved ids); SegmentationClass PNGs carry it as their palette.
PALETTE = voc_palette(NUM_CLASSES).tolist()
LAYOUT = (
    "VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
    "ImageSets/Segmentation/{train,val,trainval}.txt}"
)
AUG_MASKS = "SegmentationClassAug"
AUG_LIST = "ImageSets/Segmentation/train_aug.txt"
SPLIT_DIR = "ImageSets/Segmentation"


class VOCSource(FileSource):
    """Lists and decodes PASCAL VOC 2012 (and SBD aug) in the official layout.

    Args:
        root: The `VOC2012` folder.
        aug: Train on `train_aug.txt` with `SegmentationClassAug/` masks.
        train_list: Another training list in ImageSets/Segmentation (file stem, e.g.
            "train_sbd"); None = train.txt, or train_aug.txt with `aug`.
        num_classes: `data.num_classes`; must be 21.
        ignore_label: `data.ignore_label`.
        on_error: `data.on_error`: raise or skip on broken examples.
    """

    name = "voc"
    layout = LAYOUT
    splits = ("train", "val")
    dataset_num_classes = NUM_CLASSES

    def __init__(
        self,
        root: str,
        aug: bool = False,
        num_classes: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        on_error: str = "raise",
        train_list: str | None = None,
    ):
        self.aug = aug
        self.train_list = train_list
        super().__init__(
            root, num_classes=num_classes, ignore_label=ignore_label, on_error=on_error
        )

    def check_root(self) -> None:
        if not all((self.root / sub).is_dir() for sub in ("JPEGImages", "SegmentationClass")):
            hint = subdir_hint(self.root, ("VOC2012", "VOCdevkit/VOC2012"))
            raise UserError(
                f"data.root {self.root} is not the VOC2012 folder{hint}; expected "
                f"{LAYOUT} (from VOCtrainval_11-May-2012.tar, see "
                "configs/data/voc.yaml)"
            )
        if self.aug and not ((self.root / AUG_MASKS).is_dir() and (self.root / AUG_LIST).is_file()):
            raise UserError(
                f"data.aug=true needs {self.root / AUG_MASKS}/ and "
                f"{self.root / AUG_LIST}; build them from the SBD release with "
                "scripts/prepare_voc_aug.py, or set data.aug=false"
            )
        if self.train_list is not None:
            listed = self.root / SPLIT_DIR / f"{self.train_list}.txt"
            if not self.aug or not listed.is_file():
                raise UserError(
                    f"data.train_list={self.train_list} needs {listed} and data.aug="
                    "true (its masks are in SegmentationClassAug/); build them with "
                    "scripts/prepare_voc_aug.py, or set data.train_list=null"
                )

    def check_split(self, split: str) -> None:
        # Any list in ImageSets/Segmentation is a split (trainval, or seg11valid for FCN's
        # protocol); only train and val are scanned by default, as the others repeat them.
        if split not in self.splits and not self._split_file_and_masks(split)[0].is_file():
            raise UserError(
                f"data=voc has no split '{split}': "
                f"{self._split_file_and_masks(split)[0]} is missing (splits: "
                f"{', '.join(self.splits)}, or any list in ImageSets/Segmentation)"
            )

    def _split_file_and_masks(self, split: str):
        if split == "train" and self.train_list is not None:
            return self.root / SPLIT_DIR / f"{self.train_list}.txt", self.root / AUG_MASKS
        if split == "train" and self.aug:
            return self.root / AUG_LIST, self.root / AUG_MASKS
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        return split_file, self.root / "SegmentationClass"

    def describe_split(self, split: str) -> str:
        return str(self._split_file_and_masks(split)[0])

    def scan(self, split: str) -> tuple[list[Example], list[DataError]]:
        split_file, mask_dir = self._split_file_and_masks(split)
        ids = read_id_list(split_file, f"VOC split '{split}'")
        return pair_ids(ids, f"id listed in {split_file}", self.root / "JPEGImages", mask_dir)
