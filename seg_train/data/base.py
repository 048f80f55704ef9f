"""The decoder interface every dataset implements, and the file readers the datasets share.

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

The user's own remapping (`data.mask_threshold`, then `data.label_map`; `build_source` sets
it) is one 256-entry table applied after the dataset's mapping: `decode` applies it to what
`load` returns (the Pillow path), and `checked_lookup` composes it into every `label_lookup`
(the in-graph path), so both paths give the same labels.

`load` decodes with Pillow, the reference decode: masks never through an RGB path (TensorFlow
expands palette PNGs, PASCAL VOC style, to colours, losing the class ids that the palette
indices are), and a Python decode can name a broken file. The training and evaluation pipeline
decodes the common file kinds in the graph instead, bit-identical to `load`, and falls back to
`load` for everything else (`graph_decode.py`); `label_lookup` tells it a source's label
mapping.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

from seg_train.errors import UserError

log = logging.getLogger(__name__)

IGNORE_LABEL = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MASK_SUFFIXES = (".png",)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The EXIF orientation tag (0x0112): 1 = stored as displayed; 2..8 = mirrored and/or rotated.
EXIF_ORIENTATION = 0x0112
_ROTATIONS = {
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped vertically",
    5: "transposed",
    6: "rotated 90° clockwise",
    7: "transversed",
    8: "rotated 90° anticlockwise",
}
_warned_orientation: set[str] = set()
ON_ERROR_CHOICES = ("raise", "skip")
# Pillow's complaints about a broken file: unreadable/truncated data (OSError, including
# UnidentifiedImageError), bad headers (SyntaxError, ValueError), absurd sizes.
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(Exception):
    """One broken example: names the file and what is wrong with it.

    Args:
        file: The culprit: a path, or a record name for datasets that are not files.
        problem: What is wrong, in a few words.
    """

    def __init__(self, file: str, problem: str):
        super().__init__(f"{file}: {problem}")
        self.file = str(file)
        self.problem = problem


@dataclass(frozen=True)
class Example:
    """One image and its mask on disk."""

    image_path: str
    mask_path: str


@dataclass
class Pair:
    """One decoded example and the files it came from (for messages)."""

    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # uint8 [H, W], class ids, 255 = ignore
    image_file: str
    mask_file: str


def _open(source: str | bytes | Path, name: str | None = None) -> Image.Image:
    """Opens a path, or encoded bytes when `name` (the record name for messages) is given."""
    if name is not None:
        return Image.open(io.BytesIO(source))
    return Image.open(source.decode() if isinstance(source, bytes) else source)


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation tag of an open image: 1 (as stored) when absent or invalid."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except PIL_ERRORS:
        return 1
    return value if value in _ROTATIONS else 1


def file_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of an image file (1 when absent or unreadable)."""
    try:
        with Image.open(path) as image:
            return orientation_of(image)
    except PIL_ERRORS:
        return 1


def displayed(image: Image.Image, label: str) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied, with a WARNING (once per file).

    Training, evaluation and inference all see images this way, so a photo taken sideways is
    learnt and predicted upright, and its mask must match the displayed size.
    """
    orientation = orientation_of(image)
    if orientation == 1:
        return image
    if label not in _warned_orientation:
        _warned_orientation.add(label)
        log.warning(
            "%s: EXIF orientation %d: using the image %s, as viewers show it (its mask "
            "must match that orientation)",
            label,
            orientation,
            _ROTATIONS[orientation],
        )
    return ImageOps.exif_transpose(image)


def read_image(source: str | bytes | Path, name: str | None = None) -> np.ndarray:
    """Reads an image file (or encoded bytes) as uint8 RGB [H, W, 3], EXIF orientation applied.

    Grey, palette, CMYK and RGBA images are converted, as the Oxford-IIIT Pet release holds a
    few of each under `.jpg` names.

    Raises:
        DataError: if the data is not a readable image.
    """
    label = name or (source.decode() if isinstance(source, bytes) else str(source))
    try:
        with _open(source, name) as image:
            return np.asarray(displayed(image, label).convert("RGB"))
    except FileNotFoundError:
        raise DataError(label, "image file is missing") from None
    except PIL_ERRORS as exc:
        raise DataError(label, f"cannot read image ({exc})") from None


def read_mask(source: str | bytes | Path, name: str | None = None) -> np.ndarray:
    """Reads a class-id mask PNG (8-bit grey or palette) as uint8 [H, W] of its pixel values.

    Raises:
        DataError: if the file is unreadable, or is a colour image rather than ids.
    """
    label = name or (source.decode() if isinstance(source, bytes) else str(source))
    try:
        with _open(source, name) as mask:
            if mask.format != "PNG":
                # JPEG's lossy compression changes label values at every edge (even creating
                # ids of no class), so a mask must be a PNG whatever its name says.
                raise DataError(
                    label,
                    f"mask is a {mask.format or 'non-PNG'} file, not a PNG "
                    "(no PNG signature); lossy formats change class ids: save "
                    "it as an 8-bit grey or palette PNG from the original labels",
                )
            if mask.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
                raise DataError(
                    label,
                    f"mask is an {mask.mode} colour image, not class ids; save "
                    "one 8-bit grey or palette PNG whose pixel values are the ids",
                )
            if mask.mode not in ("L", "P"):
                raise DataError(
                    label,
                    f"mask has mode {mask.mode}; expected an 8-bit grey or "
                    "palette PNG of class ids",
                )
            return np.asarray(mask, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(label, "mask file is missing") from None
    except PIL_ERRORS as exc:
        raise DataError(label, f"cannot read mask ({exc})") from None


def label_counts(mask: np.ndarray) -> np.ndarray:
    """Pixel count of each of the 256 uint8 label values."""
    return np.bincount(mask.ravel(), minlength=256)


def read_id_list(path: Path, what: str, whole_line: bool = False) -> list[str]:
    """Reads a split file: one id per line, skipping blanks and `#` comments.

    A UTF-8 byte-order mark (Windows editors write one) is not part of the first id.

    Args:
        path: The split file.
        what: How to name the split in messages, e.g. "split 'train'".
        whole_line: The id is the whole (stripped) line, spaces included; otherwise its
            first word (release lists with more columns).

    Raises:
        UserError: if the file is missing or lists nothing.
    """
    if not path.is_file():
        raise UserError(
            f"split file {path} for {what} is missing; restore it from the dataset "
            "release (one id per line)"
        )
    ids = []
    for line in path.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line if whole_line else line.split()[0])
    if not ids:
        raise UserError(f"split file {path} for {what} lists no ids; add one id per line")
    return ids


def missing_file_hint(folder: Path, stem: str, suffixes: Sequence[str]) -> str:
    """Why no `folder/<stem><suffix>` exists when a near match does, as '; <hint>', else ''.

    Catches the usual slips of hand-made split files: a suffix in the listed id, a case
    mismatch (file systems that tell case apart), a file in an unsupported format, and spaces.
    """
    names = _folder_names(folder)
    stem_path = Path(stem)
    if stem_path.suffix.lower() in (*IMAGE_SUFFIXES, *MASK_SUFFIXES, ".webp", ".tif", ".tiff"):
        return f"; '{stem}' is listed with its suffix: list the stem '{stem_path.stem}' instead"
    wanted = {f"{stem}{suffix}".lower() for suffix in suffixes}
    cased = sorted(n for n in names if n.lower() in wanted)
    if cased:
        return (
            f"; {folder / cased[0]} differs only in letter case from '{stem}' (file names "
            f"are case-sensitive): list '{Path(cased[0]).stem}' or rename the file"
        )
    other = sorted(n for n in names if Path(n).stem == stem)
    if other:
        return (
            f"; {folder / other[0]} has the unsupported suffix {Path(other[0]).suffix} "
            f"(supported: {', '.join(suffixes)}): convert it"
        )
    if any(c.isspace() for c in stem):
        return f"; the listed stem '{stem}' holds spaces: check the line in the split file"
    if not stem.isprintable():
        return f"; the listed stem {stem!r} holds invisible characters: retype that line"
    return ""


_FOLDER_NAMES: dict[Path, list[str]] = {}


def _folder_names(folder: Path) -> list[str]:
    """The file names in a folder, listed once per process (only asked when files are missing)."""
    if folder not in _FOLDER_NAMES:
        try:
            _FOLDER_NAMES[folder] = [p.name for p in folder.iterdir()]
        except OSError:
            _FOLDER_NAMES[folder] = []
    return _FOLDER_NAMES[folder]


def pair_ids(
    ids: Iterable[str], listed_in: str, image_dir: Path, mask_dir: Path
) -> tuple[list[Example], list[DataError]]:
    """Pairs `image_dir/<id>.jpg` with `mask_dir/<id>.png` for every id.

    Args:
        ids: Example ids in order.
        listed_in: Where the ids come from, quoted in the problem of a missing file.
        image_dir: Folder of the `<id>.jpg` images.
        mask_dir: Folder of the `<id>.png` masks.

    Returns:
        (complete examples in order, one `DataError` per missing image or mask).
    """
    examples, problems = [], []
    for image_id in ids:
        image = image_dir / f"{image_id}.jpg"
        mask = mask_dir / f"{image_id}.png"
        if not image.is_file():
            hint = missing_file_hint(image_dir, image_id, (".jpg",))
            problems.append(DataError(image, f"missing ({listed_in}){hint}"))
        elif not mask.is_file():
            hint = missing_file_hint(mask_dir, image_id, MASK_SUFFIXES)
            problems.append(DataError(mask, f"missing ({listed_in}){hint}"))
        else:
            examples.append(Example(str(image), str(mask)))
    return examples, problems


def subdir_hint(root: Path, candidates: Iterable[str]) -> str:
    """' (did you mean data.root=...?)' when the layout sits one level deeper, else ''."""
    for candidate in candidates:
        if (root / candidate).is_dir():
            return f" (did you mean data.root={root / candidate}?)"
    return ""


def slice_ids(spec: str, lists: Mapping[str, Sequence[str]]) -> list[str]:
    """Selects ids with TFDS split syntax, e.g. 'train[:90%]' or 'train+test[10:20]'.

    Args:
        spec: The split expression.
        lists: The named id lists the expression may refer to.

    Raises:
        UserError: if the expression is malformed or names an unknown list.
    """
    import tensorflow_datasets as tfds

    infos = {
        name: tfds.core.SplitInfo(name=name, shard_lengths=[len(ids)], num_bytes=0)
        for name, ids in lists.items()
    }
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
    except (ValueError, AssertionError) as exc:
        raise UserError(
            f"split '{spec}': {exc}; use a split of {sorted(lists)} with TFDS "
            "slicing, e.g. 'train[:90%]'"
        ) from None
    return [i for part in instructions for i in lists[part.splitname][part.from_ : part.to]]


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
        if on_error not in ON_ERROR_CHOICES:
            raise UserError(f"data.on_error must be raise or skip, got {on_error!r}")
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
            `load` (e.g. mattes thresholded from any image mode). See `graph_decode.py`.
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
                    f"{_orientation_cause(pair.image_file)}; masks must match "
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
                        f"mask holds label(s) {_short_list(bad)} "
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


def remap_table(
    label_map: Mapping[int, int] | None,
    mask_threshold: int | None,
    num_classes: int | None = None,
    ignore_label: int = IGNORE_LABEL,
) -> np.ndarray | None:
    """The uint8 [256] table of `data.mask_threshold` then `data.label_map`; None if both unset.

    Raises:
        UserError: naming the key, for a value outside 0..255 or a label that is no class id.
    """
    if not label_map and mask_threshold is None:
        return None
    table = np.arange(256)
    if mask_threshold is not None:
        if not _is_byte(mask_threshold) or mask_threshold == 255:
            raise UserError(
                f"data.mask_threshold must be null or an integer in 0..254 (values "
                f"above it become 1, the others 0), got {mask_threshold!r}; e.g. "
                "data.mask_threshold=127"
            )
        table = (table > mask_threshold).astype(np.int64)
    mapping = dict(label_map or {})
    for value, label in mapping.items():
        if not (_is_byte(value) and _is_byte(label)):
            raise UserError(
                f"data.label_map must map mask values 0..255 to labels 0..255, got "
                f"{value!r}: {label!r}; e.g. 'data.label_map={{255:1}}'"
            )
        if num_classes is not None and label >= num_classes and label != ignore_label:
            raise UserError(
                f"data.label_map maps {value} to {label}, which is neither a class "
                f"id (0..{num_classes - 1}) nor {ignore_label} (ignore); fix the map "
                "or data.num_classes"
            )
    lookup = np.array([mapping.get(int(v), int(v)) for v in range(256)])
    return lookup[table].astype(np.uint8)


def _is_byte(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255


def build_source(data: Mapping) -> Source:
    """Builds `data.source` and applies `data.mask_threshold` and `data.label_map` to it.

    Configs saved before these keys existed have neither: masks are then used as decoded.
    """
    from hydra.utils import instantiate  # here: Hydra is only needed by the task entry points

    source = instantiate(data["source"])
    label_map = data.get("label_map")
    if label_map is not None and not isinstance(label_map, Mapping):
        raise UserError(
            f"data.label_map must be a mapping such as {{255:1}}, got {label_map!r}; "
            "e.g. 'data.label_map={255:1}'"
        )
    source.set_label_map(None if label_map is None else dict(label_map), data.get("mask_threshold"))
    return source


def _short_list(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def _orientation_cause(image_file: str) -> str:
    """' as displayed (...)' when the image's EXIF orientation explains a size mismatch."""
    if not Path(image_file).is_file():
        return ""
    orientation = file_orientation(image_file)
    if orientation == 1:
        return ""
    return (
        f" as displayed (its EXIF orientation {orientation}: {_ROTATIONS[orientation]}, "
        "which training, evaluation and inference apply); rotate the mask the same way, or "
        "remove the tag if the mask was drawn on the stored pixels (exiftool -Orientation=)"
    )
