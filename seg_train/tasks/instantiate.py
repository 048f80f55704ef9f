"""Config -> objects: the one place where the composed config becomes models, losses,
optimizers, callbacks, strategies and predictors for the libraries below.

The libraries (`training/`, `inference/`, `data/`, `models/`) take explicit arguments; the
tasks call these builders with `cfg` and hand the objects down.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from seg_train.config_checks import is_matting_data
from seg_train.data import stats
from seg_train.data.pipeline import decoded_dataset
from seg_train.errors import UserError
from seg_train.inference.predictor import EVAL_BATCH_SIZE, MAX_WHOLE_PIXELS, Predictor
from seg_train.tasks import loggers
from seg_train.tasks.sources import build_source
from seg_train.training import distribute, fit
from seg_train.training.callbacks import AtomicModelCheckpoint
from seg_train.training.losses import AUTO
from seg_train.training.mean_iou import MeanIoU
from seg_train.training.multiscale import TrainingView
from seg_train.viz import full_palette

log = logging.getLogger(__name__)


def plain(node: DictConfig | ListConfig | None) -> Any:
    """A config node as plain, resolved Python containers (what the libraries take)."""
    return None if node is None else OmegaConf.to_container(node, resolve=True)


# ----- training --------------------------------------------------------------------------------
def distribution_strategy(cfg: DictConfig) -> tf.distribute.Strategy:
    """The distribution strategy `cfg.hardware` asks for."""
    return distribute.make_strategy(plain(cfg.hardware))


def run_length(cfg: DictConfig, num_train: int) -> tuple[int, int]:
    """(steps per epoch, epochs) of a training run: `trainer.steps_per_epoch` or one pass over
    the `num_train` images; `trainer.total_steps`, when set, decides the epochs."""
    steps_per_epoch = cfg.trainer.steps_per_epoch or max(1, num_train // cfg.data.batch_size)
    epochs = cfg.trainer.epochs
    if cfg.trainer.total_steps:
        epochs = math.ceil(cfg.trainer.total_steps / steps_per_epoch)
    return steps_per_epoch, epochs


def build_and_compile(
    cfg: DictConfig,
    strategy: tf.distribute.Strategy,
    source,
    steps_per_epoch: int,
    epochs: int,
) -> TrainingView:
    """The configured model and its compiled training view, built under `strategy`'s scope.

    One function for `mode=train` and `mode=benchmark`, so the benchmark measures the very
    step a training run takes.

    Args:
        cfg: The composed config (`model`, `optimizer`, `loss`, `data`, `trainer`).
        strategy: The distribution strategy whose scope creates the variables.
        source: The dataset source (scanned only for `class_weights: auto`).
        steps_per_epoch: Batches per epoch (schedules need the run's length).
        epochs: The run's epochs (`trainer.epochs`, or derived from `trainer.total_steps`).
    """
    with strategy.scope():
        view = TrainingView.of(instantiate(cfg.model, _convert_="all"))
        optimizer = instantiate(
            cfg.optimizer, total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch
        )
        loss = instantiate(resolve_class_weights(cfg.loss, lambda: auto_class_weights(cfg, source)))
        fit.compile_model(
            view,
            optimizer,
            loss,
            fit_metrics(cfg),
            jit_compile=cfg.trainer.jit_compile,
            steps_per_execution=cfg.trainer.steps_per_execution,
        )
    return view


def fit_metrics(cfg: DictConfig) -> list[keras.metrics.Metric]:
    """The metrics `fit` logs: mean IoU without the ignore label (a cheaper update than
    Keras', see `training/mean_iou.py`), or matting's errors."""
    if is_matting_data(cfg.data):  # a one-channel alpha: no class ids to count
        from seg_train.tasks.matting import fit_metrics as matting_metrics

        return matting_metrics()
    return [
        MeanIoU(
            num_classes=cfg.data.num_classes,
            name="mean_iou",
            ignore_class=cfg.data.ignore_label,
            sparse_y_pred=False,
        )
    ]


def build_callbacks(
    cfg: DictConfig,
    val_batch: tuple[np.ndarray, np.ndarray] | None,
    view: TrainingView,
    protocol: str = "resized",
) -> list:
    """Instantiates `cfg.callbacks`; partial ones get the val samples, palette and model.

    Checkpoints save an uncompiled twin of the model (same layers and weights): no optimizer
    state in `best.keras` (half the size; backups keep it), and never the multi-output
    training view. With a multi-output view validated by `fit` (`protocol="resized"`) they
    monitor the fused output's metrics; with `protocol="original"` the validation callback
    evaluates the model itself and writes plain `val_mean_iou`.
    """
    callbacks = []
    for name, node in loggers.callback_nodes(cfg):  # e.g. no TensorBoard under logger=csv
        callback = instantiate(node)
        if isinstance(callback, functools.partial):
            callback = callback(
                val_images=val_batch[0],
                val_masks=val_batch[1],
                palette=full_palette(cfg.data.palette),
                display_model=view.model,
            )
        if isinstance(callback, AtomicModelCheckpoint):
            model = view.model
            callback.model_to_save = keras.Model(model.input, model.output, name=model.name)
            if protocol == "resized":  # fit validates the view: its fused output's metrics
                callback.monitor = view.monitor(callback.monitor)
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


# ----- class weights -------------------------------------------------------------------------
def auto_class_weights(cfg: DictConfig, source) -> list[float]:
    """`class_weights: auto`: median-frequency weights from the train split's label histogram.

    Uses the dataset doctor's scan, so the weights are the ones `mode=check` suggests.
    """
    tally = stats.Tally(cfg.data.num_classes)
    stats.scan_split(source, "train", tally, workers=os.cpu_count() or 1)
    weights = tally.class_weights()
    if weights is None:
        raise UserError(
            "loss.class_weights=auto found no labelled pixel in the train split; "
            "check the masks with seg-train mode=check or give explicit weights"
        )
    log.info("Median-frequency class weights: %s", ", ".join(f"{w:.3f}" for w in weights))
    return weights


def resolve_class_weights(
    loss_cfg: DictConfig, compute_weights: Callable[[], Sequence[float]]
) -> DictConfig:
    """Returns a resolved copy of `cfg.loss` with every `class_weights: auto` filled in.

    `compute_weights` (e.g. `lambda: auto_class_weights(cfg, source)`) is called at most
    once, and only when some loss asks for `auto`, so runs without it never scan the dataset.

    Args:
        loss_cfg: The `loss` node of the composed config (attached to the root, so
            interpolations such as `${data.ignore_label}` resolve).
        compute_weights: Returns one weight per class.
    """
    container = OmegaConf.to_container(loss_cfg, resolve=True)
    cache: list[list[float]] = []

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "class_weights" and value == AUTO:
                    if not cache:
                        cache.append([float(w) for w in compute_weights()])
                    node[key] = cache[0]
                else:
                    visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(container)
    return OmegaConf.create(container)


def uses_auto_class_weights(loss_cfg: DictConfig | ListConfig) -> bool:
    """Whether any loss in `cfg.loss` asks for `class_weights: auto`."""
    container = OmegaConf.to_container(loss_cfg, resolve=False)

    def visit(node) -> bool:
        if isinstance(node, dict):
            return any((k == "class_weights" and v == AUTO) or visit(v) for k, v in node.items())
        if isinstance(node, list):
            return any(visit(v) for v in node)
        return False

    return visit(container)


# ----- prediction ------------------------------------------------------------------------------
def predictor_from_config(model: keras.Model, cfg) -> Predictor:
    """A Predictor from `cfg.eval` (mode, crop_size, stride, tta) and the data's flip pairs and
    pad colour."""
    options = cfg.eval
    return Predictor(
        model,
        mode=options.mode,
        crop_size=options.crop_size,
        stride=options.stride,
        scales=list(options.tta.scales),
        flip=options.tta.flip,
        fusion=options.tta.fusion,
        flip_pairs=cfg.data.get("flip_pairs"),
        size_divisor=options.size_divisor,
        pad_value=cfg.data.get("pad_value", 0),
        batch_size=options.get("batch_size", EVAL_BATCH_SIZE),
        max_whole_pixels=options.get("max_whole_pixels", MAX_WHOLE_PIXELS),
    )


def val_images(cfg: DictConfig, count: int) -> list[np.ndarray]:
    """The first `count` val images (uint8 [H, W, 3]) of the run's dataset."""
    examples = decoded_dataset(build_source(cfg.data), "val")
    images = [image for image, _ in examples.take(count).as_numpy_iterator()]
    if not images:
        raise UserError(
            f"data {cfg.data.name} has no val images for the export parity check; "
            "fix the data config or skip the check with export.parity_images=0"
        )
    return images
