"""DataStallMonitor: a deliberately slow input pipeline shows a high stall, a cached one a low one.

The assertions compare shares with wide margins (a 100 ms sleep per batch against a step of a
few ms); nothing here asserts a speed.
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from seg_train.training.callbacks import DataStallMonitor

BATCH, SIZE, CLASSES = 2, 16, 3


def _model(width: int = 4) -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3))
    hidden = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(CLASSES, 1)(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def _batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, (BATCH, SIZE, SIZE)).astype(np.uint8)
    return images, labels


def _slow_dataset() -> tf.data.Dataset:
    """Every batch costs a 100 ms sleep in the pipeline, with nothing prefetched ahead."""
    images, labels = _batch()

    def slow(x):
        time.sleep(0.1)
        return x

    def load(_):
        return tf.numpy_function(slow, [images], tf.float32, stateful=True), labels

    return (
        tf.data.Dataset.range(1_000_000)
        .map(load)
        .map(lambda x, y: (tf.ensure_shape(x, images.shape), y))
    )


def _cached_dataset() -> tf.data.Dataset:
    return tf.data.Dataset.from_tensors(_batch()).cache().repeat().prefetch(tf.data.AUTOTUNE)


def _fit(
    dataset: tf.data.Dataset,
    tmp_path,
    epochs: int = 2,
    steps: int = 6,
    width: int = 4,
    **compile_args,
) -> DataStallMonitor:
    model = _model(width)
    if compile_args:
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **compile_args,
        )
    monitor = DataStallMonitor(log_dir=str(tmp_path / "tb"))
    model.fit(dataset, epochs=epochs, steps_per_epoch=steps, callbacks=[monitor], verbose=0)
    return monitor


def test_slow_pipeline_stalls_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="seg_train.training.callbacks"):
        monitor = _fit(_slow_dataset(), tmp_path)
    assert len(monitor.history) == 2
    assert all(share > 0.5 for share in monitor.history), monitor.history
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "data stall" in warnings[0].getMessage()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard scalar"


def test_cached_pipeline_stalls_little(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="seg_train.training.callbacks"):
        # A step of real work (tens of ms): with a 4-filter model the step is ~2 ms and Keras'
        # fixed per-step overhead alone can reach half of it on a busy machine.
        monitor = _fit(_cached_dataset(), tmp_path, width=256)
    slow = _fit(_slow_dataset(), tmp_path, epochs=1)
    assert len(monitor.history) == 2
    # Generous bounds: the machine may be busy, but a 100 ms sleep per batch dominates.
    assert max(monitor.history) < 0.5 < slow.history[0], (monitor.history, slow.history)
    assert not [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name == "seg_train.training.callbacks"
        and "data stall" in r.getMessage()
        and max(monitor.history) <= monitor.warn_above
    ]


def test_steps_per_execution_is_measured(tmp_path):
    monitor = _fit(_slow_dataset(), tmp_path, epochs=1, steps=6, steps_per_execution=3)
    assert monitor.history and monitor.history[0] > 0.5


def test_second_fit_keeps_measuring(tmp_path):
    model = _model()
    monitor = DataStallMonitor()
    model.fit(_slow_dataset(), epochs=1, steps_per_epoch=3, callbacks=[monitor], verbose=0)
    model.fit(
        _slow_dataset(),
        epochs=2,
        initial_epoch=1,
        steps_per_epoch=3,
        callbacks=[monitor],
        verbose=0,
    )
    assert len(monitor.history) == 2 and min(monitor.history) > 0.5


@pytest.mark.parametrize("jit", [True])
def test_xla_is_reported_not_measured(tmp_path, caplog, jit):
    with caplog.at_level(logging.INFO, logger="seg_train.training.callbacks"):
        monitor = _fit(_cached_dataset(), tmp_path, epochs=1, steps=2, jit_compile=jit)
    assert monitor.history == []
    assert any("not measured" in r.getMessage() for r in caplog.records)


@pytest.fixture
def op_determinism():
    """Op determinism for one test (TensorFlow has no public way to turn it off again)."""
    from tensorflow.python.framework import config as tf_config

    yield tf.config.experimental.enable_op_determinism
    tf_config.disable_op_determinism()


def test_op_determinism_trains_and_says_the_stall_is_not_measured(tmp_path, caplog, op_determinism):
    # tf.timestamp inside the step used to fail the first step under op determinism.
    op_determinism()
    with caplog.at_level(logging.INFO, logger="seg_train.training.callbacks"):
        monitor = _fit(_cached_dataset(), tmp_path, epochs=1, steps=2)
    assert monitor.history == []
    assert any(
        "not measured" in r.getMessage() and "deterministic" in r.getMessage()
        for r in caplog.records
    )


def test_a_model_measured_before_determinism_still_trains_under_it(op_determinism):
    model = _model()
    monitor = DataStallMonitor()
    model.fit(_cached_dataset(), epochs=1, steps_per_epoch=2, callbacks=[monitor], verbose=0)
    op_determinism()
    model.fit(_cached_dataset(), epochs=1, steps_per_epoch=2, callbacks=[monitor], verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4
