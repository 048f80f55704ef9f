"""The decoder interface every dataset implements: `Source`, and `FileSource` for files.

A *source* knows one dataset's layout. It turns a split into records and a record into one
decoded pair; `pipeline.py` does everything after that:

* `splits`: the split names the dataset defines (every dataset has "train" and "val").
* `records(split)` -> a `tf.data.Dataset` of `(name, image, mask)` string scalars in a fixed
  order with a known cardinality (`num_examples(split)`). For datasets of files `image` and
  `mask` are paths; for TFDS they are the encoded bytes. Records are small, so shuffling them
  before decoding is cheap. Examples with a missing file are left out of the records and
  reported by `listing_problems(split)`; `check_listing(split)` applies `on_error` to them.
* `load(name, image, mask)` -> `Pair`: the NumPy decode of one record to a uint8 RGB image
  [H, W, 3] and a uint8 class-id mask [H, W] with the dataset's label mapping applied
  (255 = ignore). Anything unreadable raises `DataError`, which names the file.
* `problems(pair)` -> what is wrong with a decoded pair (size mismatch, labels out of range).
  Kept apart from `load` so the dataset doctor can still count the labels of a mask it reports.

The user's own remapping (`data.mask_threshold`, then `data.label_map`; the task's
`seg_train.tasks.sources.build_source` sets it through `set_label_map`) is one 256-entry table
applied after the dataset's mapping: `decode` applies it to what `load` returns (the Pillow
path), and `checked_lookup` composes it into every `label_lookup` (the in-graph path), so both
paths give the same labels.

`load` decodes with Pillow (`readers.py`), the reference decode. The training and evaluation
pipeline decodes the common file kinds in the graph instead, bit-identical to `load`, and falls
back to `load` for everything else (`decode.py`); `label_lookup` tells it a source's label
mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf

from seg_train.data.readers import (
    IGNORE_LABEL,
    DataError,
    Example,
    Pair,
    label_counts,
    orientation_cause,
    read_image,
    read_mask,
    remap_table,
    short_list,
)
from seg_train.errors import UserError

log = logging.getLogger(__name__)


class Source:
    """Base class of the dataset decoders; see the module docstring for the interface.

    Args:
        num_classes: The configured class count (`data.num_classes`); labels must lie in
            0..num_classes-1 or be `ignore_label`. None skips the range check.
        ignore_label: The label that marks pixels to ignore.
        on_error: "raise" stops at the first broken example; "skip" drops broken examples
            and counts them in the log.
    """

    #: The dataset's name in messages.
    name = "dataset"
    #: The splits the dataset defines (the doctor scans all of them by default).
    splits: tuple[str, ...] = ("train", "val")
    #: The dataset's intrinsic class count, if it has one; a contradicting num_classes fails.
    dataset_num_classes: int | None = None
    #: Records hold file paths rather than encoded bytes.
    records_are_paths = False

    def __init__(
        self,
        num_classes: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        on_error: str = "raise",
    ):
        # data.on_error's values are checked with the other config rules (config_checks).
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.on_error = on_error
        self._check_num_classes()

    def _check_num_classes(self) -> None:
        expected = self.dataset_num_classes
        if expected is not None and self.num_classes is not None and self.num_classes != expected:
            raise UserError(
                f"data.num_classes={self.num_classes} contradicts data={self.name}, "
                f"which has {expected} classes; drop the data.num_classes override "
                "(and data.class_names with it)"
            )

    def check_split(self, split: str) -> None:
        """Raises a `UserError` for a split the dataset does not define."""
        if split not in self.splits:
            raise UserError(
                f"data={self.name} has no split '{split}' (splits: "
                f"{', '.join(self.splits)}); pick one of those, e.g. eval.split=val"
            )

    def describe_split(self, split: str) -> str:
        """Where a split comes from, for reports (two splits with equal descriptions are equal)."""
        return split

    def records(self, split: str) -> tf.data.Dataset:
        """The split's `(name, image, mask)` string records; see the module docstring."""
        raise NotImplementedError

    def label_lookup(self) -> np.ndarray | None:
        """The mask -> label mapping as a table the tf.data graph can apply, if there is one.

        Returns:
            int32 [256]: the label of each raw mask value, -1 for a value only `load` may
            judge (out of range, or not a value the dataset uses); or None when masks need
            `load` (e.g. mattes thresholded from any image mode). See `decode.py`.
        """
        return None

    def checked_lookup(self, labels: np.ndarray) -> np.ndarray:
        """`labels` (a raw value -> label table) after the user's remap (`set_label_map`), with
        the labels `problems` rejects set to -1. Every `label_lookup` goes through here."""
        table = labels.astype(np.int32)
        if self.remap is not None:  # -1 (a value only `load` may judge) stays -1
            table = np.where(table >= 0, self.remap[np.clip(table, 0, 255)].astype(np.int32), -1)
        if self.num_classes is not None:
            table[(table >= self.num_classes) & (table != self.ignore_label)] = -1
        return table

    def load(self, name: str, image: bytes, mask: bytes) -> Pair:
        """Decodes one record; raises `DataError` for unreadable data."""
        raise NotImplementedError

    #: The user's value -> label table (uint8 [256]) from `set_label_map`; None = as decoded.
    remap: np.ndarray | None = None

    def set_label_map(
        self, label_map: Mapping[int, int] | None = None, mask_threshold: int | None = None
    ) -> None:
        """Remaps decoded mask values: `mask_threshold` first, then `label_map`.

        Args:
            label_map: {value: label}, e.g. {255: 1} for 0/255 binary masks, or {0: 255} to
                ignore a value; values not listed keep their label.
            mask_threshold: For soft or binary masks: values above it become 1, the others 0.

        Raises:
            UserError: for a key or label outside 0..255, or a label that is no class id.
        """
        self.remap = remap_table(label_map, mask_threshold, self.num_classes, self.ignore_label)

    def decode(self, name: str, image: bytes, mask: bytes) -> Pair:
        """`load` with the user's remap applied to the mask (what training sees)."""
        pair = self.load(name, image, mask)
        if self.remap is not None:
            pair.mask = self.remap[pair.mask]
        return pair

    def num_examples(self, split: str) -> int:
        """Number of records in a split."""
        return int(self.records(split).cardinality())

    def listing_problems(self, split: str) -> list[DataError]:
        """Missing or unpaired files of a split (datasets of files); the records omit them."""
        return []

    def check_listing(self, split: str) -> None:
        """Applies `on_error` to the split's missing/unpaired files.

        Raises:
            UserError: with `on_error=raise`, naming the first incomplete example; with
                `on_error=skip` the incomplete examples are only counted in the log.
        """
        problems = self.listing_problems(split)
        if not problems:
            return
        if self.on_error == "raise":
            count = len(problems)
            raise UserError(
                f"split '{split}' has {count} incomplete example"
                f"{'s' if count > 1 else ''} (first: {problems[0]}); add the missing "
                "files or remove them from the split, or set data.on_error=skip"
            )
        log.warning(
            "data.on_error=skip: leaving out %d incomplete examples of split '%s' (first: %s)",
            len(problems),
            split,
            problems[0],
        )

    def problems(self, pair: Pair) -> list[DataError]:
        """What is wrong with a decoded pair: size mismatch, labels out of range."""
        found = []
        if pair.mask.shape != pair.image.shape[:2]:
            (mh, mw), (ih, iw) = pair.mask.shape, pair.image.shape[:2]
            found.append(
                DataError(
                    pair.mask_file,
                    f"mask is {mw}x{mh} but its image "
                    f"{pair.image_file} is {iw}x{ih}"
                    f"{orientation_cause(pair.image_file)}; masks must match "
                    "their images",
                )
            )
        if self.num_classes is not None:
            present = np.flatnonzero(label_counts(pair.mask))
            bad = [int(v) for v in present if v >= self.num_classes and v != self.ignore_label]
            if bad:
                found.append(
                    DataError(
                        pair.mask_file,
                        f"mask holds label(s) {short_list(bad)} "
                        f"outside 0..{self.num_classes - 1} and "
                        f"{self.ignore_label} (ignore); fix the mask or "
                        "data.num_classes",
                    )
                )
        return found


class FileSource(Source):
    """A dataset of image and mask files under `root`, listed per split by `scan`.

    Subclasses implement `scan` and may override `read_label` (for masks that need a label
    mapping) and `check_root`.

    Args:
        root: The dataset's top folder (`data.root`).
        num_classes: See `Source`.
        ignore_label: See `Source`.
        on_error: See `Source`; "skip" also drops examples whose files are missing.
    """

    #: A one-line picture of the expected tree, for the missing-root message.
    layout = "root/"
    #: Records hold file paths (read in the graph), not encoded bytes.
    records_are_paths = True

    def __init__(
        self,
        root: str | None,
        num_classes: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        on_error: str = "raise",
    ):
        super().__init__(num_classes=num_classes, ignore_label=ignore_label, on_error=on_error)
        if root is None or str(root) in ("", "None"):
            raise UserError(
                f"data={self.name} needs data.root: the folder laid out as "
                f"{self.layout}; set data.root=DIR"
            )
        self.root = Path(str(root)).expanduser()
        self._listings: dict[str, tuple[list[Example], list[DataError]]] = {}
        self.check_root()

    def check_root(self) -> None:
        """Raises a `UserError` showing the expected tree if `root` does not look right."""
        if not self.root.is_dir():
            raise UserError(
                f"data.root {self.root} is not a directory; point data.root at the "
                f"folder laid out as {self.layout}"
            )

    def scan(self, split: str) -> tuple[list[Example], list[DataError]]:
        """Lists a split: (complete examples in order, one `DataError` per missing/unpaired file).

        Raises:
            UserError: if the split itself cannot be listed (e.g. its split file is missing).
        """
        raise NotImplementedError

    def _scan(self, split: str) -> tuple[list[Example], list[DataError]]:
        self.check_split(split)
        if split not in self._listings:
            self._listings[split] = self.scan(split)
        return self._listings[split]

    def listing_problems(self, split: str) -> list[DataError]:
        return self._scan(split)[1]

    def examples(self, split: str) -> list[Example]:
        """The split's complete examples, after applying `on_error` to the incomplete ones."""
        self.check_listing(split)
        return self._complete(split)

    def _complete(self, split: str) -> list[Example]:
        examples, problems = self._scan(split)
        if not examples:
            first = f" (all {len(problems)} incomplete; first: {problems[0]})" if problems else ""
            raise UserError(
                f"split '{split}' of data={self.name} under {self.root} has no "
                f"complete example{first}; check data.root and the split's files"
            )
        return examples

    def num_examples(self, split: str) -> int:
        return len(self._complete(split))

    def records(self, split: str) -> tf.data.Dataset:
        examples = self._complete(split)
        names = [Path(e.image_path).stem for e in examples]
        return tf.data.Dataset.from_tensor_slices(
            (names, [e.image_path for e in examples], [e.mask_path for e in examples])
        )

    def read_label(self, path: str) -> np.ndarray:
        """Reads a mask file as class ids (override to apply a label mapping)."""
        return read_mask(path)

    def label_lookup(self) -> np.ndarray | None:
        # Pixel values are the ids, unless a subclass maps them in its own `read_label` (it
        # then says how in its own `label_lookup`, or its masks go through Python).
        if type(self).read_label is not FileSource.read_label:
            return None
        return self.checked_lookup(np.arange(256))

    def load(self, name: str, image: bytes | str, mask: bytes | str) -> Pair:
        image_file = image.decode() if isinstance(image, bytes) else image
        mask_file = mask.decode() if isinstance(mask, bytes) else mask
        return Pair(read_image(image_file), self.read_label(mask_file), image_file, mask_file)
