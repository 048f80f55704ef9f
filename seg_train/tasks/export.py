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
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from seg_train import runtime
from seg_train.config_checks import boolean, is_matting_data
from seg_train.data.augment import pad_image
from seg_train.data.pipeline import decoded_dataset
from seg_train.errors import UserError
from seg_train.files import ensure_fresh_run_dir, write_json_atomic
from seg_train.inference.predictor import Predictor
from seg_train.tasks.checkpoint import load_model, open_checkpoint, output_channels
from seg_train.tasks.sources import build_source

log = logging.getLogger(__name__)

FORMATS = ("saved_model", "tflite")
# Names inside the export dir, and of the serving signature's tensors.
ARTEFACT_NAMES = {"saved_model": "saved_model", "tflite": "model.tflite"}
SIGNATURE = "serving_default"
INPUT_NAME = "images"
IDS_NAME = "class_ids"
PROBS_NAME = "probabilities"
PARITY_FILE = "parity.json"
METADATA_FILE = "metadata.json"


# ----- the serving graph -----------------------------------------------------------------------
def whole_logits(predictor: Predictor, pixels: tf.Tensor) -> tf.Tensor:
    """`Predictor`'s whole-mode logits for a float32 batch, with shapes known only at run time.

    `Predictor._run` reads sizes from static shapes; a serving graph must accept any size, so
    the same steps are written here with `tf.shape`. `eval.mode=resize` is exported as such
    (resize to `eval.crop_size`, logits resized back).

    Args:
        predictor: Supplies the network (the dynamic twin when there is one), the fixed-size
            fallback and `size_divisor`.
        pixels: float32 [B, H, W, 3] images in 0..255.

    Returns:
        float32 logits [B, H, W, C].
    """
    net = predictor.model
    height, width = tf.shape(pixels)[1], tf.shape(pixels)[2]
    if predictor.resize_to is not None:  # eval.mode=resize, or a fixed-size model
        resized = tf.image.resize(pixels, predictor.resize_to, method="bilinear")
        logits = net(resized, training=False)
        return tf.image.resize(logits, tf.stack([height, width]), method="bilinear")
    divisor = predictor.size_divisor
    # Bottom/right with the pad colour (data.pad_value) as in Predictor: the top-left pixels
    # then see the same receptive field.
    padded = pad_image(
        pixels, [[0, (-height) % divisor], [0, (-width) % divisor]], predictor.pad_colour
    )
    return net(padded, training=False)[:, :height, :width]


def serving_function(
    predictor: Predictor, with_probabilities: bool
) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """uint8 images [B, H, W, 3] -> {class_ids: uint8 [B, H, W], probabilities?: [B, H, W, C]}."""

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = whole_logits(predictor, tf.cast(images, tf.float32))
        # Class ids are < 255 (255 is the ignore label), so uint8 holds them, as in Predictor.
        outputs = {IDS_NAME: tf.cast(tf.argmax(logits, axis=-1), tf.uint8)}
        if with_probabilities:
            outputs[PROBS_NAME] = tf.nn.softmax(logits, axis=-1)
        return outputs

    return serve


def write_saved_model(
    predictor: Predictor,
    path: Path,
    with_probabilities: bool,
    input_size: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> None:
    """Writes a SavedModel whose `serving_default` signature runs `serving_function`.

    Args:
        predictor: The in-framework predictor whose whole (or resize) mode is exported.
        path: Directory to create.
        with_probabilities: Also output softmax probabilities.
        input_size: [H, W] to fix the input size (for TFLite); None = any size.
        batch_size: Fixed batch size (for TFLite); None = any.
    """
    height, width = input_size or (None, None)
    spec = tf.TensorSpec([batch_size, height, width, 3], tf.uint8, name=INPUT_NAME)
    archive = keras.export.ExportArchive()
    archive.track(predictor.model)
    archive.add_endpoint(SIGNATURE, serving_function(predictor, with_probabilities), [spec])
    archive.write_out(str(path), verbose=False)


def write_tflite(
    predictor: Predictor, path: Path, with_probabilities: bool, input_size: Sequence[int]
) -> None:
    """Converts the serving graph for one uint8 image of `input_size` into a TFLite file."""
    with tempfile.TemporaryDirectory(prefix="seg-train-tflite-") as tmp:
        write_saved_model(predictor, Path(tmp), with_probabilities, input_size, batch_size=1)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[SIGNATURE])
        # Built-in kernels only: a file needing the Flex (full TensorFlow) delegate would not run
        # on a stock mobile runtime. No quantisation: it would cost parity.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            flatbuffer = converter.convert()
        except Exception as exc:  # noqa: BLE001 - the converter raises several error types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UserError(
                f"export.format=tflite: the model needs operations TFLite has no built-in "
                f"kernel for ({first_line}); use export.format=saved_model"
            ) from exc
    path.write_bytes(flatbuffer)


# ----- parity ----------------------------------------------------------------------------------
def resize_uint8(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a uint8 image, rounded back to uint8 (unchanged if already that size)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    resized = tf.image.resize(tf.convert_to_tensor(image), list(size), method="bilinear")
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8).numpy()


def val_images(cfg: DictConfig, count: int) -> list[np.ndarray]:
    """The first `count` val images (uint8 [H, W, 3]) of the run's dataset."""
    examples = decoded_dataset(build_source(cfg.data), "val")
    images = [image for image, _ in examples.take(count).as_numpy_iterator()]
    if not images:
        raise UserError(
            f"data {cfg.data.name} has no val images for the export parity check; "
            "fix the data config or skip the check with export.parity_images=0"
        )
    return images


def run_in_fresh_process(artefact: Path, fmt: str, images: list[np.ndarray]) -> list[np.ndarray]:
    """Class ids of `images` from the exported artefact, computed by a new Python process.

    A new process proves the artefact is self-contained: nothing of this process's Keras
    objects, custom layers or TensorFlow state can leak into the result.
    """
    with tempfile.TemporaryDirectory(prefix="seg-train-parity-") as tmp:
        inputs, outputs = Path(tmp) / "images.npz", Path(tmp) / "class_ids.npz"
        np.savez(inputs, **{f"image_{i:05d}": image for i, image in enumerate(images)})
        command = [
            sys.executable,
            "-m",
            "seg_train.tasks.export_check",
            str(artefact),
            f"--format={fmt}",
            f"--images={inputs}",
            f"--output={outputs}",
        ]
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            # Not a user error: a freshly written artefact that cannot run is a bug here.
            raise RuntimeError(
                f"the exported {fmt} at {artefact} failed in a fresh process "
                f"({' '.join(command)}):\n{result.stderr[-3000:]}"
            )
        with np.load(outputs) as predicted:
            return [predicted[f"ids_{i:05d}"] for i in range(len(images))]


def pixel_agreement(exported: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Share of pixels whose class ids agree, overall and for the worst image."""
    agreeing = total = 0
    per_image = []
    for ids, expected in zip(exported, reference):
        # A wrong output shape counts as total disagreement rather than crashing the report.
        same = int((ids == expected).sum()) if ids.shape == expected.shape else 0
        agreeing += same
        total += expected.size
        per_image.append(same / max(expected.size, 1))
    return {
        "agreement": agreeing / max(total, 1),
        "agreeing_pixels": agreeing,
        "num_pixels": total,
        "num_images": len(reference),
        "min_image_agreement": min(per_image, default=1.0),
    }


def check_parity(
    artefact: Path, fmt: str, predictor: Predictor, images: list[np.ndarray], threshold: float
) -> dict:
    """Compares the exported artefact (in a fresh process) with `predictor` on `images`."""
    reference = [predictor.labels(image) for image in images]
    exported = run_in_fresh_process(artefact, fmt, images)
    report = pixel_agreement(exported, reference)
    report.update(threshold=threshold, passed=report["agreement"] >= threshold)
    return report


# ----- files -----------------------------------------------------------------------------------
def refuse_existing(out_dir: Path, overwrite: bool) -> None:
    """Raises `UserError` if `out_dir` already holds something and `overwrite` is off."""
    occupied = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if occupied and not overwrite:
        raise UserError(
            f"export.output_dir {out_dir} already holds an export; pass export.overwrite=true "
            "to replace it or choose another export.output_dir"
        )


def publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Moves a finished export from `staging` to `out_dir` by renames on the same filesystem.

    Readers see either the old export or the complete new one, never a half-written one; the
    old one is deleted only after the new one is in place.
    """
    refuse_existing(out_dir, overwrite)  # again: another process may have written meanwhile
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _check_export_config(cfg: DictConfig) -> None:
    """Checks the export keys and the checkpoint (config_checks only knows train/eval/infer)."""
    options = cfg.export
    if options.format not in FORMATS:
        raise UserError(
            f"config key export.format must be one of {', '.join(FORMATS)}, "
            f"got {options.format!r}; e.g. export.format=tflite"
        )
    count = options.parity_images
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        raise UserError(
            f"config key export.parity_images must be an integer >= 0 (0 skips the parity "
            f"check), got {count!r}"
        )
    threshold = options.parity_threshold
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)) or not (
        0.0 <= threshold <= 1.0
    ):
        raise UserError(
            f"config key export.parity_threshold must be a share in 0..1, got {threshold!r}; "
            "e.g. export.parity_threshold=0.999"
        )
    for key in ("with_probabilities", "overwrite"):
        boolean(f"export.{key}", options[key])
    if cfg.ckpt_path is None:
        raise UserError(
            "mode=export needs a checkpoint: pass ckpt_path=RUN_DIR (a training run dir) "
            "or ckpt_path=path/to/model.keras"
        )
    if not Path(str(cfg.ckpt_path)).expanduser().exists():
        raise UserError(
            f"ckpt_path {cfg.ckpt_path} does not exist; pass a training run dir or a .keras file"
        )


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
    _check_export_config(cfg)
    options = cfg.export
    run_root = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_root, ignore=(".hydra",))
    out_dir = Path(options.output_dir or run_root / "export").expanduser()
    # Fail before the slow part; publish() checks again before replacing anything.
    refuse_existing(out_dir, options.overwrite)
    checkpoint = open_checkpoint(cfg)
    _warn_about_ignored_eval_options(cfg)
    runtime.seed_everything(cfg.seed)
    model = load_model(checkpoint, output_channels(cfg))
    # Whole (or resize) mode without TTA: what a single forward graph can reproduce.
    resize = cfg.eval.mode == "resize"
    predictor = Predictor(
        model,
        mode="resize" if resize else "whole",
        crop_size=cfg.eval.crop_size if resize else None,
        size_divisor=cfg.eval.size_divisor,
        pad_value=cfg.data.get("pad_value", 0),
        # The export runs every image whole: compare like with like.
        max_whole_pixels=None,
    )
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
        artefact = staging / ARTEFACT_NAMES[fmt]
        if fmt == "saved_model":
            write_saved_model(predictor, artefact, options.with_probabilities)
        else:
            write_tflite(predictor, artefact, options.with_probabilities, input_size)
        log.info("Wrote %s %s", fmt, artefact)
        write_json_atomic(
            staging / METADATA_FILE, _metadata(cfg, checkpoint, predictor, input_size)
        )
        report = None
        if options.parity_images:
            images = val_images(cfg, options.parity_images)
            if input_size is not None:
                # The same resized uint8 images go to both sides, so only the models differ.
                images = [resize_uint8(image, input_size) for image in images]
            report = check_parity(artefact, fmt, predictor, images, options.parity_threshold)
            report.update(
                format=fmt,
                artefact=ARTEFACT_NAMES[fmt],
                input_size=list(input_size) if input_size else "original",
                reference=f"Predictor {predictor.mode} mode, no TTA, "
                f"size_divisor={predictor.size_divisor}",
                checkpoint=str(checkpoint.resolve()),
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
        f"Export parity ({fmt}): {100 * report['agreement']:.3f}% of "
        f"{report['num_pixels']:,} pixels on {report['num_images']} val images agree with "
        f"in-framework predictions (worst image {100 * report['min_image_agreement']:.3f}%, "
        f"threshold {100 * options.parity_threshold:.1f}%); see {out_dir / PARITY_FILE}"
    )
    if not report["passed"]:
        # The export stays in place, with parity.json, for inspection.
        raise UserError(
            f"the {fmt} export in {out_dir} agrees with in-framework predictions on only "
            f"{100 * report['agreement']:.3f}% of pixels, below export.parity_threshold="
            f"{options.parity_threshold}; see {out_dir / PARITY_FILE}"
        )
    return report["agreement"]
