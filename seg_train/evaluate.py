"""`seg-train mode=eval`: dataset-level metrics of a checkpoint at original resolution.

`evaluate_model` is also what a training run calls on its best checkpoint, so a run's
`metrics.json` and a later `mode=eval` of the same checkpoint come from the same code path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from seg_train import checkpoints, runtime
from seg_train.config_checks import check_config
from seg_train.data.pipeline import decoded_dataset
from seg_train.io_utils import ensure_fresh_run_dir, write_json_atomic
from seg_train.metrics import ConfusionMatrix
from seg_train.predict import Predictor
from seg_train.viz import full_palette, sample_panel

log = logging.getLogger(__name__)


def evaluate_model(
    model, data: DictConfig, split: str, out_dir: Path, checkpoint: Path, num_samples: int = 0
) -> dict:
    """Evaluates `model` on a split image by image at original resolution.

    Writes `metrics.json` and `samples/` (image | truth | prediction) into `out_dir`, prints a
    per-class table and returns the report.
    """
    source = instantiate(data.source)
    examples = decoded_dataset(source, split, data.num_parallel_calls)
    num_images = int(examples.cardinality())
    predictor = Predictor(model)
    matrix = ConfusionMatrix(data.num_classes, data.ignore_label)
    palette = full_palette(data.palette)
    samples_dir = out_dir / "samples"
    for index, (image, mask) in enumerate(
        track(examples.as_numpy_iterator(), total=num_images, description=f"Evaluating {split}")
    ):
        prediction = predictor.labels(image)
        matrix.update(mask, prediction)
        if index < num_samples:
            samples_dir.mkdir(parents=True, exist_ok=True)
            panel = sample_panel(image, mask, prediction, palette)
            Image.fromarray(panel).save(samples_dir / f"{split}_{index:04d}.png")
    report = matrix.summary(list(data.class_names))
    report.update(
        num_images=num_images,
        split=split,
        dataset=data.name,
        checkpoint=str(Path(checkpoint).resolve()),
    )
    write_json_atomic(out_dir / "metrics.json", report)
    np.savetxt(out_dir / "confusion_matrix.csv", matrix.matrix, fmt="%d", delimiter=",")
    print_report(report)
    return report


def print_report(report: dict) -> None:
    """Prints the per-class IoU / accuracy table and the summary figures."""
    table = Table(title=f"{report['dataset']} / {report['split']}: {report['num_images']} images")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("accuracy", justify="right")

    def fmt(value):
        return "-" if value is None else f"{100 * value:.2f}"

    for name, iou in report["per_class_iou"].items():
        table.add_row(name, fmt(iou), fmt(report["per_class_accuracy"][name]))
    table.add_section()
    table.add_row("mean", fmt(report["mean_iou"]), fmt(report["mean_accuracy"]), style="bold")
    table.add_row("pixel accuracy", "", fmt(report["pixel_accuracy"]))
    Console().print(table)


def run(cfg: DictConfig) -> float | None:
    """Evaluates `cfg.ckpt_path` on `cfg.eval.split`; returns the mean IoU."""
    out_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(out_dir, ignore=(".hydra",))
    checkpoint, run_dir = checkpoints.resolve_checkpoint(cfg.ckpt_path)
    checkpoints.adopt_run_config(cfg, run_dir)
    check_config(cfg)
    runtime.seed_everything(cfg.seed)
    model = checkpoints.load_model(checkpoint, cfg.data.num_classes)
    report = evaluate_model(
        model, cfg.data, cfg.eval.split, out_dir, checkpoint, cfg.eval.num_samples
    )
    log.info(
        "mIoU %.4f on %s (%d images); report in %s",
        report["mean_iou"] or 0.0,
        cfg.eval.split,
        report["num_images"],
        out_dir / "metrics.json",
    )
    return report["mean_iou"]
