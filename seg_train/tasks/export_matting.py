"""`mode=export` of a matting checkpoint: a SavedModel returning the alpha, checked for parity.

The serving graph takes uint8 images [B, H, W, 3] and returns `alpha`, float32 [B, H, W] in
[0, 1] at the input size, through the same whole-image (or `eval.mode=resize`) steps as the
segmentation export (`seg_train.inference.serving.whole_logits`, whose bilinear resize back is also
right for an alpha). Parity: the artefact runs in a fresh process on val images and its alpha
is compared with the in-framework alpha by the largest absolute difference (not pixel
agreement: the output is continuous); above `MAX_ABS_DIFF` the command fails.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from seg_train.errors import UserError
from seg_train.files import write_json_atomic
from seg_train.inference.serving import (
    ARTEFACT_NAMES,
    INPUT_NAME,
    PARITY_FILE,
    SIGNATURE,
    publish,
    run_in_fresh_process,
    whole_logits,
)
from seg_train.tasks.instantiate import val_images

log = logging.getLogger(__name__)

ALPHA_NAME = "alpha"
# float32 graphs of the same weights: differences come from kernel choice and op order only.
MAX_ABS_DIFF = 1e-4


def serving_function(predictor):
    """uint8 images [B, H, W, 3] -> {alpha: float32 [B, H, W]}."""

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        alpha = whole_logits(predictor, tf.cast(images, tf.float32))[..., 0]
        return {ALPHA_NAME: tf.clip_by_value(alpha, 0.0, 1.0)}

    return serve


def write_saved_model(predictor, path: Path) -> None:
    """Writes a SavedModel whose `serving_default` signature runs `serving_function`."""
    spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)
    archive = keras.export.ExportArchive()
    archive.track(predictor.model)
    archive.add_endpoint(SIGNATURE, serving_function(predictor), [spec])
    archive.write_out(str(path), verbose=False)


def alpha_parity(
    exported: list[np.ndarray], reference: list[np.ndarray], tolerance: float = MAX_ABS_DIFF
) -> dict:
    """Largest and mean absolute alpha difference over all images (a shape mismatch: inf)."""
    worst, total, pixels = 0.0, 0.0, 0
    for alpha, expected in zip(exported, reference):
        if alpha.shape != expected.shape:
            worst = float("inf")
            continue
        diff = np.abs(alpha.astype(np.float64) - expected)
        worst, total, pixels = max(worst, float(diff.max())), total + diff.sum(), pixels + diff.size
    return {
        "max_abs_diff": worst,
        "mean_abs_diff": total / max(pixels, 1),
        "num_pixels": pixels,
        "num_images": len(reference),
        "tolerance": tolerance,
        "passed": worst <= tolerance,
    }


def run(cfg: DictConfig, predictor, checkpoint: Path, out_dir: Path) -> float | None:
    """Writes, checks and publishes the matting SavedModel; returns the max abs difference."""
    options = cfg.export
    if options.format != "saved_model":
        raise UserError(
            f"export.format={options.format} is not available for a matting "
            "checkpoint yet; use export.format=saved_model"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    report = None
    try:
        artefact = staging / ARTEFACT_NAMES["saved_model"]
        write_saved_model(predictor, artefact)
        log.info("Wrote saved_model %s", artefact)
        if options.parity_images:
            images = val_images(cfg, options.parity_images)
            serve = serving_function(predictor)
            reference = [serve(tf.constant(image[None]))[ALPHA_NAME].numpy()[0] for image in images]
            report = alpha_parity(run_in_fresh_process(artefact, "saved_model", images), reference)
            report.update(
                format="saved_model",
                checkpoint=str(Path(checkpoint).resolve()),
                output=f"{ALPHA_NAME}: float32 [B, H, W] in [0, 1]",
            )
            write_json_atomic(staging / PARITY_FILE, report)
        publish(staging, out_dir, options.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Export written to %s", out_dir)
    if report is None:
        log.warning("Parity check skipped (export.parity_images=0)")
        return None
    print(
        f"Export parity (saved_model, alpha): max abs difference {report['max_abs_diff']:.2e} "
        f"on {report['num_images']} val images (tolerance {MAX_ABS_DIFF:.0e})"
    )
    if not report["passed"]:
        raise UserError(
            f"the matting export in {out_dir} differs from in-framework alphas by "
            f"up to {report['max_abs_diff']:.2e} (> {MAX_ABS_DIFF:.0e}); see "
            f"{out_dir / PARITY_FILE}"
        )
    return report["max_abs_diff"]
