"""Segmentation losses: ignore label, class weights, Dice/focal, sums, configs, serialisation."""

from __future__ import annotations

import contextlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from seg_train.data.stats import median_frequency_weights
from seg_train.errors import UserError
from seg_train.tasks import instantiate as instantiation
from seg_train.training import losses
from tests.helpers import CONFIG_DIR, compose_config

# The alpha_* losses take alphas, not logits and labels: tests/test_training_matting_losses.py.
LOSS_CONFIGS = sorted(
    p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml") if not p.stem.startswith("alpha_")
)
IGNORE = 255
NUM_CLASSES = 4


@contextlib.contextmanager
def raises_user_error(match: str):
    """A `UserError`, also when Hydra's instantiate wraps it (the CLI unwraps it the same way)."""
    with pytest.raises((UserError, InstantiationException)) as info:
        yield
    error = info.value if isinstance(info.value, UserError) else info.value.__cause__
    assert isinstance(error, UserError), info.value
    assert re.search(match, str(error)), str(error)


def batch(seed: int = 0, shape=(2, 5, 6)):
    """Random float32 logits and uint8 labels with some ignored pixels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(*shape, NUM_CLASSES)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, size=shape).astype("uint8")
    labels[0, 0, :] = IGNORE
    labels[1, 2:4, 1] = IGNORE
    return logits, labels


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype("float64")
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_pixel_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    safe = np.where(labels == IGNORE, 0, labels).astype(int)
    return -np.take_along_axis(np_log_softmax(logits), safe[..., None], -1)[..., 0]


ALL_LOSSES = {
    "ce": lambda: losses.CrossEntropy(),
    "ce_weighted": lambda: losses.CrossEntropy(class_weights=[0.5, 2.0, 1.0, 3.0]),
    "focal": lambda: losses.FocalLoss(gamma=2.0, class_weights=[1.0, 2.0, 1.0, 0.5]),
    "dice": lambda: losses.DiceLoss(),
    "ce_dice": lambda: losses.WeightedSum(
        {"ce": losses.CrossEntropy(), "dice": losses.DiceLoss()}, {"dice": 0.5}
    ),
}


def test_cross_entropy_matches_numpy_and_keras_ignore_class():
    logits, labels = batch()
    valid = labels != IGNORE
    expected = np_pixel_ce(logits, labels)[valid].mean()
    ours = float(losses.CrossEntropy()(labels, logits))
    keras_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    # Keras' own ignore_class also averages over the non-ignored pixels only.
    np.testing.assert_allclose(float(keras_ce(labels, logits)), expected, rtol=1e-5)
    # Labels with a trailing channel axis give the same value.
    np.testing.assert_allclose(
        float(losses.CrossEntropy()(labels[..., None], logits)), ours, rtol=1e-6
    )


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_ignored_pixels_contribute_nothing(name):
    loss = ALL_LOSSES[name]()
    logits, labels = batch()
    ignored = labels == IGNORE
    changed = logits.copy()
    changed[ignored] = np.random.default_rng(9).normal(scale=50.0, size=changed[ignored].shape)
    np.testing.assert_allclose(float(loss(labels, changed)), float(loss(labels, logits)), rtol=1e-6)
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = loss(labels, variable)
    grad = tape.gradient(value, variable).numpy()
    assert np.all(grad[ignored] == 0.0)
    assert np.abs(grad[~ignored]).max() > 0
    # A batch of nothing but ignored pixels: zero loss and gradient, not NaN.
    all_ignored = np.full_like(labels, IGNORE)
    with tf.GradientTape() as tape:
        value = loss(all_ignored, variable)
    assert float(value) == 0.0
    assert np.all(tape.gradient(value, variable).numpy() == 0.0)


def test_class_weights_scale_the_loss_as_hand_computed():
    logits, labels = batch(1)
    weights = np.array([0.5, 2.0, 1.0, 3.0])
    valid = labels != IGNORE
    pixel_weight = np.where(valid, weights[np.where(valid, labels, 0)], 0.0)
    # Weighted sum divided by the number of non-ignored pixels (not by the sum of weights).
    expected = (np_pixel_ce(logits, labels) * pixel_weight).sum() / valid.sum()
    weighted = float(losses.CrossEntropy(class_weights=list(weights))(labels, logits))
    np.testing.assert_allclose(weighted, expected, rtol=1e-5)
    plain = float(losses.CrossEntropy()(labels, logits))
    np.testing.assert_allclose(
        float(losses.CrossEntropy(class_weights=[1.0] * 4)(labels, logits)), plain, rtol=1e-6
    )
    np.testing.assert_allclose(
        float(losses.CrossEntropy(class_weights=[2.0] * 4)(labels, logits)), 2 * plain, rtol=1e-6
    )


def test_focal_loss_hand_computed():
    logits, labels = batch(2)
    valid = labels != IGNORE
    np.testing.assert_allclose(
        float(losses.FocalLoss(gamma=0.0)(labels, logits)),
        float(losses.CrossEntropy()(labels, logits)),
        rtol=1e-6,
    )
    alpha = np.array([1.0, 2.0, 1.0, 0.5])
    ce = np_pixel_ce(logits, labels)
    p_true = np.exp(-ce)
    safe = np.where(valid, labels, 0)
    expected = (alpha[safe] * (1 - p_true) ** 2 * ce)[valid].sum() / valid.sum()
    got = float(losses.FocalLoss(gamma=2.0, class_weights=list(alpha))(labels, logits))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_dice_loss_hand_computed():
    # One image of 1 x 3 pixels, 2 classes; the last pixel is ignored.
    logits = np.array([[[[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]]], "float32")
    labels = np.array([[[0, 1, IGNORE]]], "uint8")
    p = np.exp(logits[0, 0, :2]) / np.exp(logits[0, 0, :2]).sum(-1, keepdims=True)
    # class 0: intersection p[0,0], sums p[0,0] + p[1,0] and 1 label pixel; likewise class 1.
    dice0 = (2 * p[0, 0] + 1) / (p[0, 0] + p[1, 0] + 1 + 1)
    dice1 = (2 * p[1, 1] + 1) / (p[0, 1] + p[1, 1] + 1 + 1)
    np.testing.assert_allclose(
        float(losses.DiceLoss(smooth=1.0)(labels, logits)), 1 - (dice0 + dice1) / 2, rtol=1e-6
    )
    weighted = float(losses.DiceLoss(smooth=1.0, class_weights=[1.0, 3.0])(labels, logits))
    np.testing.assert_allclose(weighted, 1 - (dice0 + 3 * dice1) / 4, rtol=1e-6)
    # Perfect, confident predictions give (almost) zero loss.
    perfect = np.array([[[[20.0, -20.0], [-20.0, 20.0], [0.0, 0.0]]]], "float32")
    assert float(losses.DiceLoss(smooth=1e-6)(labels, perfect)) < 1e-5


def test_weighted_sum():
    logits, labels = batch(3)
    total = losses.WeightedSum(
        {"ce": losses.CrossEntropy(), "dice": losses.DiceLoss()}, {"dice": 0.5}
    )
    expected = float(losses.CrossEntropy()(labels, logits)) + 0.5 * float(
        losses.DiceLoss()(labels, logits)
    )
    np.testing.assert_allclose(float(total(labels, logits)), expected, rtol=1e-6)
    with raises_user_error("loss.weights"):
        losses.WeightedSum({"ce": losses.CrossEntropy()}, {"dise": 1.0})


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_float16_logits_are_computed_in_float32(name):
    loss = ALL_LOSSES[name]()
    logits, labels = batch(4)
    half = loss(labels, logits.astype("float16"))
    assert keras.backend.standardize_dtype(half.dtype) == "float32"
    reference = float(loss(labels, logits.astype("float16").astype("float32")))
    np.testing.assert_allclose(float(half), reference, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_labels_are_resized_nearest_to_smaller_logits(name):
    """DeepLab v2 logits at 1/2 (or 1/8) resolution: labels are shrunk, never interpolated."""
    loss = ALL_LOSSES[name]()
    logits, small = batch(5, shape=(2, 3, 3))
    # Labels constant on 2x2 blocks, so any nearest-neighbour sampling gives `small`.
    labels = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(float(loss(labels, logits)), float(loss(small, logits)), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_losses_serialise(name, tmp_path):
    loss = ALL_LOSSES[name]()
    logits, labels = batch(6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    np.testing.assert_allclose(
        float(restored(labels, logits)), float(loss(labels, logits)), rtol=1e-6
    )
    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, keras.layers.Conv2D(NUM_CLASSES, 1, name="logits")(inputs))
    model.compile(optimizer="sgd", loss=loss)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=True)
    assert type(loaded.loss) is type(loss)
    assert loaded.loss.get_config() == loss.get_config()


def test_median_frequency_weights():
    np.testing.assert_allclose(median_frequency_weights([100, 50, 25, 0]), [0.5, 1.0, 2.0, 0.0])
    # Eigen & Fergus: frequency within the images where the class appears.
    np.testing.assert_allclose(
        median_frequency_weights([100, 50, 25], [200, 100, 100]), [1.0, 1.0, 2.0]
    )
    with pytest.raises(ValueError):
        median_frequency_weights([0, 0])


def test_resolve_auto_class_weights():
    calls = []

    def compute():
        calls.append(1)
        return median_frequency_weights([400, 200, 100, 100])

    cfg = compose_config(["loss=ce_weighted"])
    assert instantiation.uses_auto_class_weights(cfg.loss)
    with raises_user_error("loss.class_weights=auto"):
        instantiate(cfg.loss)
    loss = instantiate(instantiation.resolve_class_weights(cfg.loss, compute))
    assert loss.class_weights == [0.375, 0.75, 1.5, 1.5]
    assert loss.ignore_label == 255
    cfg = compose_config(
        [
            "loss=ce_dice",
            "loss.losses.ce.class_weights=auto",
            "+loss.losses.dice.class_weights=auto",
        ]
    )
    loss = instantiate(instantiation.resolve_class_weights(cfg.loss, compute))
    assert loss.losses["ce"].class_weights == loss.losses["dice"].class_weights
    assert len(calls) == 2  # once per resolve, only when some loss asks for auto
    plain = compose_config(["loss=ce"]).loss
    assert not instantiation.uses_auto_class_weights(plain)
    instantiation.resolve_class_weights(plain, compute)
    assert len(calls) == 2


def test_class_weight_errors_name_the_key():
    logits, labels = batch()
    with raises_user_error("loss.class_weights has 3 values"):
        losses.CrossEntropy(class_weights=[1.0, 2.0, 3.0])(labels, logits)
    with raises_user_error("loss.class_weights must be"):
        losses.CrossEntropy(class_weights=[1.0, -2.0])


@pytest.mark.parametrize("name", LOSS_CONFIGS)
def test_loss_config_composes_and_instantiates(name):
    cfg = compose_config([f"loss={name}"])
    assert cfg.data.num_classes == NUM_CLASSES
    loss_cfg = instantiation.resolve_class_weights(cfg.loss, lambda: [1.0, 2.0, 3.0, 4.0])
    loss = instantiate(loss_cfg)
    assert isinstance(loss, keras.losses.Loss)
    logits, labels = batch(7)
    value = float(loss(labels, logits))
    assert np.isfinite(value) and value > 0
