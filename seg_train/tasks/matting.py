"""The matting task inside `seg-train` runs: fit metrics, validation and the final report.

`data.task=matting` switches these in (see seg_train/tasks/instantiate.py and
seg_train/tasks/evaluate.py):

- `fit_metrics`: Keras metrics for `fit` (the mean absolute alpha difference);
- `MattingValidation`: `trainer.val_protocol=original` for matting, writing `val_sad`,
  `val_mse`, `val_grad`, `val_conn` and `val_mean_iou` (thresholded alpha) into the epoch logs,
  so `callbacks.model_checkpoint.monitor=val_sad` (mode min) selects `best.keras` on SAD;
- `infer`: `mode=infer`'s alpha, cut-out and overlay PNGs at each image's size;
- `evaluate_and_report`: `metrics.json`, the printed table and the per-class files of the
  final report; the top level holds the segmentation view (the thresholded alpha's IoU,
  as a segmentation run's report) and the four matting errors beside it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import keras
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track
from rich.table import Table

from seg_train.data.decode import data_errors_as_user_errors
from seg_train.inference import matting_metrics as metrics
from seg_train.inference import matting_outputs as outputs
from seg_train.inference.matting import MattingScores, predict_alpha
from seg_train.inference.metrics import print_report, write_metric_files
from seg_train.tasks import infer_files
from seg_train.tasks.interrupts import between_items
from seg_train.tasks.sources import evaluation_examples
from seg_train.training.callbacks import OriginalResolutionValidation

log = logging.getLogger(__name__)


def fit_metrics() -> list[keras.metrics.Metric]:
    """Metrics `fit` reports on its batches: the mean absolute alpha difference."""
    return [keras.metrics.MeanAbsoluteError(name="mad")]


class MattingEvaluator:
    """A split's matting evaluation at original resolution (every image, in split order).

    The model is called directly, so `sync_weights` has nothing to copy; it exists for the
    training loop, which calls it on the segmentation evaluator's predictor.

    Args:
        model: The matting model.
        cfg: The composed config.
        split: Split name, e.g. "val".
        cache: Keep the decoded split in memory between passes.
    """

    def __init__(self, model, cfg: DictConfig, split: str, cache: bool = False):
        self.model = model
        self.cfg = cfg
        self.split = split
        self.examples = evaluation_examples(cfg, split, cache)
        # eval.mode=resize feeds the training size (as the segmentation evaluation does);
        # otherwise the image as it is (fully convolutional models).
        self.size = list(cfg.data.crop_size) if cfg.eval.mode == "resize" else None
        self.predictor = self

    def sync_weights(self) -> None:
        """Nothing to copy: predictions call the model itself."""

    def scores(self, on_example=None) -> MattingScores:
        """Scores every image; on_example(index, image, matte, alpha) is called for each."""
        scores = MattingScores(self.cfg.data.get("matte_threshold", 0))
        # A broken file: one line naming it. Ctrl-C: stops between two images.
        with data_errors_as_user_errors(), between_items() as safe_point:
            for index, (image, matte) in enumerate(self.examples.as_numpy_iterator()):
                alpha = predict_alpha(self.model, image, self.size)
                scores.update(matte, alpha)
                if on_example is not None:
                    on_example(index, image, matte, alpha)
                safe_point()
        return scores

    def protocol(self) -> dict:
        """How the predictions are made and scored, as metrics.json records it."""
        fed = f"resized to {self.size}" if self.size else "as it is"
        limit = {"max_images": self.cfg.eval.max_images} if self.cfg.eval.max_images else {}
        return {
            **limit,  # the split's first N only (eval.max_images)
            "mode": self.cfg.eval.mode,
            "resolution": "original",
            "input": f"each image {fed}; alpha resized bilinearly back to the image's size",
            "errors": "SAD/1000, MSE, Grad/1000 (sigma 1.4), Conn/1000 (step 0.1): image "
            "means over the whole image (no trimap)",
        }


class MattingValidation(OriginalResolutionValidation):
    """Writes `val_sad`, `val_mse`, `val_grad`, `val_conn`, `val_mean_iou` every
    `validation_freq` epochs (place it before ModelCheckpoint, which reads them)."""

    LOGGED = (*metrics.METRIC_NAMES, "mean_iou")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or (epoch + 1) % self.validation_freq:
            return
        start = time.perf_counter()
        summary = self.evaluator.scores().summary()
        for name in self.LOGGED:
            value = summary[name] if name in summary else summary["segmentation"][name]
            if value is not None:
                logs[f"val_{name}"] = value
        log.info(
            "Epoch %d: val SAD %.4f, MSE %.5f, Grad %.4f, Conn %.4f on %d images at original "
            "resolution (%.1f s)",
            epoch + 1,
            *(summary[name] or 0.0 for name in metrics.METRIC_NAMES),
            summary["num_images"],
            time.perf_counter() - start,
        )


def evaluate_and_report(
    model,
    cfg: DictConfig,
    split: str,
    out_dir: Path,
    checkpoint: Path,
    extra: dict | None = None,
    evaluator=None,
) -> dict:
    """The matting counterpart of `seg_train.tasks.evaluate.evaluate_model`; returns the report.

    Writes metrics.json (the four errors, `segmentation` IoU of the thresholded alpha, also at
    the top level so segmentation and matting runs compare key for key), per_class.csv,
    the confusion matrix and `samples/` (alpha, cut-out, overlay of the first
    `eval.num_samples` images), and prints both tables.
    """
    if not isinstance(evaluator, MattingEvaluator):
        evaluator = MattingEvaluator(model, cfg, split)
    out_dir = Path(out_dir)

    def save_sample(index, image, matte, alpha):
        if index < cfg.eval.num_samples:
            outputs.save_alpha_outputs(image, alpha, out_dir / "samples", f"{split}_{index:04d}")

    started = time.perf_counter()
    scores = evaluator.scores(save_sample)
    seconds = time.perf_counter() - started
    summary = scores.summary()
    segmentation = summary.pop("segmentation")
    report = {
        **segmentation,
        **summary,
        "task": "matting",
        "segmentation_view": {k: segmentation[k] for k in ("truth", "prediction")},
        "split": split,
        "dataset": cfg.data.name,
        "checkpoint": str(Path(checkpoint).resolve()),
        "protocol": evaluator.protocol(),
        "eval_speed": {
            "seconds": round(seconds, 3),
            "images_per_second": round(summary["num_images"] / seconds, 3) if seconds else None,
        },
        **(extra or {}),
    }
    for key in ("truth", "prediction"):
        report.pop(key)
    write_metric_files(report, scores.confusion, list(segmentation["per_class_iou"]), out_dir)
    print_report(report)
    print_errors(report)
    return report


def print_errors(report: dict) -> None:
    """Prints the four matting errors of a report."""
    table = Table(title=f"{report['dataset']} / {report['split']}: matting errors")
    for column in ("SAD (/1000)", "MSE", "Grad (/1000)", "Conn (/1000)"):
        table.add_column(column, justify="right")
    table.add_row(*("-" if report[n] is None else f"{report[n]:.4f}" for n in metrics.METRIC_NAMES))
    Console().print(table)


def infer(cfg: DictConfig, checkpoint: Path, images: list[Path], out_dir: Path) -> None:
    """`mode=infer` of a matting checkpoint: `<stem>_alpha.png`, `_cutout.png`, `_overlay.png`
    and, with `infer.save_probs`, `<stem>_alpha.npy` (float16).

    Each image is fed as the evaluation feeds it (`eval.mode=resize`: the training size) and
    its alpha comes back at the image's original size. The outputs are planned, written and
    resumed as a segmentation run's (`infer_files`): nothing existing is replaced unless
    `infer.overwrite`, and `infer.resume` predicts only the images whose outputs are not all
    there.

    Raises:
        UserError: if an output exists and neither `infer.overwrite` nor `infer.resume` is set
            (and the other refusals of `infer_files.plan_outputs`).
    """
    from seg_train.inference.images import load_rgb
    from seg_train.tasks.checkpoint import load_model

    array = outputs.ALPHA_ARRAY_SUFFIX if cfg.infer.save_probs else None
    resume = bool(cfg.infer.get("resume", False))
    planned, todo = infer_files.start(
        images, out_dir, (*outputs.IMAGE_SUFFIXES, array), cfg.infer.overwrite, resume
    )
    model = load_model(checkpoint, 1)
    size = list(cfg.data.crop_size) if cfg.eval.mode == "resize" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with between_items() as safe_point:  # Ctrl-C: stops between two images
            for path, paths in track(todo, description="Predicting alpha"):
                image = load_rgb(path)
                outputs.write_alpha_outputs(paths, image, predict_alpha(model, image, size))
                safe_point()
    except KeyboardInterrupt:
        raise infer_files.stopped(images, planned, out_dir) from None
    log.info("Wrote the alpha, cut-out and overlay of %d images to %s", len(todo), out_dir)
