"""`seg-train` (mode=train): fit a model, then evaluate its best checkpoint at full resolution."""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig

from seg_train import checkpoints, distribute, runtime
from seg_train.data import pipeline
from seg_train.evaluate import evaluate_model
from seg_train.io_utils import ensure_fresh_run_dir
from seg_train.viz import full_palette, plot_history

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig, val_batch: tuple[np.ndarray, np.ndarray]) -> list:
    """Instantiates `cfg.callbacks`; partial ones get the val samples and palette."""
    callbacks = []
    for name, node in cfg.callbacks.items():
        if node is None:
            continue
        callback = instantiate(node)
        if isinstance(callback, functools.partial):
            callback = callback(
                val_images=val_batch[0],
                val_masks=val_batch[1],
                palette=full_palette(cfg.data.palette),
            )
        log.info("Callback %s: %s", name, type(callback).__name__)
        callbacks.append(callback)
    return callbacks


def compile_model(model: keras.Model, cfg: DictConfig) -> None:
    """Compiles with the configured optimizer and loss, and mean IoU ignoring the ignore label."""
    mean_iou = keras.metrics.MeanIoU(
        num_classes=cfg.data.num_classes,
        name="mean_iou",
        ignore_class=cfg.data.ignore_label,
        sparse_y_pred=False,
    )
    model.compile(
        optimizer=instantiate(cfg.optimizer),
        loss=instantiate(cfg.loss),
        metrics=[mean_iou],
        jit_compile=cfg.trainer.jit_compile,
        steps_per_execution=cfg.trainer.steps_per_execution,
    )


def _shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    # Our datasets start from in-memory path lists, so file-level auto-sharding cannot apply;
    # say so instead of letting every worker warn and fall back.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def run(cfg: DictConfig) -> float | None:
    """Trains `cfg.model` on `cfg.data`; returns the best checkpoint's val mean IoU."""
    run_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_dir, ignore=(".hydra",))
    keras.backend.clear_session()  # a sweep runs its jobs in one process
    runtime.seed_everything(cfg.seed)
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    distribute.set_precision(cfg.trainer.precision)
    strategy = distribute.make_strategy(cfg.hardware)
    chief = distribute.is_chief(strategy)
    batch_per_replica = distribute.per_replica_batch(cfg.data.batch_size, strategy)
    log.info(
        "Strategy %s: %d replica(s), %d images per replica, global batch %d, precision %s",
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
        batch_per_replica,
        cfg.data.batch_size,
        cfg.trainer.precision,
    )

    source = instantiate(cfg.data.source)
    repeat = cfg.trainer.steps_per_epoch is not None
    train_ds = _shard_by_data(pipeline.train_dataset(source, cfg.data, cfg.seed, repeat=repeat))
    val_ds = _shard_by_data(pipeline.val_dataset(source, cfg.data))
    log.info(
        "Data %s: %d train / %d val images, crop %s",
        cfg.data.name,
        len(source.examples("train")),
        len(source.examples("val")),
        list(cfg.data.crop_size),
    )

    with strategy.scope():
        model = instantiate(cfg.model, _convert_="all")
        compile_model(model, cfg)
    log.info("Model %s: %s parameters", model.name, f"{model.count_params():,}")
    distribute.warn_small_bn_batches(model, batch_per_replica)

    # Only the chief writes checkpoints, logs and summaries.
    callbacks = build_callbacks(cfg, next(val_ds.as_numpy_iterator())) if chief else []
    # Keras warns that fit's default shuffle=True is ignored for datasets; we shuffle in tf.data.
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    model.fit(
        train_ds,
        epochs=cfg.trainer.epochs,
        steps_per_epoch=cfg.trainer.steps_per_epoch,
        validation_data=val_ds,
        validation_freq=cfg.trainer.validation_freq,
        callbacks=callbacks,
        verbose=cfg.trainer.verbose,
    )
    if not chief:
        log.info("Worker done; the chief writes checkpoints and the report")
        return None
    return _report_best(model, cfg, run_dir)


def _report_best(model: keras.Model, cfg: DictConfig, run_dir: Path) -> float | None:
    """Plots the curves and evaluates the best checkpoint at original resolution."""
    history_csv = run_dir / "history.csv"
    if history_csv.is_file():
        plot_history(history_csv, run_dir / "training_curves.png")
    best = run_dir / checkpoints.BEST_CHECKPOINT
    if not best.is_file():
        log.warning("No %s (is callbacks.model_checkpoint off?); evaluating the last weights", best)
        best = run_dir / "checkpoints" / "last.keras"
        best.parent.mkdir(parents=True, exist_ok=True)
        model.save(best)
    best_model = checkpoints.load_model(best, cfg.data.num_classes)
    report = evaluate_model(best_model, cfg, "val", run_dir, best)
    log.info("Best checkpoint %s: val mIoU %.4f", best, report["mean_iou"] or 0.0)
    return report["mean_iou"]
