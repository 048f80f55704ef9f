"""`seg-train` (mode=train): fit a model, then evaluate its best checkpoint at full resolution."""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import keras
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from seg_train import checkpoints, runtime
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


def run(cfg: DictConfig) -> float | None:
    """Trains `cfg.model` on `cfg.data`; returns the best checkpoint's val mean IoU."""
    run_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_dir, ignore=(".hydra",))
    keras.backend.clear_session()  # a sweep runs its jobs in one process
    runtime.seed_everything(cfg.seed)

    source = instantiate(cfg.data.source)
    repeat = cfg.trainer.steps_per_epoch is not None
    train_ds = pipeline.train_dataset(source, cfg.data, cfg.seed, repeat=repeat)
    val_ds = pipeline.val_dataset(source, cfg.data)
    log.info(
        "Data %s: %d train / %d val images, batch %d, crop %s",
        cfg.data.name,
        len(source.examples("train")),
        len(source.examples("val")),
        cfg.data.batch_size,
        list(cfg.data.crop_size),
    )

    model = instantiate(cfg.model, _convert_="all")
    log.info("Model %s: %s parameters", model.name, f"{model.count_params():,}")
    model.compile(
        optimizer=instantiate(cfg.optimizer),
        loss=instantiate(cfg.loss),
        metrics=[
            keras.metrics.MeanIoU(
                num_classes=cfg.data.num_classes,
                name="mean_iou",
                ignore_class=cfg.data.ignore_label,
                sparse_y_pred=False,
            )
        ],
        jit_compile=cfg.trainer.jit_compile,
        steps_per_execution=cfg.trainer.steps_per_execution,
    )
    val_batch = next(iter(val_ds.as_numpy_iterator()))
    # Keras warns that fit's default shuffle=True is ignored for datasets; we shuffle in tf.data.
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    model.fit(
        train_ds,
        epochs=cfg.trainer.epochs,
        steps_per_epoch=cfg.trainer.steps_per_epoch,
        validation_data=val_ds,
        validation_freq=cfg.trainer.validation_freq,
        callbacks=build_callbacks(cfg, val_batch),
        verbose=cfg.trainer.verbose,
    )

    history_csv = run_dir / "history.csv"
    if history_csv.is_file():
        plot_history(history_csv, run_dir / "training_curves.png")
    best = run_dir / checkpoints.BEST_CHECKPOINT
    if not best.is_file():
        log.warning(
            "No checkpoint at %s (is callbacks.model_checkpoint disabled?); "
            "evaluating the final weights instead",
            best,
        )
        best = run_dir / "checkpoints" / "last.keras"
        best.parent.mkdir(parents=True, exist_ok=True)
        model.save(best)
    best_model = checkpoints.load_model(best, cfg.data.num_classes)
    report = evaluate_model(best_model, cfg.data, "val", run_dir, best, cfg.eval.num_samples)
    log.info("Best checkpoint %s: val mIoU %.4f", best, report["mean_iou"] or 0.0)
    return report["mean_iou"]
