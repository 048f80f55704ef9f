"""Dataset-level segmentation metrics from one streaming confusion matrix.

Keras' `MeanIoU` serves validation inside `fit`; this engine serves the final reports. It is our
own because the reports need per-class values (with classes absent from both truth and
prediction reported as undefined, not 0) accumulated over images of different sizes, and only a
num_classes x num_classes matrix is kept, so memory stays flat however many images are seen.
Definitions follow mmsegmentation: mIoU is the mean over classes with a defined IoU.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from seg_train.errors import UserError
from seg_train.files import write_json_atomic
from seg_train.viz import plot_confusion


class ConfusionMatrix:
    """Accumulates a confusion matrix over many (truth, prediction) label maps.

    Rows are true classes, columns predicted classes. Pixels whose truth is `ignore_label` are
    skipped.

    Args:
        num_classes: Number of classes.
        ignore_label: Truth value to skip (255 in VOC-style masks).
    """

    def __init__(self, num_classes: int, ignore_label: int = 255):
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        """Adds one image (or batch) of integer label maps of equal shape."""
        if truth.shape != prediction.shape:
            raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} differ")
        valid = truth != self.ignore_label
        truth = truth[valid].astype(np.int64)
        prediction = prediction[valid].astype(np.int64)
        if truth.size and truth.max() >= self.num_classes:
            raise UserError(
                f"a mask holds label {truth.max()} but data.num_classes is "
                f"{self.num_classes}; fix the masks or data.num_classes"
            )
        counts = np.bincount(truth * self.num_classes + prediction, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def per_class_iou(self) -> np.ndarray:
        """IoU per class; NaN where the class is in neither truth nor prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def per_class_accuracy(self) -> np.ndarray:
        """Recall per class; NaN where the class never occurs in the truth."""
        tp = np.diag(self.matrix).astype(np.float64)
        support = self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(support > 0, tp / support, np.nan)

    def per_class_dice(self) -> np.ndarray:
        """Dice (F1) per class; NaN where the class is in neither truth nor prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        size_sum = self.matrix.sum(0) + self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(size_sum > 0, 2 * tp / size_sum, np.nan)

    def frequency_weighted_iou(self) -> float | None:
        """Sum over classes of (class pixel share in the truth) x IoU."""
        total = self.matrix.sum()
        if not total:
            return None
        frequency = self.matrix.sum(1) / total
        iou = self.per_class_iou()
        defined = ~np.isnan(iou)
        return float((frequency[defined] * iou[defined]).sum())

    def summary(self, class_names: Sequence[str]) -> dict:
        """The report: mean_iou, pixel_accuracy, mean_accuracy, fw_iou, mean_dice, per class.

        Undefined values are None (null in JSON).
        """
        iou = self.per_class_iou()
        acc = self.per_class_accuracy()
        dice = self.per_class_dice()
        total = self.matrix.sum()
        return {
            "mean_iou": _nanmean(iou),
            "pixel_accuracy": float(np.diag(self.matrix).sum() / total) if total else None,
            "mean_accuracy": _nanmean(acc),
            "fw_iou": self.frequency_weighted_iou(),
            "mean_dice": _nanmean(dice),
            "per_class_iou": _by_name(class_names, iou),
            "per_class_accuracy": _by_name(class_names, acc),
            "per_class_dice": _by_name(class_names, dice),
            "num_pixels": int(total),
        }


def _nanmean(values: np.ndarray) -> float | None:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else None


def _by_name(names: Sequence[str], values: np.ndarray) -> dict[str, float | None]:
    return {str(n): (None if math.isnan(v) else float(v)) for n, v in zip(names, values)}


def write_metric_files(
    report: dict, matrix: ConfusionMatrix, names: list[str], out_dir: Path
) -> None:
    """Writes metrics.json, per_class.csv and the confusion matrix (CSV and PNG) of a report."""
    write_json_atomic(out_dir / "metrics.json", report)
    with open(out_dir / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "iou", "accuracy", "dice"])
        for name in names:
            writer.writerow(
                [name] + [report[f"per_class_{k}"][name] for k in ("iou", "accuracy", "dice")]
            )
    np.savetxt(out_dir / "confusion_matrix.csv", matrix.matrix, fmt="%d", delimiter=",")
    plot_confusion(matrix.matrix, names, out_dir / "confusion_matrix.png")


def print_report(report: dict) -> None:
    """Prints the per-class IoU / accuracy / Dice table and the summary figures."""
    table = Table(title=f"{report['dataset']} / {report['split']}: {report['num_images']} images")
    for column in ("class", "IoU", "accuracy", "Dice"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def fmt(value):
        return "-" if value is None else f"{100 * value:.2f}"

    for name, iou in report["per_class_iou"].items():
        table.add_row(
            name,
            fmt(iou),
            fmt(report["per_class_accuracy"][name]),
            fmt(report["per_class_dice"][name]),
        )
    table.add_section()
    table.add_row(
        "mean",
        fmt(report["mean_iou"]),
        fmt(report["mean_accuracy"]),
        fmt(report["mean_dice"]),
        style="bold",
    )
    table.add_row("pixel accuracy", "", fmt(report["pixel_accuracy"]), "")
    table.add_row("frequency-weighted IoU", fmt(report["fw_iou"]), "", "")
    Console().print(table)
