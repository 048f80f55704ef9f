"""The file readers the dataset decoders share: Pillow decodes, split lists, label tables.

`read_image` and `read_mask` are the reference decode (`Source.load` in `base.py` uses them):
masks never go through an RGB path (TensorFlow expands palette PNGs, PASCAL VOC style, to
colours, losing the class ids that the palette indices are), and a Python decode can name a
broken file, as a `DataError`. Images are read as viewers show them (EXIF orientation applied,
`displayed`). The training and evaluation pipeline decodes the common file kinds in the graph
instead, bit-identical to these readers (`decode.py`).

Also here: the split-list helpers of the datasets of files (`read_id_list`, `pair_ids`,
`slice_ids`, the missing-file hints) and `remap_table`, the user's `data.mask_threshold` /
`data.label_map` as one 256-entry table. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def short_list(values: Sequence[int], limit: int = 8) -> str:
    """`values` as "a, b, c", the first `limit` of them and the count when there are more."""
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def orientation_cause(image_file: str) -> str:
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
