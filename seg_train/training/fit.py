"""Building blocks of a training run: compile, callbacks, datasets for fit, and fit segments."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig

from seg_train.config_checks import is_matting_data
from seg_train.errors import UserError
from seg_train.tasks import loggers
from seg_train.training import backup, losses
from seg_train.viz import full_palette

log = logging.getLogger(__name__)

OVERFIT_TARGET = 0.9
# The output of a multi-output training view that metrics and checkpoints follow.
FUSED = "fused"


def training_view(model: keras.Model) -> keras.Model:
    """The model `fit` trains: for DeepLab v2 with multi-scale inputs, a view sharing all its
    weights whose outputs are the fused and every per-scale logits, so the loss applies to each
    (as in the paper); for any other model, the model itself."""
    from seg_train.models import deeplabv2

    if any(layer.name.startswith(deeplabv2.SCALE_LOGITS_PREFIX) for layer in model.layers):
        return deeplabv2.msc_training_model(model)
    return model


def output_names(train_model: keras.Model) -> list[str] | None:
    """The names of a multi-output training view's outputs, None for a single output."""
    return list(train_model.output) if isinstance(train_model.output, dict) else None


def labels_per_output(dataset: tf.data.Dataset, names: list[str] | None) -> tf.data.Dataset:
    """Repeats each batch's labels for every output of a multi-output training view."""
    if names is None:
        return dataset
    return dataset.map(lambda images, labels: (images, {name: labels for name in names}))


def build_and_compile(
    cfg: DictConfig, strategy: tf.distribute.Strategy, source, steps_per_epoch: int
) -> tuple[keras.Model, keras.Model]:
    """The configured model and its compiled training view, built under `strategy`'s scope.

    One function for `mode=train` and `mode=benchmark`, so the benchmark measures the very
    step a training run takes.

    Returns:
        (model, train_model): the model that is saved and evaluated, and the view `fit` trains
        (the same object unless DeepLab v2 trains on multi-scale inputs).
    """
    with strategy.scope():
        model = instantiate(cfg.model, _convert_="all")
        train_model = training_view(model)
        compile_model(
            train_model, cfg, steps_per_epoch, lambda: median_frequency_weights(cfg, source)
        )
    return model, train_model


def compile_model(
    model: keras.Model,
    cfg: DictConfig,
    steps_per_epoch: int,
    auto_class_weights: Callable[[], Sequence[float]],
) -> None:
    """Compiles with the configured optimizer and loss, and mean IoU ignoring the ignore label.

    Call under the strategy scope: the optimizer creates variables.

    Args:
        model: The model to compile.
        cfg: The composed config.
        steps_per_epoch: Batches per epoch (schedules need the run's length).
        auto_class_weights: Computes median-frequency class weights; called only if a loss
            asks for `class_weights: auto`.
    """
    mean_iou = keras.metrics.MeanIoU(
        num_classes=cfg.data.num_classes,
        name="mean_iou",
        ignore_class=cfg.data.ignore_label,
        sparse_y_pred=False,
    )
    optimizer = instantiate(
        cfg.optimizer,
        total_steps=cfg.trainer.epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
    )
    loss = instantiate(losses.resolve_class_weights(cfg.loss, auto_class_weights))
    metrics = [mean_iou]
    if is_matting_data(cfg.data):  # a one-channel alpha: no class ids to count
        from seg_train.tasks.matting import fit_metrics

        metrics = fit_metrics()
    if names := output_names(model):
        # The loss on every score map (labels shrunk to each); mIoU on the input-size fused
        # logits, which carry no loss (DeepLab v2 MSC, see deeplabv2.msc_training_model).
        loss = {name: None if name == FUSED else loss for name in names}
        metrics = {FUSED: metrics}
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=metrics,
        jit_compile=cfg.trainer.jit_compile,
        steps_per_execution=cfg.trainer.steps_per_execution,
    )


def build_callbacks(
    cfg: DictConfig,
    val_batch: tuple[np.ndarray, np.ndarray],
    model: keras.Model,
    train_model: keras.Model,
    protocol: str = "resized",
) -> list:
    """Instantiates `cfg.callbacks`; partial ones get the val samples and palette.

    Checkpoints save an uncompiled twin of `model` (same layers and weights): no optimizer
    state in `best.keras` (half the size; backups keep it), and never the multi-output
    training view. With a multi-output view validated by `fit` (`protocol="resized"`) they
    monitor the fused output's metrics; with `protocol="original"` the validation callback
    evaluates `model` itself and writes plain `val_mean_iou`.
    """
    callbacks = []
    for name, node in loggers.callback_nodes(cfg):  # e.g. no TensorBoard under logger=csv
        callback = instantiate(node)
        if isinstance(callback, functools.partial):
            callback = callback(
                val_images=val_batch[0],
                val_masks=val_batch[1],
                palette=full_palette(cfg.data.palette),
            )
        if isinstance(callback, backup.AtomicModelCheckpoint):
            callback.model_to_save = keras.Model(model.input, model.output, name=model.name)
            fit_validates = protocol == "resized"
            if fit_validates and output_names(train_model) and callback.monitor.startswith("val_"):
                callback.monitor = f"val_{FUSED}_{callback.monitor.removeprefix('val_')}"
        log.info("Callback %s: %s", name, type(callback).__name__)
        callbacks.append(callback)
    # Experiment trackers (logger=mlflow / wandb); train.py calls loggers.finish after the report.
    return callbacks + loggers.build(cfg)


def val_protocol(cfg: DictConfig) -> str:
    """How in-training validation, and so the choice of `best.keras`, is measured.

    `trainer.val_protocol` (default original); an overfit check (`trainer.overfit_batches`)
    validates on its own training batches, so it is always `resized`.
    """
    if cfg.trainer.overfit_batches:
        return "resized"
    return cfg.trainer.get("val_protocol", "original")


def describe_protocol(cfg: DictConfig, protocol: str) -> str:
    """The protocol in words, for the run log and metrics.json."""
    if protocol == "resized":
        return (
            f"val images resized to data.crop_size {list(cfg.data.crop_size)}, Keras MeanIoU in fit"
        )
    tta = cfg.eval.tta
    return (
        f"val images at original resolution through the final report's code path "
        f"(eval.mode={cfg.eval.mode}, tta scales {list(tta.scales)} flip {tta.flip}, "
        f"postprocess={cfg.postprocess.name})"
    )


def original_resolution_validation(cfg: DictConfig, model: keras.Model, source):
    """The callback that validates `model` (the saved single-output model) as the final report
    evaluates it, every `trainer.validation_freq` epochs (`trainer.val_protocol=original`)."""
    from seg_train.data.pipeline import should_cache
    from seg_train.tasks.evaluate import SplitEvaluator
    from seg_train.training.callbacks import OriginalResolutionValidation

    cache = should_cache(source, "val", cfg.data.cache)
    if is_matting_data(cfg.data):  # SAD, MSE, Grad, Conn and the thresholded IoU
        from seg_train.tasks.matting import MattingEvaluator, MattingValidation

        evaluator = MattingEvaluator(model, cfg, "val", cache=cache)
        return MattingValidation(evaluator, cfg.data.class_names, cfg.trainer.validation_freq)
    evaluator = SplitEvaluator(model, cfg, "val", cache=cache)
    return OriginalResolutionValidation(
        evaluator, cfg.data.class_names, cfg.trainer.validation_freq
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
    callbacks: list,
    cfg: DictConfig,
) -> None:
    """Runs fit from `state` to `trainer.epochs`.

    First the end of an epoch whose batches were all done (validation, checkpoint, CSV row,
    backup), then the rest of a half-done epoch, then whole epochs.

    Args:
        model: The compiled training model.
        train_data: The training batches from a given batch of the run on (each `fit` call
            needs its own stream starting where the previous one stopped).
        val_ds: Validation batches for fit, or None (no validation in fit).
        state: Where the run is.
        steps_per_epoch: Batches per epoch.
        callbacks: The callbacks of the run.
        cfg: The composed config.
    """
    state = backup.normalise(state, steps_per_epoch)
    if state.pending_epoch_end is not None:
        finish_epoch(model, val_ds, state.epoch - 1, state.pending_epoch_end, callbacks, cfg)
    segments = []
    if state.step:
        segments.append((state.epoch, state.epoch + 1, steps_per_epoch - state.step))
        segments.append((state.epoch + 1, cfg.trainer.epochs, steps_per_epoch))
    else:
        segments.append((state.epoch, cfg.trainer.epochs, steps_per_epoch))
    for initial_epoch, epochs, steps in segments:
        if initial_epoch >= epochs:
            continue
        start_batch = (initial_epoch + 1) * steps_per_epoch - steps
        model.fit(
            train_data(start_batch),
            initial_epoch=initial_epoch,
            epochs=epochs,
            steps_per_epoch=steps,
            validation_data=val_ds,
            validation_freq=cfg.trainer.validation_freq,
            callbacks=callbacks,
            verbose=progress_verbosity(cfg.trainer.verbose),
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
    cfg: DictConfig,
) -> None:
    """Runs the end of `epoch` as `fit` would have: validation, then every callback's epoch end
    (checkpoint, CSV row, TensorBoard, backup) with the epoch's saved training logs."""
    logs = dict(train_logs)
    if val_ds is not None and (epoch + 1) % cfg.trainer.validation_freq == 0:
        results = model.evaluate(val_ds, verbose=0, return_dict=True)
        logs.update({f"val_{name}": value for name, value in results.items()})
    hooks = keras.callbacks.CallbackList(callbacks, model=model, epochs=cfg.trainer.epochs)
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


def median_frequency_weights(cfg: DictConfig, source) -> list[float]:
    """`class_weights: auto`: median-frequency weights from the train split's label histogram.

    Uses the dataset doctor's scan, so the weights are the ones `mode=check` suggests.
    """
    from seg_train.tasks import check

    tally = check.Tally(cfg.data.num_classes)
    check.scan_split(source, "train", tally, workers=os.cpu_count() or 1)
    weights = tally.class_weights()
    if weights is None:
        raise UserError(
            "loss.class_weights=auto found no labelled pixel in the train split; "
            "check the masks with seg-train mode=check or give explicit weights"
        )
    log.info("Median-frequency class weights: %s", ", ".join(f"{w:.3f}" for w in weights))
    return weights


# How many training masks are looked at before fitting.
LABEL_SAMPLE = 16


def check_label_sample(dataset: tf.data.Dataset, data: DictConfig) -> None:
    """Refuses 0/255 binary masks before training on them.

    Saved as 0/255, a foreground class is read as the ignore label: training would silently
    learn the background only. The first masks of the train split tell: real datasets show
    some class other than 0 there, and ignore bands only ever surround objects.
    """
    if is_matting_data(data):  # alpha mattes: 0 and 255 are alpha values, not labels
        return
    counts = np.zeros(256, np.int64)
    for _, mask in dataset.take(LABEL_SAMPLE).as_numpy_iterator():
        counts += np.bincount(mask.ravel(), minlength=256)
    present = set(np.flatnonzero(counts).tolist())
    ignored = counts[data.ignore_label] / max(counts.sum(), 1)
    if present == {0, data.ignore_label}:
        raise UserError(
            f"the first train masks of data.root={data.get('root')} hold only 0 and "
            f"{data.ignore_label} ({100 * ignored:.0f}% of pixels): {data.ignore_label} is the "
            f"ignore label, so these look like 0/{data.ignore_label} binary masks; add "
            f"'data.label_map={{{data.ignore_label}:1}}' to train on them as 0/1 (or save the "
            "foreground as 1; see seg-train check)"
        )
