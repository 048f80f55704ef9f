"""The exported serving graph and its artefact files: build, write, check in a fresh process,
and publish atomically.

The graph takes uint8 images and returns uint8 class ids (optionally float32 probabilities)
at the input size; everything between is `Predictor`'s whole-image prediction traced into the
graph (see `seg_train.tasks.export` for the why). Nothing here reads the config.
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

from seg_train.data.augment import pad_image
from seg_train.errors import UserError
from seg_train.inference.predictor import Predictor

log = logging.getLogger(__name__)

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
