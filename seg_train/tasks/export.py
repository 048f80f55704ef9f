"""`seg-train mode=export`: a SavedModel or TFLite file for serving, checked in a fresh process.

The exported graph takes uint8 images and returns uint8 class ids (optionally float32
probabilities) at the input size. Everything between is the in-framework whole-image
prediction of `seg_train.inference.predictor.Predictor`, traced into the graph: the cast to
float32 0..255,
the model's own normalisation layers, zero padding bottom/right to a multiple of
`eval.size_divisor` (or, for a model that cannot take other sizes, a bilinear resize to its
input size and of the logits back), the crop and the argmax. A client therefore needs no
preprocessing code, and the export cannot drift from `mode=eval` / `mode=infer`.

The graph is written with `keras.export.ExportArchive` rather than `tf.Module` +
`tf.saved_model.save`: it is Keras 3's supported way to attach custom endpoints to a model,
collects every variable the endpoint reads (including BatchNorm statistics) explicitly instead
of relying on TensorFlow's auto-tracking of Keras 3 objects, and stores only the traced graph
and weights, so loading needs neither Keras nor this package. TFLite is converted from such a
SavedModel (the conversion path Keras' own LiteRT exporter uses) with built-in ops only, so
the file runs on the plain TFLite runtime without the Flex delegate.

After writing, the artefact is loaded by `python -m seg_train.tasks.export_check` in a new process
and run on val images; its class ids are compared pixel by pixel with `Predictor`'s and the
agreement goes to `parity.json`. Below `export.parity_threshold` the command fails.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import keras
from omegaconf import DictConfig, OmegaConf

from seg_train import runtime
from seg_train.config_checks import is_matting_data
from seg_train.errors import UserError
from seg_train.files import ensure_fresh_run_dir, write_json_atomic
from seg_train.inference.predictor import Predictor
from seg_train.inference.serving import (
    ARTEFACT_NAMES,
    IDS_NAME,
    INPUT_NAME,
    METADATA_FILE,
    PARITY_FILE,
    PROBS_NAME,
    SIGNATURE,
    check_parity,
    publish,
    refuse_existing,
    resize_uint8,
    write_saved_model,
    write_tflite,
)
from seg_train.tasks.checkpoint import load_model, open_checkpoint, output_channels
from seg_train.tasks.instantiate import val_images

log = logging.getLogger(__name__)


def _warn_about_ignored_eval_options(cfg: DictConfig) -> None:
    tta = cfg.eval.tta
    if cfg.eval.mode not in ("whole", "resize") or list(tta.scales) != [1.0] or tta.flip:
        log.warning(
            "The export reproduces whole-image (or eval.mode=resize) prediction without "
            "test-time augmentation; "
            "eval.mode=%s and eval.tta are not part of it",
            cfg.eval.mode,
        )


def _metadata(cfg: DictConfig, checkpoint: Path, predictor: Predictor, input_size) -> dict:
    fmt = cfg.export.format
    height, width = input_size or ("H", "W")
    batch = "1" if fmt == "tflite" else "B"
    outputs = {IDS_NAME: f"uint8 [{batch}, {height}, {width}]"}
    if cfg.export.with_probabilities:
        outputs[PROBS_NAME] = f"float32 [{batch}, {height}, {width}, {cfg.data.num_classes}]"
    return {
        "format": fmt,
        "artefact": ARTEFACT_NAMES[fmt],
        "signature": SIGNATURE,
        "inputs": {INPUT_NAME: f"uint8 [{batch}, {height}, {width}, 3] RGB, 0..255"},
        "outputs": outputs,
        "num_classes": cfg.data.num_classes,
        "class_names": list(cfg.data.class_names),
        "palette": OmegaConf.to_container(cfg.data.palette) if cfg.data.get("palette") else None,
        "preprocessing": (
            f"resized bilinearly to the model's input size {list(predictor.fixed_size)}"
            if predictor.resize_to_fixed
            else f"padded bottom/right with RGB {predictor.pad_colour} to a multiple of "
            f"{predictor.size_divisor}"
        ),
        "checkpoint": str(checkpoint.resolve()),
        "dataset": cfg.data.name,
    }


# ----- entry point -----------------------------------------------------------------------------
def run(cfg: DictConfig) -> float | None:
    """Exports `cfg.ckpt_path` as `cfg.export.format`; returns the parity agreement (or None)."""
    options = cfg.export
    run_root = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_root, ignore=(".hydra",))
    out_dir = Path(options.output_dir or run_root / "export").expanduser()
    # Fail before the slow part; publish() checks again before replacing anything.
    refuse_existing(out_dir, options.overwrite)
    checkpoint = open_checkpoint(cfg)
    _warn_about_ignored_eval_options(cfg)
    runtime.seed_everything(cfg.seed)
    predictor = _export_predictor(cfg, load_model(checkpoint, output_channels(cfg)))
    if is_matting_data(cfg.data):  # alpha output; parity by the largest absolute difference
        from seg_train.tasks.export_matting import run as export_alpha

        return export_alpha(cfg, predictor, checkpoint, out_dir)
    fmt = options.format
    # TFLite needs a static input; a size-agnostic model gets the training crop size.
    input_size = (predictor.fixed_size or tuple(cfg.data.crop_size)) if fmt == "tflite" else None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        report = _write_and_check(cfg, predictor, checkpoint, staging, input_size)
        publish(staging, out_dir, options.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Export written to %s", out_dir)
    return _parity_verdict(report, fmt, options.parity_threshold, out_dir)


def _export_predictor(cfg: DictConfig, model: keras.Model) -> Predictor:
    """Whole (or resize) mode without TTA: what a single forward graph can reproduce."""
    resize = cfg.eval.mode == "resize"
    return Predictor(
        model,
        mode="resize" if resize else "whole",
        crop_size=cfg.eval.crop_size if resize else None,
        size_divisor=cfg.eval.size_divisor,
        pad_value=cfg.data.get("pad_value", 0),
        # The export runs every image whole: compare like with like.
        max_whole_pixels=None,
    )


def _write_and_check(
    cfg: DictConfig, predictor: Predictor, checkpoint: Path, staging: Path, input_size
) -> dict | None:
    """Writes the artefact and metadata.json into `staging`; returns the parity report, or
    None when `export.parity_images=0`."""
    options = cfg.export
    fmt = options.format
    artefact = staging / ARTEFACT_NAMES[fmt]
    if fmt == "saved_model":
        write_saved_model(predictor, artefact, options.with_probabilities)
    else:
        write_tflite(predictor, artefact, options.with_probabilities, input_size)
    log.info("Wrote %s %s", fmt, artefact)
    write_json_atomic(staging / METADATA_FILE, _metadata(cfg, checkpoint, predictor, input_size))
    if not options.parity_images:
        return None
    images = val_images(cfg, options.parity_images)
    if input_size is not None:
        # The same resized uint8 images go to both sides, so only the models differ.
        images = [resize_uint8(image, input_size) for image in images]
    report = check_parity(artefact, fmt, predictor, images, options.parity_threshold)
    report.update(
        format=fmt,
        artefact=ARTEFACT_NAMES[fmt],
        input_size=list(input_size) if input_size else "original",
        reference=f"Predictor {predictor.mode} mode, no TTA, size_divisor={predictor.size_divisor}",
        checkpoint=str(checkpoint.resolve()),
    )
    write_json_atomic(staging / PARITY_FILE, report)
    return report


def _parity_verdict(report: dict | None, fmt: str, threshold: float, out_dir: Path) -> float | None:
    """Prints the parity line; raises `UserError` below `export.parity_threshold`."""
    if report is None:
        log.warning("Parity check skipped (export.parity_images=0)")
        return None
    print(
        f"Export parity ({fmt}): {100 * report['agreement']:.3f}% of "
        f"{report['num_pixels']:,} pixels on {report['num_images']} val images agree with "
        f"in-framework predictions (worst image {100 * report['min_image_agreement']:.3f}%, "
        f"threshold {100 * threshold:.1f}%); see {out_dir / PARITY_FILE}"
    )
    if not report["passed"]:
        # The export stays in place, with parity.json, for inspection.
        raise UserError(
            f"the {fmt} export in {out_dir} agrees with in-framework predictions on only "
            f"{100 * report['agreement']:.3f}% of pixels, below export.parity_threshold="
            f"{threshold}; see {out_dir / PARITY_FILE}"
        )
    return report["agreement"]
