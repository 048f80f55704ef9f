"""Keras callbacks of our own (the rest come straight from `keras.callbacks` via config)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

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
        class_names: Names for the panels' column titles and class legend (None: bare panels).
        display_model: The single-output model to predict with (the model `fit` trains may be
            a multi-output view of it); None: the model being trained.
    """

    def __init__(
        self,
        log_dir: str,
        val_images: np.ndarray,
        val_masks: np.ndarray,
        palette: np.ndarray,
        max_images: int = 4,
        class_names: Sequence[str] | None = None,
        display_model: keras.Model | None = None,
    ):
        super().__init__()
        self.display_model = display_model
        self.images = val_images[:max_images]
        self.masks = val_masks[:max_images]
        self.palette = palette
        self.class_names = list(class_names) if class_names is not None else None
        self.writer = tf.summary.create_file_writer(log_dir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # A plain call, not model.predict: under a multi-worker strategy predict() would start
        # collective ops that the other workers (which log nothing) never join.
        model = self.display_model or self.model
        logits = model(self.images, training=False)
        predictions = np.asarray(logits).argmax(-1).astype(np.uint8)
        panels = _same_size(
            [
                sample_panel(image, mask, prediction, self.palette, class_names=self.class_names)
                for image, mask, prediction in zip(self.images, self.masks, predictions)
            ]
        )
        with self.writer.as_default():
            tf.summary.image(
                "val/image_truth_prediction", panels, step=epoch, max_outputs=len(panels)
            )
        self.writer.flush()


def _same_size(panels: list[np.ndarray]) -> np.ndarray:
    """The panels as one batch, each padded with white to the largest (their legends differ)."""
    height = max(p.shape[0] for p in panels)
    width = max(p.shape[1] for p in panels)
    batch = np.full((len(panels), height, width, 3), 255, np.uint8)
    for index, panel in enumerate(panels):
        batch[index, : panel.shape[0], : panel.shape[1]] = panel
    return batch


class OriginalResolutionValidation(keras.callbacks.Callback):
    """Validates at original resolution and writes `val_mean_iou` etc. into the epoch logs.

    `trainer.val_protocol=original`: every `validation_freq` epochs the val split is evaluated
    through `evaluator` (a `seg_train.tasks.evaluate.SplitEvaluator`: the Predictor, test-time
    augmentation, CRF and `ConfusionMatrix` of the final report), so the `val_mean_iou` that
    ModelCheckpoint selects `best.keras` on is the number the report prints for it. Place it
    before ModelCheckpoint, CSVLogger and TensorBoard, which read the logs it fills.

    The evaluator holds the saved single-output model (not a multi-output training view); its
    weights are copied into the evaluator's size-agnostic twin before each pass. Runs on the
    chief only: it makes plain model calls, no collective ops.

    Args:
        evaluator: Builds predictions and the confusion matrix of the val split.
        class_names: The dataset's class names, for the summary.
        validation_freq: Validate after epochs whose number (1-based) is a multiple of this,
            as Keras' own `validation_freq` does.
    """

    # Summary figures written to the logs as val_<name>.
    LOGGED = ("mean_iou", "pixel_accuracy", "mean_accuracy")

    def __init__(self, evaluator, class_names, validation_freq: int = 1):
        super().__init__()
        self.evaluator = evaluator
        self.class_names = list(class_names)
        self.validation_freq = validation_freq

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or (epoch + 1) % self.validation_freq:
            return
        start = time.perf_counter()
        self.evaluator.predictor.sync_weights()
        matrix, count = self.evaluator.confusion()
        summary = matrix.summary(self.class_names)
        for name in self.LOGGED:
            if summary[name] is not None:
                logs[f"val_{name}"] = summary[name]
        logging.getLogger(__name__).info(
            "Epoch %d: val mIoU %s, pixel accuracy %s on %d images at original resolution (%.1f s)",
            epoch + 1,
            _percent(summary["mean_iou"]),
            _percent(summary["pixel_accuracy"]),
            count,
            time.perf_counter() - start,
        )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _op_determinism_enabled() -> bool:
    """Whether `tf.config.experimental.enable_op_determinism()` is in force (no public getter)."""
    from tensorflow.python.framework import config as tf_config

    return bool(getattr(tf_config, "is_op_determinism_enabled", lambda: False)())


class DataStallMonitor(keras.callbacks.Callback):
    """Logs the share of training-step time spent waiting for input, per epoch.

    Keras pulls each batch inside its compiled train function, so a callback's
    `on_train_batch_begin` / `on_train_batch_end` only see the whole step. The monitor
    therefore wraps the model's `train_step` (and rebuilds the train function once, at
    `on_train_begin`) so that, inside the graph, it stamps `tf.timestamp()`:

    * when the step's batch has arrived (a control dependency on the batch tensors), and
    * when the step's outputs are ready.

    The wait of a step is `arrival - previous end`, where the previous end is the end of the
    previous step in the same function call, or, for the first step of a call, the wall-clock
    time at `on_train_batch_begin` (both clocks are seconds since the epoch). Waits are summed in
    a variable; the step time is measured in Python from `on_train_batch_begin` to
    `on_train_batch_end`, so both cover the same interval and `steps_per_execution > 1` is
    handled. The very first step of a `fit` call is left out: it holds the graph tracing and
    the filling of the shuffle and prefetch buffers, which would say nothing about steady state.

    The share is logged (python logging) and written to TensorBoard as `data_stall` each epoch;
    above `warn_above` it is a warning. Not measured (and said once) under XLA
    (`jit_compile=True`: `tf.timestamp` cannot be compiled), under op determinism
    (`trainer.deterministic=true`: TensorFlow refuses `tf.timestamp` there) or with more than
    one replica.

    Args:
        log_dir: TensorBoard log dir for the scalar; None = console only.
        warn_above: Share above which a warning is logged (0.10 = 10%).
        skip_steps: Steps left out at the start of each `fit` call (at least the first, which
            holds the tracing); `mode=benchmark` leaves out its whole warm-up.

    Attributes:
        inactive_reason: Why the last `fit` was not measured (XLA, op determinism, replicas),
            None when it was.
    """

    def __init__(self, log_dir: str | None = None, warn_above: float = 0.10, skip_steps: int = 1):
        super().__init__()
        self.log_dir = log_dir
        self.warn_above = warn_above
        self.skip_steps = max(1, skip_steps)
        self.history: list[float] = []
        self.inactive_reason: str | None = None
        self._writer = None
        self._active = False

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        reason = None
        if getattr(model, "jit_compile", False):
            reason = "jit_compile=True (tf.timestamp cannot run under XLA)"
        elif _op_determinism_enabled():
            reason = "trainer.deterministic=true (tf.timestamp is refused under op determinism)"
        elif model.distribute_strategy.num_replicas_in_sync > 1:
            reason = "more than one replica"
        self.inactive_reason = reason
        if reason:
            logging.getLogger(__name__).info("DataStallMonitor: not measured with %s", reason)
            self._active = False
            if getattr(model, "_data_stall_inner_step", None) is not None:
                # Instrumented by an earlier fit: its stamps would fail now; unwrap the step.
                model.train_step = model._data_stall_inner_step
                model._data_stall_inner_step = model._data_stall_monitor = None
                model.make_train_function(force=True)
            return
        if getattr(model, "_data_stall_monitor", None) is not self:
            self._instrument(model)
        self._active = True
        self._skip = self.skip_steps  # the first step(s): tracing and buffer filling

    def _instrument(self, model: keras.Model) -> None:
        """Wraps `model.train_step` with the in-graph stamps and rebuilds the train function."""
        # float64: seconds since the epoch need ~1e-6 resolution on ~1.8e9.
        self._wait = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self._last_end = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        inner = getattr(model, "_data_stall_inner_step", None) or model.train_step
        wait, last_end = self._wait, self._last_end

        def train_step(data):
            with tf.control_dependencies(tf.nest.flatten(data)):
                arrived = tf.timestamp()
            with tf.control_dependencies([wait.assign_add(tf.maximum(arrived - last_end, 0.0))]):
                outputs = inner(data)
            with tf.control_dependencies(tf.nest.flatten(outputs)):
                last_end.assign(tf.timestamp())
            return outputs

        model._data_stall_inner_step = inner
        model._data_stall_monitor = self
        model.train_step = train_step
        model.make_train_function(force=True)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._step_time = 0.0
        self._epoch_wait = 0.0
        self._steps = 0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._active:
            self._wait_before = float(self._wait.numpy())
            self._last_end.assign(time.time())
            self._begin = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self._active:
            return
        elapsed = time.perf_counter() - self._begin
        if self._skip:
            self._skip -= 1
            return
        self._step_time += elapsed
        self._epoch_wait += float(self._wait.numpy()) - self._wait_before
        self._steps += 1

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self._active or not self._steps:
            return
        share = min(self._epoch_wait / max(self._step_time, 1e-9), 1.0)
        self.history.append(share)
        log = logging.getLogger(__name__)
        message = "Epoch %d: data stall %.1f%% of step time (%.1f ms of %.1f ms per step)"
        args = (
            epoch + 1,
            100 * share,
            1e3 * self._epoch_wait / self._steps,
            1e3 * self._step_time / self._steps,
        )
        if share > self.warn_above:
            log.warning(
                message + "; the input pipeline is the bottleneck: cache decoded data "
                "(data.cache=true), lower the decode cost or raise "
                "data.num_parallel_calls",
                *args,
            )
        else:
            log.info(message, *args)
        if self.log_dir:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default():
                tf.summary.scalar("data_stall", share, step=epoch)
            self._writer.flush()
