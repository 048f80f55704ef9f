"""Oxford-IIIT Pet: pet / background / border trimaps, from TFDS or from the release files.

Two ways to read it (`data.format`):

* `tfds` (default): tensorflow-datasets `oxford_iiit_pet`, prepared once into a TFDS data dir
  (`data.tfds.data_dir`, default ~/tensorflow_datasets). Machines without internet access can
  put the release archives `images.tar.gz` and `annotations.tar.gz` into
  `data.tfds.manual_dir` (default <data_dir>/downloads/manual), or copy a prepared data dir.
* `raw`: the unpacked release from https://www.robots.ox.ac.uk/~vgg/data/pets/:

      <root>/                               <- data.root
        images/<name>.jpg
        annotations/trimaps/<name>.png      1 = pet, 2 = background, 3 = border
        annotations/trainval.txt            "<name> <class> <species> <breed>" per line
        annotations/test.txt

Both name the release's lists as TFDS does (`train` = trainval.txt, `test` = test.txt) and
accept TFDS slicing in `data.splits` (e.g. val: 'train[90%:]'). The order differs: TFDS
shuffled the examples when it prepared them.

Trimaps map to classes as in the TF segmentation tutorial (`trimap - 1`: 0 = pet,
1 = background, 2 = border); with `border_as_ignore` the border becomes the ignore label and
two classes remain.
"""

from __future__ import annotations

import logging
import socket
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf

from seg_train.data.base import (
    FileSource,
    Source,
)
from seg_train.data.readers import (
    IGNORE_LABEL,
    DataError,
    Example,
    Pair,
    label_counts,
    pair_ids,
    read_id_list,
    read_image,
    read_mask,
    slice_ids,
    subdir_hint,
)
from seg_train.errors import UserError

log = logging.getLogger(__name__)

CLASS_NAMES = ("pet", "background", "border")
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = [[255, 140, 0], [0, 0, 0], [255, 255, 255]]
TRIMAP_VALUES = (1, 2, 3)  # pet, background, border
TFDS_NAME = "oxford_iiit_pet"
HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
DEFAULT_SPLITS = {"train": "train", "val": "test", "test": "test"}
# The release's lists under the TFDS split names.
RAW_LISTS = {"train": "annotations/trainval.txt", "test": "annotations/test.txt"}
LAYOUT = "<root>/{images/<name>.jpg, annotations/{trimaps/<name>.png, trainval.txt, test.txt}}"


def trimap_to_labels(
    trimap: np.ndarray,
    border_as_ignore: bool = False,
    ignore_label: int = IGNORE_LABEL,
    file: str = "trimap",
) -> np.ndarray:
    """Maps a trimap (1 = pet, 2 = background, 3 = border) to class ids 0, 1, 2 (or ignore).

    Raises:
        DataError: if the trimap holds any other value.
    """
    present = np.flatnonzero(label_counts(trimap))
    unexpected = [int(v) for v in present if v not in TRIMAP_VALUES]
    if unexpected:
        raise DataError(
            file,
            f"trimap holds value(s) {unexpected}; expected only 1 = pet, "
            "2 = background, 3 = border",
        )
    return trimap_table(border_as_ignore, ignore_label).astype(np.uint8)[trimap]


def trimap_table(border_as_ignore: bool = False, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """The trimap value -> class id table (int32 [256]); values other than 1, 2, 3 map to -1."""
    table = np.full(256, -1, np.int32)
    table[1], table[2], table[3] = 0, 1, (ignore_label if border_as_ignore else 2)
    return table


class _Trimaps:
    """What both readers share: the trimap mapping and the class count it implies."""

    name = "oxford_pets"
    border_as_ignore = False

    @property
    def dataset_num_classes(self) -> int:
        return 2 if self.border_as_ignore else NUM_CLASSES

    def _check_num_classes(self) -> None:
        expected = self.dataset_num_classes
        if self.num_classes is None or self.num_classes == expected:
            return
        if self.border_as_ignore:
            raise UserError(
                f"data.border_as_ignore=true leaves 2 classes (pet, background) but "
                f"data.num_classes is {self.num_classes}; also set "
                "data.num_classes=2 'data.class_names=[pet,background]'"
            )
        raise UserError(
            f"data.num_classes={self.num_classes} contradicts data=oxford_pets, "
            "which has 3 classes (pet, background, border); drop the override, or "
            "use data.border_as_ignore=true data.num_classes=2 for two"
        )

    def labels(self, trimap: np.ndarray, file: str) -> np.ndarray:
        return trimap_to_labels(trimap, self.border_as_ignore, self.ignore_label, file)

    def label_lookup(self) -> np.ndarray:
        return self.checked_lookup(trimap_table(self.border_as_ignore, self.ignore_label))


def _check_split_specs(splits: Mapping[str, str]) -> dict[str, str]:
    splits = {str(k): str(v) for k, v in dict(splits).items()}
    if not splits:
        raise UserError(
            "data.splits is empty; map at least train and val to TFDS split names, "
            "e.g. train: train, val: test"
        )
    return splits


class OxfordPetsRaw(_Trimaps, FileSource):
    """Reads the unpacked Oxford-IIIT Pet release (`data.format=raw`).

    Args:
        root: The folder holding `images/` and `annotations/`.
        splits: seg-train split -> TFDS-style expression over `train` (trainval.txt) and
            `test` (test.txt), e.g. {"train": "train[:90%]", "val": "train[90%:]"}.
        border_as_ignore: Map the border (trimap 3) to the ignore label.
        num_classes: `data.num_classes` (3, or 2 with border_as_ignore).
        ignore_label: `data.ignore_label`.
        on_error: `data.on_error`: raise or skip on broken examples.
    """

    layout = LAYOUT

    def __init__(
        self,
        root: str | None,
        splits: Mapping[str, str] | None = None,
        border_as_ignore: bool = False,
        num_classes: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        on_error: str = "raise",
    ):
        self.specs = _check_split_specs(splits or DEFAULT_SPLITS)
        self.splits = tuple(self.specs)
        self.border_as_ignore = border_as_ignore
        super().__init__(
            root, num_classes=num_classes, ignore_label=ignore_label, on_error=on_error
        )

    def check_root(self) -> None:
        if not (self.root / "images").is_dir() or not (self.root / "annotations").is_dir():
            hint = subdir_hint(self.root, ("oxford-iiit-pet",))
            raise UserError(
                f"data.root {self.root} is not the Oxford-IIIT Pet release{hint}; "
                f"expected {LAYOUT} (images.tar.gz + annotations.tar.gz from "
                f"{HOMEPAGE}, see configs/data/oxford_pets.yaml)"
            )

    def describe_split(self, split: str) -> str:
        return f"{self.root / 'annotations'}: {self.specs[split]}"

    def scan(self, split: str) -> tuple[list[Example], list[DataError]]:
        spec = self.specs[split]
        referenced = {part.split("[")[0].strip() for part in spec.split("+")}
        unknown = referenced - set(RAW_LISTS)
        if unknown:
            raise UserError(
                f"data.splits.{split}={spec} names {sorted(unknown)}; the release "
                "has train (trainval.txt) and test (test.txt)"
            )
        lists = {
            name: read_id_list(self.root / RAW_LISTS[name], f"data.splits.{split}={spec}")
            for name in sorted(referenced)
        }
        return pair_ids(
            slice_ids(spec, lists),
            f"listed in data.splits.{split}",
            self.root / "images",
            self.root / "annotations" / "trimaps",
        )

    def read_label(self, path: str) -> np.ndarray:
        return self.labels(read_mask(path), path)


class OxfordPetsTFDS(_Trimaps, Source):
    """Reads tensorflow-datasets `oxford_iiit_pet`, preparing it on first use if possible.

    Args:
        splits: seg-train split -> TFDS split expression (e.g. {"val": "train[90%:]"}).
        data_dir: TFDS data dir; None = the TFDS default (~/tensorflow_datasets).
        manual_dir: Folder with the release archives for offline preparation; None = TFDS's
            default (<data_dir>/downloads/manual).
        download: Whether to download and prepare the dataset if it is not prepared yet.
        border_as_ignore: Map the border (trimap 3) to the ignore label.
        num_classes: `data.num_classes` (3, or 2 with border_as_ignore).
        ignore_label: `data.ignore_label`.
        on_error: `data.on_error`: raise or skip on broken examples.
    """

    def __init__(
        self,
        splits: Mapping[str, str] | None = None,
        data_dir: str | None = None,
        manual_dir: str | None = None,
        download: bool = True,
        border_as_ignore: bool = False,
        num_classes: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        on_error: str = "raise",
    ):
        import tensorflow_datasets as tfds

        self.specs = _check_split_specs(splits or DEFAULT_SPLITS)
        self.splits = tuple(self.specs)
        self.border_as_ignore = border_as_ignore
        super().__init__(num_classes=num_classes, ignore_label=ignore_label, on_error=on_error)
        self._tfds = tfds
        self.builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
        self._prepare(manual_dir, download)

    def _prepare(self, manual_dir: str | None, download: bool) -> None:
        builder = self.builder
        if builder.is_prepared():
            return
        root = Path(str(builder.data_dir_root))
        manual = Path(manual_dir).expanduser() if manual_dir else root / "downloads" / "manual"
        archives = [info.filename for info in builder.url_infos.values()]
        have_archives = all((manual / name).is_file() for name in archives)
        how = (
            f"copy a prepared {TFDS_NAME} folder into {root} (data.tfds.data_dir), or put "
            f"{' and '.join(archives)} from {HOMEPAGE} into {manual} (data.tfds.manual_dir), "
            "or unpack them and use data.format=raw data.root=DIR"
        )
        where = f"TFDS {TFDS_NAME} is not prepared in {root}"
        if not have_archives:
            if not download:
                raise UserError(f"{where} and data.tfds.download=false; {how}")
            host = urlparse(next(iter(builder.url_infos))).hostname
            if not _reachable(host):
                # Offline, TFDS retries every download for minutes before it gives up.
                raise UserError(f"{where} and {host} cannot be reached (offline?); {how}")
        log.info("Preparing TFDS %s in %s (once) ...", TFDS_NAME, root)
        config = self._tfds.download.DownloadConfig(
            manual_dir=str(manual), try_download_gcs=not have_archives
        )
        try:
            builder.download_and_prepare(download_config=config)
        except ImportError as exc:
            raise UserError(
                f"preparing TFDS {TFDS_NAME} needs the Python package '{exc.name}' "
                f"(pip install {exc.name}); or use data.format=raw data.root=DIR"
            ) from None
        except Exception as exc:  # noqa: BLE001 - network, checksum and archive errors alike
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{where} and preparing it failed ({first}); {how}") from None

    def describe_split(self, split: str) -> str:
        return f"tfds {TFDS_NAME}:{self.builder.version} {self.specs[split]}"

    def records(self, split: str) -> tf.data.Dataset:
        self.check_split(split)
        skip = self._tfds.decode.SkipDecoding()
        try:
            examples = self.builder.as_dataset(
                split=self.specs[split],
                shuffle_files=False,
                decoders={"image": skip, "segmentation_mask": skip},
            )
        except (ValueError, KeyError, AssertionError) as exc:
            raise UserError(
                f"data.splits.{split}={self.specs[split]}: {exc}; use TFDS split "
                "syntax over train and test, e.g. 'train[:90%]'"
            ) from None
        return examples.map(
            lambda ex: (ex["file_name"], ex["image"], ex["segmentation_mask"]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def load(self, name: str, image: bytes, mask: bytes) -> Pair:
        trimap_name = f"{name} (segmentation_mask)"
        trimap = read_mask(mask, name=trimap_name)
        return Pair(
            read_image(image, name=name), self.labels(trimap, trimap_name), name, trimap_name
        )


def make_source(
    format: str = "tfds",
    root: str | None = None,
    splits: Mapping[str, str] | None = None,
    border_as_ignore: bool = False,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = True,
    num_classes: int | None = None,
    ignore_label: int = IGNORE_LABEL,
    on_error: str = "raise",
) -> Source:
    """The Oxford-IIIT Pet decoder for `data.format` (tfds or raw); see the two classes."""
    if format == "raw":
        return OxfordPetsRaw(root, splits, border_as_ignore, num_classes, ignore_label, on_error)
    if format == "tfds":
        return OxfordPetsTFDS(
            splits,
            data_dir,
            manual_dir,
            download,
            border_as_ignore,
            num_classes,
            ignore_label,
            on_error,
        )
    raise UserError(f"data.format must be tfds or raw, got {format!r}")


def _reachable(host: str | None) -> bool:
    """Whether `host` resolves (or a proxy is configured, which resolves it for us)."""
    if not host or urllib.request.getproxies():
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
