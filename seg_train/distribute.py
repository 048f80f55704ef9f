"""Devices, distribution strategy and numeric precision from the `hardware` / `trainer` configs.

One visible device -> TensorFlow's default strategy; several GPUs (or CPU logical devices) ->
`MirroredStrategy`; `hardware.strategy=multi_worker` -> `MultiWorkerMirroredStrategy` with the
cluster from `TF_CONFIG` or a Slurm allocation.
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf
from omegaconf import DictConfig

from seg_train.errors import UserError

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# Below this many images per replica, trainable BatchNorm statistics get too noisy.
MIN_BN_BATCH_PER_REPLICA = 8


def split_cpu(num_logical: int | None) -> None:
    """Splits the CPU into `num_logical` logical devices, so multi-device code runs without GPUs.

    Must run before TensorFlow initialises its devices (before any op or strategy is created).
    """
    if not num_logical or num_logical < 2:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_logical)]
        )
    except RuntimeError:
        # Devices were already initialised (second job of a sweep): keep the existing split.
        log.warning("CPU devices already initialised; hardware.cpu_logical_devices ignored")


def make_strategy(hardware: DictConfig) -> tf.distribute.Strategy:
    """Builds the distribution strategy that `hardware.strategy` asks for (or `auto` picks)."""
    kind = hardware.get("strategy", "auto")
    if kind not in STRATEGIES:
        raise UserError(f"hardware.strategy must be one of {', '.join(STRATEGIES)}, got {kind!r}")
    split_cpu(hardware.get("cpu_logical_devices"))
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=_cluster_resolver(hardware.get("cluster", "tf_config"))
        )
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    devices = gpus or cpus
    if kind == "mirrored" or (kind == "auto" and len(devices) > 1):
        # Without GPUs, NCCL is unavailable; reduce through one device instead.
        cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross_device_ops)
    return tf.distribute.get_strategy()


def _cluster_resolver(cluster: str):
    if cluster == "slurm":
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    if cluster == "tf_config":
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    raise UserError(f"hardware.cluster must be tf_config or slurm, got {cluster!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the one process that writes checkpoints, logs and reports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if "chief" in resolver.cluster_spec().as_dict():
        return task_type == "chief"
    return task_type in (None, "worker") and task_id in (None, 0)


def per_replica_batch(global_batch: int, strategy: tf.distribute.Strategy) -> int:
    """The batch each replica sees; `data.batch_size` must split evenly."""
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise UserError(
            f"data.batch_size={global_batch} does not split over {replicas} replicas; "
            f"use a multiple of {replicas}"
        )
    return global_batch // replicas


def set_precision(precision: str) -> None:
    """Sets Keras' global dtype policy; models keep float32 logits, Keras scales the loss."""
    if precision not in PRECISIONS:
        raise UserError(
            f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    keras.mixed_precision.set_global_policy(precision)


def warn_small_bn_batches(model: keras.Model, batch_per_replica: int) -> None:
    """Warns when trainable BatchNorm layers see fewer than 8 images per replica."""
    trainable_bn = [
        layer
        for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    if trainable_bn and batch_per_replica < MIN_BN_BATCH_PER_REPLICA:
        log.warning(
            "%d trainable BatchNorm layers see %d images per replica (< %d): statistics will be "
            "noisy; consider model.freeze_bn=true or a larger data.batch_size",
            len(trainable_bn),
            batch_per_replica,
            MIN_BN_BATCH_PER_REPLICA,
        )


def _all_layers(model: keras.Model):
    """Every layer, descending into nested models (e.g. a keras.applications backbone)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
