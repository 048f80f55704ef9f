"""`seg-train mode=eval`: dataset-level metrics of a checkpoint at original resolution.

`evaluate_model` is also what a training run calls on its best checkpoint, so a run's
`metrics.json` and a later `mode=eval` of the same checkpoint come from the same code path.
Test-time augmentation, sliding windows and the dense CRF are options of that one path.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.progress import track

from seg_train import runtime
from seg_train.config_checks import is_matting_data
from seg_train.data.decode import data_errors_as_user_errors
from seg_train.errors import UserError
from seg_train.files import ensure_fresh_run_dir
from seg_train.inference.crf import CRFRunner
from seg_train.inference.metrics import ConfusionMatrix, print_report, write_metric_files
from seg_train.inference.predictor import Predictor
from seg_train.tasks import loggers
from seg_train.tasks.checkpoint import load_model, open_checkpoint, output_channels
from seg_train.tasks.instantiate import predictor_from_config
from seg_train.tasks.interrupts import between_items
from seg_train.tasks.postprocess import crf_runner
from seg_train.tasks.report import write_report
from seg_train.tasks.sources import evaluation_examples
from seg_train.viz import full_palette, sample_panel

log = logging.getLogger(__name__)


def predict_stream(
    examples: Iterable[tuple[np.ndarray, np.ndarray]], predictor: Predictor, crf: CRFRunner | None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (image, mask, predicted ids) per example, CRF-refined when `crf` is given."""
    if crf is None:
        for image, mask in examples:
            yield image, mask, predictor.labels(image)
        return
    items = ((image, predictor.probabilities(image), (image, mask)) for image, mask in examples)
    for marginals, (image, mask) in crf.map(items):
        yield image, mask, marginals.argmax(-1).astype(np.uint8)


class SplitEvaluator:
    """A split's original-resolution evaluation: the one code path behind every reported mIoU.

    The final report (`evaluate_model`, `mode=eval`) and in-training validation
    (`trainer.val_protocol=original`,
    `seg_train.training.callbacks.OriginalResolutionValidation`) both
    count predictions into a `ConfusionMatrix` through this class, with the Predictor, test-time
    augmentation and CRF built from the same config, so the number that selects `best.keras`
    is the number the report prints.

    Args:
        model: The (single-output) segmentation model.
        cfg: The composed config (`data`, `eval`, `postprocess`).
        split: Split name, e.g. "val".
        cache: Keep the decoded split in memory between passes (repeated validation).
    """

    def __init__(self, model, cfg: DictConfig, split: str, cache: bool = False):
        self.cfg = cfg
        self.split = split
        self.examples = evaluation_examples(cfg, split, cache)
        self.predictor = predictor_from_config(model, cfg)
        self.crf = crf_runner(cfg)

    @property
    def num_images(self) -> int | None:
        """The split's size, None when unknown (`data.on_error=skip`)."""
        count = int(self.examples.cardinality())
        return count if count >= 0 else None

    def predictions(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(image, mask, predicted ids) per example, in split order."""
        return predict_stream(self.examples.as_numpy_iterator(), self.predictor, self.crf)

    def confusion(
        self, predictions: Iterable | None = None, on_example=None
    ) -> tuple[ConfusionMatrix, int]:
        """Counts every prediction of the split; returns (matrix, number of images).

        Args:
            predictions: The stream to count (default `self.predictions()`), e.g. wrapped in a
                progress bar.
            on_example: Called as on_example(index, image, mask, prediction) for each image.
        """
        data = self.cfg.data
        matrix = ConfusionMatrix(data.num_classes, data.ignore_label)
        count = 0
        # A broken file: one line naming it. Ctrl-C: stops between two images.
        with data_errors_as_user_errors(), between_items() as safe_point:
            for index, (image, mask, prediction) in enumerate(
                self.predictions() if predictions is None else predictions
            ):
                count += 1
                matrix.update(mask, prediction)
                if on_example is not None:
                    on_example(index, image, mask, prediction)
                safe_point()
        return matrix, count

    def protocol(self) -> dict:
        """How the predictions are made, as metrics.json records it."""
        eval_cfg = self.cfg.eval
        protocol = {
            "mode": eval_cfg.mode,
            "tta": OmegaConf.to_container(eval_cfg.tta, resolve=True),
            "postprocess": self.cfg.postprocess.name,
            "resolution": "original",
        }
        if self.cfg.eval.max_images:
            protocol["max_images"] = self.cfg.eval.max_images  # the split's first N only
        if self.predictor.resize_change:
            protocol["resolution"] = f"resized to {list(self.predictor.fixed_size)}"
        if self.predictor.slide_switches:
            protocol["mode"] = f"{eval_cfg.mode}, slide above eval.max_whole_pixels"
        return protocol


def evaluate_model(
    model,
    cfg: DictConfig,
    split: str,
    out_dir: Path,
    checkpoint: Path,
    extra: dict | None = None,
    evaluator: SplitEvaluator | None = None,
) -> dict:
    """Evaluates `model` on a split image by image at original resolution.

    Writes `metrics.json`, `per_class.csv`, `confusion_matrix.{csv,png}`, `samples/` (image |
    truth | prediction) and `worst/` (the `eval.report_worst` images of lowest mIoU, listed in
    the report's `worst_images`) into `out_dir`, prints a per-class table and returns the
    report, which also holds the evaluation's speed (`eval_speed`). A model
    that cannot run at the images' own sizes is evaluated on resized images: its report says so
    in `protocol_change`. `extra` entries (e.g. how a training run selected the checkpoint) are
    added to the report. `evaluator` reuses a `SplitEvaluator` of `model` (e.g. the one that
    validated during training: its predictor is traced and its split decoded already).
    """
    if is_matting_data(cfg.data):  # the four matting errors + the thresholded IoU
        from seg_train.tasks.matting import evaluate_and_report

        return evaluate_and_report(model, cfg, split, out_dir, checkpoint, extra, evaluator)
    data = cfg.data
    evaluator = evaluator or SplitEvaluator(model, cfg, split)
    palette = full_palette(data.palette)
    names = list(data.class_names)
    # A run dir saved before eval.report_worst existed lacks the key (adopt_run_config).
    worst = WorstImages(cfg.eval.get("report_worst", 4), data.num_classes, data.ignore_label)

    def save_sample(index, image, mask, prediction):
        worst.add(index, image, mask, prediction)
        if index < cfg.eval.num_samples:
            (out_dir / "samples").mkdir(parents=True, exist_ok=True)
            panel = sample_panel(image, mask, prediction, palette, class_names=names)
            Image.fromarray(panel).save(out_dir / "samples" / f"{split}_{index:04d}.png")

    progress = track(
        evaluator.predictions(), total=evaluator.num_images, description=f"Evaluating {split}"
    )
    started = time.perf_counter()
    matrix, num_images = evaluator.confusion(progress, save_sample)
    seconds = time.perf_counter() - started
    report = matrix.summary(list(data.class_names))
    report.update(
        num_images=num_images,
        split=split,
        dataset=data.name,
        checkpoint=str(Path(checkpoint).resolve()),
        protocol=evaluator.protocol(),
    )
    if evaluator.predictor.protocol_change:
        report["protocol_change"] = evaluator.predictor.protocol_change
    # Prediction, CRF and counting, sample writing included: what mode=eval costs per image.
    report["eval_speed"] = {
        "seconds": round(seconds, 3),
        "images_per_second": round(num_images / seconds, 3) if seconds > 0 else None,
    }
    report["worst_images"] = worst.save(out_dir, split, palette, names)
    report.update(extra or {})
    write_metric_files(report, matrix, list(data.class_names), out_dir)
    print_report(report)
    return report


class WorstImages:
    """Keeps the `k` images of lowest mean IoU (over classes in their truth or prediction).

    Only k images are held at any time (a heap), so the evaluation's memory stays flat.
    Images with no labelled pixel have no mIoU and are left out.
    """

    def __init__(self, k: int, num_classes: int, ignore_label: int):
        self.k = k
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self._heap: list[tuple] = []  # (-mIoU, -index, arrays): the best of the worst on top

    def add(self, index: int, image: np.ndarray, mask: np.ndarray, prediction: np.ndarray):
        """Scores one image and keeps it if it is among the k worst so far."""
        if self.k <= 0:
            return
        matrix = ConfusionMatrix(self.num_classes, self.ignore_label)
        matrix.update(mask, prediction)
        score = matrix.summary([str(i) for i in range(self.num_classes)])["mean_iou"]
        if score is None:
            return
        item = (-score, -index, index, image, mask, prediction)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
        elif item[:2] > self._heap[0][:2]:  # lower mIoU (ties: the earlier image) than the top
            heapq.heapreplace(self._heap, item)

    def save(self, out_dir: Path, split: str, palette: np.ndarray, names: list[str]) -> list:
        """Writes `worst/<split>_<index>.png` panels; returns [{index, mean_iou, file}], worst
        first."""
        listed = []
        for negative, _, index, image, mask, prediction in sorted(self._heap, reverse=True):
            file = Path("worst") / f"{split}_{index:04d}.png"
            (out_dir / "worst").mkdir(parents=True, exist_ok=True)
            panel = sample_panel(image, mask, prediction, palette, class_names=names)
            Image.fromarray(panel).save(out_dir / file)
            listed.append({"index": index, "mean_iou": -negative, "file": file.as_posix()})
        return listed


def optimized_value(report: dict, metric: str) -> float | None:
    """The report's `optimized_metric` value, which a run returns to Hydra sweepers."""
    if metric not in report or isinstance(report[metric], dict):
        scalars = sorted(k for k, v in report.items() if isinstance(v, float))
        raise UserError(
            f"optimized_metric={metric} is not a metric of metrics.json; "
            f"use one of {', '.join(scalars)}"
        )
    return report[metric]


def run(cfg: DictConfig) -> float | None:
    """Evaluates `cfg.ckpt_path` on `cfg.eval.split`; returns the mean IoU."""
    out_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(out_dir, ignore=(".hydra",))
    checkpoint = open_checkpoint(cfg)
    trackers = loggers.build(cfg)  # logger=mlflow / wandb: before the evaluation
    runtime.seed_everything(cfg.seed)
    model = load_model(checkpoint, output_channels(cfg))
    try:
        report = evaluate_model(model, cfg, cfg.eval.split, out_dir, checkpoint)
    except KeyboardInterrupt:
        # metrics.json is written once, after the last image: nothing partial to clean up.
        raise KeyboardInterrupt(
            f"mode=eval stopped before the end of split {cfg.eval.split}; no metrics were "
            f"written to {out_dir}; run the command again to evaluate"
        ) from None
    write_report(out_dir, cfg)  # report.html beside metrics.json (never raises)
    log.info(
        "mIoU %.4f on %s (%d images); report in %s",
        report["mean_iou"] or 0.0,
        cfg.eval.split,
        report["num_images"],
        out_dir / "metrics.json",
    )
    loggers.finish(trackers, out_dir)
    return optimized_value(report, cfg.optimized_metric)
