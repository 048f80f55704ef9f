"""Fit-time building blocks: compile a training view, restore a backup, run `fit` in segments
from any point of a run (a resumed half-done epoch first), and the pre-fit label check.

Everything here takes explicit arguments; `seg_train.tasks.instantiate` builds them from the
config.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from seg_train.errors import UserError
from seg_train.training import backup
from seg_train.training.multiscale import TrainingView

log = logging.getLogger(__name__)

OVERFIT_TARGET = 0.9


def compile_model(
    view: TrainingView,
    optimizer: keras.optimizers.Optimizer,
    loss,
    metrics: Sequence[keras.metrics.Metric],
    jit_compile: bool | str = "auto",
    steps_per_execution: int = 1,
) -> None:
    """Compiles the view's training model with `loss` and `metrics` placed on its outputs.

    Call under the strategy scope: the optimizer creates variables.

    Args:
        view: The model and the view `fit` trains (see `TrainingView`).
        optimizer: The optimizer (its schedule already knows the run's length).
        loss: The segmentation loss; a multi-output view puts it on every score map.
        metrics: Metrics of the (fused) logits, e.g. mean IoU.
        jit_compile: Keras' `jit_compile` (XLA).
        steps_per_execution: Batches per compiled call.
    """
    view.train_model.compile(
        optimizer=optimizer,
        loss=view.losses(loss),
        metrics=view.metrics(metrics),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Marks a dataset for per-element sharding across workers.

    Our datasets start from in-memory path lists, so file-level auto-sharding cannot apply;
    saying so avoids every worker warning and falling back.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def restore(
    model: keras.Model, weights: Path, state: backup.TrainingState, callbacks: list
) -> None:
    """Loads a backup into a compiled model and its callbacks, and says what was restored.

    The CSV log keeps the rows of the epochs finished before the backup; rows of later epochs
    (written after it, before the process died) are dropped, so each epoch appears once.
    """
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(weights)
    first_redone = state.epoch - 1 if state.pending_epoch_end is not None else state.epoch
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.ModelCheckpoint) and state.best is not None:
            callback.best = state.best
        if isinstance(callback, keras.callbacks.CSVLogger):
            callback.append = True  # keep the epochs logged before the interruption
            drop_csv_rows_from(Path(callback.filename), first_redone)
    log.info(
        "Resumed from %s: epoch %d, batch %d of it, optimizer step %d, best %s%s",
        weights.parent,
        state.epoch + 1,
        state.step,
        int(model.optimizer.iterations.numpy()),
        "n/a" if state.best is None else f"{state.best:.5f}",
        "" if state.pending_epoch_end is None else f"; the end of epoch {state.epoch} first",
    )


def drop_csv_rows_from(path: Path, epoch: int) -> None:
    """Removes the rows of `epoch` and later from a CSVLogger file (0-based epochs, as logged)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]] + [
        line for line in lines[1:] if line.strip() and int(line.split(",", 1)[0]) < epoch
    ]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        log.info("history.csv: dropped %d row(s) of epochs redone now", len(lines) - len(kept))


def fit_from(
    model: keras.Model,
    train_data: Callable[[int], tf.data.Dataset],
    val_ds: tf.data.Dataset | None,
    state: backup.TrainingState,
    steps_per_epoch: int,
    epochs: int,
    callbacks: list,
    validation_freq: int = 1,
    verbose: int | str = "auto",
) -> None:
    """Runs fit from `state` to `epochs`.

    First the end of an epoch whose batches were all done (validation, checkpoint, CSV row,
    backup), then the rest of a half-done epoch, then whole epochs.

    Args:
        model: The compiled training model.
        train_data: The training batches from a given batch of the run on (each `fit` call
            needs its own stream starting where the previous one stopped).
        val_ds: Validation batches for fit, or None (no validation in fit).
        state: Where the run is.
        steps_per_epoch: Batches per epoch.
        epochs: The run's epochs.
        callbacks: The callbacks of the run.
        validation_freq: Validate every this many epochs.
        verbose: `trainer.verbose` (see `progress_verbosity`).
    """
    state = backup.normalise(state, steps_per_epoch)
    if state.pending_epoch_end is not None:
        finish_epoch(
            model,
            val_ds,
            state.epoch - 1,
            state.pending_epoch_end,
            callbacks,
            epochs=epochs,
            validation_freq=validation_freq,
        )
    segments = []
    if state.step:
        segments.append((state.epoch, state.epoch + 1, steps_per_epoch - state.step))
        segments.append((state.epoch + 1, epochs, steps_per_epoch))
    else:
        segments.append((state.epoch, epochs, steps_per_epoch))
    for initial_epoch, end_epoch, steps in segments:
        if initial_epoch >= end_epoch:
            continue
        start_batch = (initial_epoch + 1) * steps_per_epoch - steps
        model.fit(
            train_data(start_batch),
            initial_epoch=initial_epoch,
            epochs=end_epoch,
            steps_per_epoch=steps,
            validation_data=val_ds,
            validation_freq=validation_freq,
            callbacks=callbacks,
            verbose=progress_verbosity(verbose),
        )
        _continue_csv(callbacks)


def progress_verbosity(setting: int | str) -> int | str:
    """Keras' `fit` verbosity for `trainer.verbose`.

    auto: a progress bar on a terminal; one line per epoch otherwise (a log file, a Slurm job,
    `| tee`), where the bar's carriage-return updates would fill the log.
    """
    if setting == "auto":
        return 1 if sys.stdout.isatty() else 2
    return setting


def finish_epoch(
    model: keras.Model,
    val_ds: tf.data.Dataset | None,
    epoch: int,
    train_logs: dict,
    callbacks: list,
    epochs: int,
    validation_freq: int = 1,
) -> None:
    """Runs the end of `epoch` as `fit` would have: validation, then every callback's epoch end
    (checkpoint, CSV row, TensorBoard, backup) with the epoch's saved training logs."""
    logs = dict(train_logs)
    if val_ds is not None and (epoch + 1) % validation_freq == 0:
        results = model.evaluate(val_ds, verbose=0, return_dict=True)
        logs.update({f"val_{name}": value for name, value in results.items()})
    hooks = keras.callbacks.CallbackList(callbacks, model=model, epochs=epochs)
    hooks.on_train_begin()
    hooks.on_epoch_begin(epoch)
    hooks.on_epoch_end(epoch, logs)
    hooks.on_train_end(logs)
    _continue_csv(callbacks)


def _continue_csv(callbacks: list) -> None:
    """A later `fit` call continues the same CSV log."""
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.CSVLogger):
            callback.append = True


def check_overfit(model: keras.Model, batches: tf.data.Dataset) -> None:
    """Says whether the model learnt the batches it was fitted on (mean IoU > 0.9)."""
    results = model.evaluate(batches, verbose=0, return_dict=True)
    mean_iou = next(v for k, v in results.items() if k.endswith("mean_iou"))
    if mean_iou <= OVERFIT_TARGET:
        raise UserError(
            f"overfit check FAILED: train mean IoU on the fixed batch is {mean_iou:.4f} <= "
            f"{OVERFIT_TARGET}; the model, loss or labels are broken, or it needs more steps "
            "(trainer.epochs) or another optimizer.learning_rate"
        )
    log.info(
        "Overfit check PASSED: train mean IoU on the fixed batch %.4f > %s",
        mean_iou,
        OVERFIT_TARGET,
    )


# How many training masks are looked at before fitting.
LABEL_SAMPLE = 16


def check_label_sample(
    dataset: tf.data.Dataset, ignore_label: int, root: str | None = None
) -> None:
    """Refuses 0/255 binary masks before training on them.

    Saved as 0/255, a foreground class is read as the ignore label: training would silently
    learn the background only. The first masks of the train split tell: real datasets show
    some class other than 0 there, and ignore bands only ever surround objects.
    """
    counts = np.zeros(256, np.int64)
    for _, mask in dataset.take(LABEL_SAMPLE).as_numpy_iterator():
        counts += np.bincount(mask.ravel(), minlength=256)
    present = set(np.flatnonzero(counts).tolist())
    ignored = counts[ignore_label] / max(counts.sum(), 1)
    if present == {0, ignore_label}:
        raise UserError(
            f"the first train masks of data.root={root} hold only 0 and "
            f"{ignore_label} ({100 * ignored:.0f}% of pixels): {ignore_label} is the "
            f"ignore label, so these look like 0/{ignore_label} binary masks; add "
            f"'data.label_map={{{ignore_label}:1}}' to train on them as 0/1 (or save the "
            "foreground as 1; see seg-train check)"
        )
