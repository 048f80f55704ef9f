"""Keras' `MeanIoU` with a cheaper update: the metric `fit` logs on every training step.

Why our own update: Keras 3's `MeanIoU.update_state` builds the confusion matrix with
`ops.scatter` of ones at (label, prediction) pairs, a serial scatter-add over every pixel
of the batch, after separate bounds and ignore masks. On a 64x128x128 batch of the TF
tutorial's recipe that is ~4% of a CPU training step (benchmarks/run_all.py, "sources"
ablation). Counting `label * C + prediction` with `tf.math.bincount` gives the same matrix
(exact integer counts) at a third of the cost, so the training-set mIoU costs the user almost
nothing. Under XLA (`trainer.jit_compile`), which has no bincount kernel, a segment sum counts
instead. Everything else (variables, `result`, `reset_state`, config) is Keras'.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _in_xla_function() -> bool:
    """True while tracing a function that XLA compiles (`trainer.jit_compile`)."""
    try:
        # TensorFlow's own test for this (its public API has none); private, hence the guard.
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return True  # unknown: take the op that compiles everywhere
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@keras.saving.register_keras_serializable(package="seg_train")
class MeanIoU(keras.metrics.MeanIoU):
    """`keras.metrics.MeanIoU` whose batch confusion matrix is a `bincount`.

    Pixels whose label is the ignore class or outside `[0, num_classes)` are not counted, as in
    Keras; so are predictions outside that range (never, after an argmax over the classes).
    """

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds the batch's confusion matrix to the running total.

        Args:
            y_true: Class ids, any shape (a trailing axis of 1 is fine).
            y_pred: Logits or probabilities with classes on `self.axis` (or class ids with
                `sparse_y_pred=True`).
            sample_weight: Optional per-pixel weights, broadcastable to `y_true`.
        """
        if not self.sparse_y_true:
            y_true = tf.argmax(y_true, axis=self.axis)
        if not self.sparse_y_pred:
            y_pred = tf.argmax(y_pred, axis=self.axis)
        classes = self.num_classes
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        predictions = tf.reshape(tf.cast(y_pred, tf.int32), [-1])
        valid = (labels >= 0) & (labels < classes) & (predictions >= 0) & (predictions < classes)
        if self.ignore_class is not None:
            valid &= labels != self.ignore_class
        # Uncounted pixels go to one spare bin past the matrix, which is dropped.
        cells = tf.where(valid, labels * classes + predictions, classes * classes)
        weights = None
        if sample_weight is not None:
            weights = tf.broadcast_to(
                tf.cast(sample_weight, self.dtype), tf.shape(tf.cast(y_true, self.dtype))
            )
            weights = tf.reshape(weights, [-1])
        bins = classes * classes + 1
        if _in_xla_function():  # XLA has no bincount kernel; it compiles a segment sum well
            counts = tf.math.unsorted_segment_sum(
                tf.ones_like(cells, self.dtype) if weights is None else weights, cells, bins
            )
        else:
            counts = tf.math.bincount(
                cells, weights=weights, minlength=bins, maxlength=bins, dtype=self.dtype
            )
        batch_matrix = tf.reshape(counts[: classes * classes], [classes, classes])
        return self.total_cm.assign_add(tf.cast(batch_matrix, self.total_cm.dtype))
