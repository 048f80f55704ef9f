"""Devices, distribution strategy and numeric precision from the `hardware` / `trainer` configs.

One visible device -> TensorFlow's default strategy; several GPUs (or CPU logical devices) ->
`MirroredStrategy`; `hardware.strategy=multi_worker` -> `MultiWorkerMirroredStrategy` with the
cluster from `TF_CONFIG` or a Slurm allocation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

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


def make_strategy(hardware: Mapping[str, Any]) -> tf.distribute.Strategy:
    """Builds the distribution strategy that `hardware.strategy` asks for (or `auto` picks)."""
    kind = hardware.get("strategy", "auto")
    if kind not in STRATEGIES:
        raise UserError(f"hardware.strategy must be one of {', '.join(STRATEGIES)}, got {kind!r}")
    split_cpu(hardware.get("cpu_logical_devices"))
    if kind == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=_cluster_resolver(hardware.get("cluster", "tf_config"))
        )
        patch_keras_for_multi_worker(strategy)
        return strategy
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    devices = gpus or cpus
    if kind == "mirrored" or (kind == "auto" and len(devices) > 1):
        # Without GPUs, NCCL is unavailable; reduce through one device instead.
        cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross_device_ops)
    return tf.distribute.get_strategy()


def patch_keras_for_multi_worker(strategy: tf.distribute.Strategy) -> None:
    """Works around Keras 3's broken `fit` under MultiWorkerMirroredStrategy.

    Keras 3 (keras-team/keras#20585, still open for 3.15) fails in two places with several
    workers: `_maybe_symbolic_build` all-reduces the first *input batch* (a tuple of PerReplica
    values the collective ops reject) only to learn its shapes, and `reduce_per_replica` asks
    for a MEAN over axis 0 of the scalar loss and metrics. We build from this worker's local
    batch instead and reduce scalars over no axis. Both patches touch private Keras code, so
    they are applied only for this strategy and skipped, with a warning, if Keras changed.
    """
    try:
        from keras.src.backend.tensorflow import trainer as tf_trainer

        original_reduce = tf_trainer.reduce_per_replica
        is_multi_worker = tf_trainer._collective_all_reduce_multi_worker
        trainer_class = tf_trainer.TensorFlowTrainer
        trainer_class._maybe_symbolic_build  # noqa: B018 - must exist to be replaced
    except (ImportError, AttributeError) as exc:
        log.warning("Keras internals changed (%s); multi-worker fit is unpatched", exc)
        return
    if getattr(original_reduce, "seg_train_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
            return original_reduce(values, strategy, reduction)

        def reduce_one(value):
            if isinstance(value, (tf.Tensor, tf.distribute.DistributedValues)) and (
                value.shape.rank == 0
            ):
                return strategy.reduce("MEAN", value, axis=None)
            return original_reduce(value, strategy, reduction)

        return tf.nest.map_structure(reduce_one, values)

    def symbolic_build_from_local_batch(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tf.nest.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0], batch
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    reduce_per_replica.seg_train_patched = True
    tf_trainer.reduce_per_replica = reduce_per_replica
    trainer_class._maybe_symbolic_build = symbolic_build_from_local_batch


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
