"""Label statistics of a split: the dataset doctor's scan and median-frequency class weights.

`scan_split` decodes every record of a split through the source (as training sees it, the
user's label map included), lists each record's problems (`check_record`) and adds its label
counts to a `Tally`. The doctor (`seg_train.tasks.check`, mode=check) reports them, and
`class_weights: auto` turns them into `median_frequency_weights` (Eigen & Fergus 2015,
https://arxiv.org/abs/1411.4734; SegNet), so the weights a run computes are the ones the doctor
suggests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
from rich.progress import track

from seg_train.data.base import Source
from seg_train.data.readers import DataError, label_counts
from seg_train.errors import UserError

# Records decoded per round of the thread pool (bounds memory for TFDS's in-memory records).
CHUNK = 64


def median_frequency_weights(
    class_pixels: Sequence[float], image_pixels: Sequence[float] | None = None
) -> list[float]:
    """Median-frequency class weights (Eigen & Fergus 2015; SegNet): `median(f) / f_c`.

    `f_c = class_pixels[c] / image_pixels[c]`, where `image_pixels[c]` is the number of
    labelled (non-ignored) pixels of the images in which class c appears. Without
    `image_pixels`, `f_c` is the class's share of all labelled pixels (the same weights up to
    the per-image presence correction). The median is taken over the classes that occur;
    classes that never occur get weight 0 (they have no pixel to weigh).

    Args:
        class_pixels: Labelled pixels per class over the training set (ignore label excluded).
        image_pixels: Optional per class, labelled pixels of the images containing that class.

    Returns:
        One weight per class.
    """
    counts = np.asarray(class_pixels, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
        raise ValueError(f"class_pixels must be a non-empty list of counts >= 0, got {counts}")
    if image_pixels is None:
        totals = np.full_like(counts, counts.sum())
    else:
        totals = np.asarray(image_pixels, dtype=np.float64)
        if totals.shape != counts.shape:
            raise ValueError("image_pixels needs one entry per class")
    present = (counts > 0) & (totals > 0)
    if not present.any():
        raise ValueError("the label histogram has no labelled pixel")
    frequency = np.zeros_like(counts)
    frequency[present] = counts[present] / totals[present]
    median = np.median(frequency[present])
    weights = np.zeros_like(counts)
    weights[present] = median / frequency[present]
    return [float(w) for w in weights]


class Tally:
    """Accumulates label statistics over masks.

    Args:
        num_classes: Number of classes.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.histogram = np.zeros(256, dtype=np.int64)
        self.class_pixels = np.zeros(num_classes, dtype=np.int64)
        # Labelled pixels of the images in which each class occurs (median-frequency balancing).
        self.image_pixels = np.zeros(num_classes, dtype=np.int64)

    def add(self, counts: np.ndarray) -> None:
        """Adds one mask's 256-bin label counts."""
        self.histogram += counts
        per_class = counts[: self.num_classes]
        self.class_pixels += per_class
        self.image_pixels[per_class > 0] += per_class.sum()

    def class_frequency(self) -> np.ndarray:
        """Pixel frequency of each class in the images where it occurs; NaN if it never does."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.image_pixels > 0, self.class_pixels / self.image_pixels, np.nan)

    def class_weights(self) -> list[float] | None:
        """Median-frequency weights median(f) / f_c (0 for absent classes); None if no labels."""
        try:
            return median_frequency_weights(self.class_pixels, self.image_pixels)
        except ValueError:  # no labelled pixel at all
            return None


def check_record(
    source: Source, record: tuple[bytes, bytes, bytes]
) -> tuple[np.ndarray | None, list[DataError]]:
    """Decodes one record and lists its problems; returns (its label counts or None, problems)."""
    name, image, mask = record
    try:
        pair = source.decode(name.decode(), image, mask)
    except DataError as error:
        return None, [error]
    problems = source.problems(pair)
    counts = label_counts(pair.mask)
    present = set(np.flatnonzero(counts).tolist())
    ignore = source.ignore_label
    if source.num_classes == 2 and ignore in present and present <= {0, ignore}:
        problems.append(
            DataError(
                pair.mask_file,
                f"0/{ignore} binary mask where class ids 0/1 "
                f"are expected: {ignore} is the ignore label, so the foreground "
                "would be ignored; remap it with "
                f"'data.label_map={{{ignore}:1}}' (or save the foreground as 1)",
            )
        )
    return counts, problems


def _chunks(iterator: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(iterator, size)):
        yield chunk


def scan_split(source: Source, split: str, tally: Tally, workers: int) -> tuple[int, list[dict]]:
    """Checks every pair of a split; returns (pairs checked, problems as {split, file, problem})."""
    errors = [
        {"split": split, "file": e.file, "problem": e.problem}
        for e in source.listing_problems(split)
    ]
    try:
        records = source.records(split)
    except UserError:
        if errors:  # nothing complete to read; the listing problems say why
            return 0, errors
        raise
    total = int(records.cardinality())
    checked = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = _chunks(records.as_numpy_iterator(), CHUNK)
        for chunk in track(
            chunks,
            total=-(-total // CHUNK) if total >= 0 else None,
            description=f"Checking {split}",
        ):
            for counts, problems in pool.map(lambda r: check_record(source, r), chunk):
                checked += 1
                if counts is not None:
                    tally.add(counts)
                errors += [{"split": split, "file": e.file, "problem": e.problem} for e in problems]
    return checked, errors
