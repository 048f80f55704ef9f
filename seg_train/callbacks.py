"""Keras callbacks of our own (the rest come straight from `keras.callbacks` via config)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from seg_train.viz import sample_panel


class PredictionImageLogger(keras.callbacks.Callback):
    """Writes image | truth | prediction panels of fixed val images to TensorBoard each epoch.

    Keras' TensorBoard callback logs scalars only; this adds the pictures that show what the
    numbers mean.

    Args:
        log_dir: TensorBoard log dir for the images.
        val_images: float32 [N, H, W, 3] images (0..255), as the model takes them.
        val_masks: uint8 [N, H, W] truth.
        palette: uint8 [256, 3] colours.
        max_images: How many of the images to log.
    """

    def __init__(
        self,
        log_dir: str,
        val_images: np.ndarray,
        val_masks: np.ndarray,
        palette: np.ndarray,
        max_images: int = 4,
    ):
        super().__init__()
        self.images = val_images[:max_images]
        self.masks = val_masks[:max_images]
        self.palette = palette
        self.writer = tf.summary.create_file_writer(log_dir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # A plain call, not model.predict: under a multi-worker strategy predict() would start
        # collective ops that the other workers (which log nothing) never join.
        logits = self.model(self.images, training=False)
        if isinstance(logits, dict):  # a multi-output training view: show the fused output
            logits = logits["fused"]
        predictions = np.asarray(logits).argmax(-1).astype(np.uint8)
        panels = np.stack(
            [
                sample_panel(image, mask, prediction, self.palette)
                for image, mask, prediction in zip(self.images, self.masks, predictions)
            ]
        )
        with self.writer.as_default():
            tf.summary.image(
                "val/image_truth_prediction", panels, step=epoch, max_outputs=len(panels)
            )
        self.writer.flush()
