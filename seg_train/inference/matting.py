"""Matting evaluation at original resolution: SAD, MSE, Grad, Conn and the thresholded IoU.

Each image is fed to the model (resized to the training size, as `eval.mode=resize` does for
segmentation, or as it is), the predicted alpha is resized bilinearly back to the image's
original size, and the four errors of `seg_train.inference.matting_metrics` are computed against the
matte / 255 there, then averaged over images (the benchmark's convention). The segmentation
view of the same prediction, for comparing matting and segmentation runs: person = alpha >
`alpha_threshold` against person = matte > `data.matte_threshold` (the segmentation runs'
own truth), counted in the segmentation reports' `ConfusionMatrix`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf

from seg_train.inference import matting_metrics as metrics
from seg_train.inference.metrics import ConfusionMatrix

CLASS_NAMES = ("background", "person")
# A predicted alpha above this is person in the thresholded-IoU view (a two-class softmax's
# decision rule, p(person) > 0.5).
ALPHA_THRESHOLD = 0.5


def predict_alpha(model, image: np.ndarray, size: Sequence[int] | None = None) -> np.ndarray:
    """The model's alpha for one uint8 image [H, W, 3], as float64 [H, W] in [0, 1].

    Args:
        model: A matting model (float 0..255 images -> alpha [B, h, w, 1]).
        image: The image at its original size.
        size: Feed the model the image resized bilinearly to this [h, w] (the training crop);
            None = feed it as it is.
    """
    height, width = image.shape[:2]
    batch = tf.convert_to_tensor(image[None], tf.float32)
    if size is not None:
        batch = tf.image.resize(batch, list(size), method="bilinear")
    alpha = model(batch, training=False)
    # Bilinear back to the original size: alpha is continuous, like logits.
    alpha = tf.image.resize(tf.cast(alpha, tf.float32), [height, width], method="bilinear")
    return np.clip(alpha.numpy()[0, ..., 0].astype(np.float64), 0.0, 1.0)


class MattingScores:
    """Accumulates the per-image matting errors and the thresholded two-class confusion.

    Args:
        matte_threshold: Truth person = matte > this (0..254), as `data.matte_threshold`.
        alpha_threshold: Predicted person = alpha > this (0..1).
    """

    def __init__(self, matte_threshold: int = 0, alpha_threshold: float = ALPHA_THRESHOLD):
        self.matte_threshold = matte_threshold
        self.alpha_threshold = alpha_threshold
        self.rows: list[dict[str, float]] = []
        self.confusion = ConfusionMatrix(num_classes=2)

    def update(self, matte: np.ndarray, alpha: np.ndarray) -> dict[str, float]:
        """Adds one image: its uint8 matte [H, W] and predicted alpha [H, W] in [0, 1]."""
        errors = metrics.matting_errors(alpha, matte.astype(np.float64) / 255.0)
        self.rows.append(errors)
        self.confusion.update(
            (matte > self.matte_threshold).astype(np.uint8),
            (alpha > self.alpha_threshold).astype(np.uint8),
        )
        return errors

    def summary(self) -> dict:
        """{sad, mse, grad, conn (image means), num_images, segmentation: the IoU report}."""
        return {
            **metrics.mean_errors(self.rows),
            "num_images": len(self.rows),
            "segmentation": {
                **self.confusion.summary(CLASS_NAMES),
                "truth": f"matte > {self.matte_threshold}",
                "prediction": f"alpha > {self.alpha_threshold}",
            },
        }


def evaluate_alpha(
    model,
    examples: Iterable[tuple[np.ndarray, np.ndarray]],
    size: Sequence[int] | None = None,
    matte_threshold: int = 0,
    alpha_threshold: float = ALPHA_THRESHOLD,
) -> dict:
    """Scores a model on (uint8 image [H, W, 3], uint8 matte [H, W]) pairs at original size.

    `examples` is e.g. `pipeline.decoded_dataset(source, "val").as_numpy_iterator()` of a
    matting source. Returns `MattingScores.summary()`.
    """
    scores = MattingScores(matte_threshold, alpha_threshold)
    for image, matte in examples:
        scores.update(matte, predict_alpha(model, image, size))
    return scores.summary()
