"""Keras callbacks of our own (the rest come straight from `keras.callbacks` via config).

Pictures and measurements: PredictionImageLogger, OriginalResolutionValidation,
DataStallMonitor. Crash safety (see `seg_train.training.backup` for the backup files):
BackupCallback, NaNGuard, AtomicModelCheckpoint.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from seg_train.errors import Preempted
from seg_train.files import ensure_free_space, no_partial_files
from seg_train.training.backup import NonFiniteLoss, TrainingState, variables_bytes, write_backup
from seg_train.training.preemption import resume_hint
from seg_train.viz import sample_panel

log = logging.getLogger(__name__)


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


class BackupCallback(keras.callbacks.Callback):
    """Backs up every `every_steps` batches and at each epoch end; stops on SIGTERM/SIGINT.

    A signal during training stops the run after the current batch, during validation at
    once, each after writing a backup; during the epoch end (checkpoint, CSV row) after the
    epoch-end backup. Exit status 75 and the resume command follow (`Preempted`).

    Args:
        run_dir: The run dir (the backup goes to `run_dir/backup`).
        every_steps: Batches between backups; 0 = only at epoch ends.
        checkpoint: The best-model checkpoint callback whose `best` value is saved, or None.
        state: The state the run (re)starts from.
        steps_per_epoch: Batches per epoch (a backup after an epoch's last batch records the
            next epoch with this one's end pending); None = the steps of the `fit` call.
    """

    def __init__(
        self,
        run_dir: Path,
        every_steps: int,
        checkpoint,
        state: TrainingState,
        steps_per_epoch: int | None = None,
    ):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.every_steps = every_steps
        self.checkpoint = checkpoint
        self.steps_per_epoch = steps_per_epoch
        self.state = TrainingState(state.epoch, state.step, state.global_step, state.best)
        self.signal_received: str | None = None
        self._previous_handlers: dict = {}
        # The epoch's training logs once its last batch is done, until its end has run.
        self._epoch_logs: dict | None = None

    # Signals are only noted here; the backup happens at the next batch end, between steps.
    def _on_signal(self, signum, frame) -> None:
        if self.signal_received:  # a second Ctrl-C: stop now, without a backup
            raise KeyboardInterrupt
        self.signal_received = signal.Signals(signum).name
        log.warning(
            "%s received: stopping after this batch to write a backup", self.signal_received
        )

    def on_train_begin(self, logs=None) -> None:
        if self.steps_per_epoch is None:
            self.steps_per_epoch = self.params.get("steps") or 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, logs=None) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if epoch != self.state.epoch:
            self.state.epoch, self.state.step = epoch, 0
        # A resumed half-done epoch is fitted from its batch `step`, numbered from 0 by Keras.
        self._first_step = self.state.step
        self._epoch_logs = None

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        # `batch` is the last step of the call (several with steps_per_execution > 1).
        self.state.step = self._first_step + batch + 1
        if self._at_epoch_end():
            self._epoch_logs = _plain_logs(logs)
        if self.signal_received:
            self._save()
            self.model.stop_training = True
            self._stop(f"at epoch {self.state.epoch + 1}, batch {self.state.step}")
        iterations = int(self.model.optimizer.iterations.numpy())
        if self.every_steps and iterations // self.every_steps > (
            self.state.global_step // self.every_steps
        ):
            self._save()

    def on_test_batch_end(self, batch: int, logs=None) -> None:
        # Validation inside fit, after the epoch's last batch: the weights are final.
        if self.signal_received and self._epoch_logs is not None:
            self._save()
            self._stop(f"during the validation of epoch {self.state.epoch + 1}")

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.state.epoch, self.state.step = epoch + 1, 0
        self._epoch_logs = None
        self._save()
        if self.signal_received:
            self._stop(f"at the end of epoch {epoch + 1}")

    def _at_epoch_end(self) -> bool:
        """Whether every batch of the current epoch is done (its end not yet run)."""
        return bool(self.steps_per_epoch) and self.state.step >= self.steps_per_epoch

    def _stop(self, where: str) -> None:
        raise Preempted(f"stopped by {self.signal_received} {where}; {resume_hint(self.run_dir)}")

    def _save(self) -> None:
        """Writes a backup of the current position (never "at the end" of an epoch)."""
        self.state.global_step = int(self.model.optimizer.iterations.numpy())
        if self.checkpoint is not None and self.checkpoint.best is not None:
            best = float(self.checkpoint.best)
            self.state.best = best if math.isfinite(best) else None
        position = self.state
        if self._at_epoch_end():
            position = replace(
                self.state,
                epoch=self.state.epoch + 1,
                step=0,
                pending_epoch_end=self._epoch_logs or {},
            )
        write_backup(self.run_dir, self.model, position)


def _plain_logs(logs: dict | None) -> dict:
    """Keras logs as JSON-ready floats."""
    return {str(k): float(v) for k, v in (logs or {}).items()}


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss with the step and the likely causes.

    Raises from the batch end, before any later callback (backup, checkpoint) can save the
    broken weights, so the last good checkpoint and backup stay as they were.

    Args:
        hints: Config facts to quote in the message (learning rate, precision).
    """

    def __init__(self, hints: str = ""):
        super().__init__()
        self.hints = hints
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(self.model.optimizer.iterations.numpy())
            raise NonFiniteLoss(
                f"training loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1} "
                f"(step {step}); likely causes: a learning rate too high, float16 overflow, or "
                f"labels outside 0..num_classes-1 that are not 255 ({self.hints}); "
                "the last good checkpoint and backup were kept"
            )


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that writes to a temporary name and renames it.

    A kill or an error during the save leaves the previous checkpoint in place, whole.
    Set `model_to_save` to save another model than the one being fitted (e.g. an uncompiled
    twin sharing its weights, or the single-output model behind a multi-output training view).
    """

    model_to_save: keras.Model | None = None

    def __init__(self, *args, verbose: int = 0, **kwargs):
        # Keras' own messages name the temporary file being written; `_should_save_model`
        # says the same with the checkpoint's own name.
        super().__init__(*args, verbose=0, **kwargs)
        self.report = verbose

    def _should_save_model(self, epoch, batch, logs, filepath):
        # Keras saves whenever the monitored value is missing, e.g. after an epoch that was not
        # validated (trainer.validation_freq > 1): that would replace the best checkpoint with
        # unvalidated weights. Keep the best one instead.
        if self.save_best_only and (logs or {}).get(self.monitor) is None:
            return False
        previous = self.best
        save = super()._should_save_model(epoch, batch, logs, filepath)
        if self.report > 0:
            final = Path(filepath)  # the temporary name `_save_model` writes to first
            final = final.with_name(final.name.removeprefix(f".tmp-{os.getpid()}-"))
            log.info("Epoch %d: %s", epoch + 1, self._describe(previous, logs, save, final))
        return save

    def _describe(self, previous, logs, save: bool, final: Path) -> str:
        """What the checkpoint did this epoch, naming the file as it will be found."""
        if not self.save_best_only:
            return f"saving {final}"
        was = "none" if previous is None or not math.isfinite(previous) else f"{previous:.5f}"
        if save:
            now = float(logs[self.monitor])
            return f"{self.monitor} improved from {was} to {now:.5f}; saving {final}"
        return f"{self.monitor} did not improve from {was}; {final.name} kept"

    def _save_model(self, epoch, batch, logs):
        final = Path(self._get_file_path(epoch, batch, logs))
        temporary = final.with_name(f".tmp-{os.getpid()}-{final.name}")
        template, self.filepath = self.filepath, str(temporary)
        fitted = self._model
        if self.model_to_save is not None:
            self._model = self.model_to_save  # Keras' _save_model saves self.model
        kept = "the previous checkpoint was kept" if final.exists() else ""
        try:
            # h5py crashes the process after an out-of-space error: check before writing.
            ensure_free_space(final, self._expected_bytes(final), kept)
            with no_partial_files(final, temporary, kept=kept):
                super()._save_model(epoch, batch, logs)
        finally:
            self.filepath = template
            self._model = fitted
        if temporary.exists():
            os.replace(temporary, final)

    def _expected_bytes(self, final: Path) -> int:
        """The checkpoint's expected size: the previous one's, or the variables' bytes."""
        estimate = variables_bytes(self.model, with_optimizer=not self.save_weights_only)
        return max(estimate, final.stat().st_size if final.is_file() else 0)
