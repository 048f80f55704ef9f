"""Per-image prediction at the image's original resolution, shared by eval, infer and training.

The image is resized to the model's input size (when the model has a fixed one), the model runs,
and the logits are resized bilinearly back to the original size before any argmax, so metrics
and predicted masks are always at the resolution of the labels.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class Predictor:
    """Wraps a Keras segmentation model for single images of any size.

    Args:
        model: A model mapping float32 [B, H, W, 3] images (0..255) to logits [B, H, W, C].
    """

    def __init__(self, model):
        self.model = model
        height, width = model.input_shape[1:3]
        self.input_size = (height, width) if height and width else None
        self._logits = tf.function(self._logits_graph, reduce_retracing=True)

    def _logits_graph(self, image: tf.Tensor) -> tf.Tensor:
        original_size = tf.shape(image)[:2]
        batch = tf.cast(image, tf.float32)[None]
        if self.input_size is not None:
            batch = tf.image.resize(batch, self.input_size, method="bilinear")
        logits = self.model(batch, training=False)
        return tf.image.resize(logits, original_size, method="bilinear")[0]

    def logits(self, image: np.ndarray) -> np.ndarray:
        """float32 logits [H, W, C] for a uint8 RGB image [H, W, 3]."""
        return self._logits(tf.convert_to_tensor(image)).numpy()

    def labels(self, image: np.ndarray) -> np.ndarray:
        """uint8 class ids [H, W] for a uint8 RGB image [H, W, 3]."""
        return self.logits(image).argmax(-1).astype(np.uint8)
