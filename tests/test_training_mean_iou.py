"""training/mean_iou.py: the bincount update counts what Keras' MeanIoU counts.

Expectations: a confusion matrix and IoUs computed by hand, and Keras' own `MeanIoU` (the
reference library) on random batches with ignore and out-of-range labels.
"""

import keras
import numpy as np
import pytest

from seg_train.training.mean_iou import MeanIoU


def test_hand_computed_example():
    # Labels / predictions of six pixels, 3 classes, 255 ignored:
    #   (0,0) (0,1) (1,1) (2,1) (255,2) (2,2)
    # confusion (rows truth): [[1,1,0],[0,1,0],[0,1,1]] -> IoU 1/2, 1/3, 1/2; mean 4/9.
    labels = np.array([[0, 0, 1, 2, 255, 2]])
    predictions = np.array([[0, 1, 1, 1, 2, 2]])
    metric = MeanIoU(num_classes=3, ignore_class=255, sparse_y_pred=True)
    metric.update_state(labels, predictions)
    np.testing.assert_array_equal(np.asarray(metric.total_cm), [[1, 1, 0], [0, 1, 0], [0, 1, 1]])
    assert float(metric.result()) == pytest.approx(4 / 9)


@pytest.mark.parametrize("weighted", [False, True])
def test_matches_keras_on_random_logits(weighted):
    rng = np.random.default_rng(3)
    ours = MeanIoU(num_classes=5, ignore_class=255, sparse_y_pred=False)
    keras_metric = keras.metrics.MeanIoU(num_classes=5, ignore_class=255, sparse_y_pred=False)
    for _ in range(3):  # accumulates over batches
        logits = rng.normal(size=(2, 9, 7, 5)).astype("float32")
        labels = rng.integers(0, 5, size=(2, 9, 7, 1))
        labels[:, :2] = 255  # ignored band
        labels[:, -1, :3] = 7  # out of range: not counted by either
        weights = rng.integers(0, 3, size=(2, 9, 7, 1)) if weighted else None
        ours.update_state(labels, logits, sample_weight=weights)
        keras_metric.update_state(labels, logits, sample_weight=weights)
    np.testing.assert_allclose(np.asarray(ours.total_cm), np.asarray(keras_metric.total_cm), 1e-5)
    assert float(ours.result()) == pytest.approx(float(keras_metric.result()), abs=1e-6)
    ours.reset_state()
    assert float(np.asarray(ours.total_cm).sum()) == 0


def test_round_trips_through_keras_serialization():
    metric = MeanIoU(num_classes=4, ignore_class=255, name="mean_iou", sparse_y_pred=False)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert type(restored) is MeanIoU
    assert (restored.num_classes, restored.ignore_class, restored.name) == (4, 255, "mean_iou")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_counts_the_same_in_a_keras_fit_compiled_by_xla_or_not(jit_compile):
    # Keras compiles the train step with XLA under trainer.jit_compile: the update must trace
    # and count there too (XLA has no bincount kernel). Zero learning rate: the logits fit
    # sees are the model's predictions afterwards.
    rng = np.random.default_rng(5)
    images = rng.normal(size=(4, 6, 5, 3)).astype("float32")
    labels = rng.integers(0, 4, size=(4, 6, 5, 1))
    labels[0, 0] = 255
    inputs = keras.Input((6, 5, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1)(inputs))
    ours = MeanIoU(num_classes=4, ignore_class=255, sparse_y_pred=False)
    model.compile(
        keras.optimizers.SGD(0.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
        metrics=[ours],
        jit_compile=jit_compile,
    )
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    keras_metric = keras.metrics.MeanIoU(num_classes=4, ignore_class=255, sparse_y_pred=False)
    keras_metric.update_state(labels, model.predict(images, verbose=0))
    np.testing.assert_array_equal(np.asarray(ours.total_cm), np.asarray(keras_metric.total_cm))
