"""Large images: slide windows run in batches of eval.batch_size; whole mode switches to slide
above eval.max_whole_pixels. Expected logits are computed here window by window."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pytest

from seg_train.errors import UserError
from seg_train.inference.predictor import Predictor
from seg_train.models.unet import build_unet
from seg_train.tasks.evaluate import evaluate_model
from seg_train.tasks.instantiate import predictor_from_config
from tests.helpers import TINY_TRAIN, compose_config


def pointwise_model(num_classes: int = 3) -> keras.Model:
    """A 1x1-conv network: translation equivariant, so slide equals one whole pass."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(6, 1, activation="tanh")(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Conv2D(num_classes, 1)(x))


def random_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def spy(predictor: Predictor) -> list[tuple[int, ...]]:
    """Records the shape of every batch the predictor sends through its network."""
    calls: list[tuple[int, ...]] = []
    model = predictor.model

    def network(batch):
        calls.append(tuple(batch.shape))
        return model(batch, training=False)

    predictor._net = network
    return calls


def test_slide_runs_windows_in_batches_and_averages_them_as_by_hand():
    # A U-Net's window logits depend on the window contents (no translation shortcut): the
    # expectation is the average over the 4x4 windows written out here, one model call each.
    keras.utils.set_random_seed(1)
    unet = build_unet(3, (None, None, 3), base_filters=4, depth=3)
    image = random_image((80, 80, 3))
    # crop 32, stride 16 over 80 pixels: windows start at 0, 16, 32, 48 in both directions.
    starts = [0, 16, 32, 48]
    total = np.zeros((80, 80, 3), np.float32)
    count = np.zeros((80, 80, 1), np.float32)
    for top in starts:
        for left in starts:
            window = image[None, top : top + 32, left : left + 32].astype(np.float32)
            total[top : top + 32, left : left + 32] += unet(window, training=False)[0].numpy()
            count[top : top + 32, left : left + 32] += 1
    predictor = Predictor(unet, mode="slide", crop_size=[32, 32], stride=[16, 16], batch_size=3)
    calls = spy(predictor)
    logits = predictor.logits(image)
    assert calls == [(3, 32, 32, 3)] * 5 + [(1, 32, 32, 3)]
    np.testing.assert_allclose(logits, total / count, atol=1e-5)


def test_whole_mode_switches_to_slide_above_the_pixel_limit(caplog):
    model = pointwise_model()
    image = random_image((40, 64, 3))
    expected = model(image[None].astype(np.float32), training=False)[0].numpy()
    below = Predictor(model, crop_size=[32, 32], max_whole_pixels=40 * 64, batch_size=4)
    below_calls = spy(below)
    np.testing.assert_allclose(below.logits(image), expected, atol=1e-5)
    assert below_calls == [(1, 64, 64, 3)]  # padded to the size divisor 32
    assert below.protocol_change is None
    above = Predictor(model, crop_size=[32, 32], max_whole_pixels=40 * 64 - 1, batch_size=4)
    above_calls = spy(above)
    with caplog.at_level(logging.WARNING):
        logits = above.logits(image)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    # 32-pixel windows every 21 pixels (two thirds): rows start at 0, 8 (flush with the end);
    # columns at 0, 21, 32: 6 windows, four at a time.
    assert above_calls == [(4, 32, 32, 3), (2, 32, 32, 3)]
    assert "eval.max_whole_pixels" in above.protocol_change
    assert any("64x40" in r.message and "slide" in r.message for r in caplog.records)


def test_no_limit_and_config_defaults():
    cfg = compose_config()
    assert cfg.eval.batch_size >= 1 and cfg.eval.max_whole_pixels >= 1
    predictor = predictor_from_config(
        pointwise_model(), compose_config(["eval.batch_size=2", "eval.max_whole_pixels=0"])
    )
    assert (predictor.batch_size, predictor.max_whole_pixels) == (2, None)
    calls = spy(predictor)
    predictor.logits(random_image((48, 48, 3)))
    assert calls == [(1, 64, 64, 3)]  # padded to the size divisor 32, one whole pass


@pytest.mark.parametrize(("key", "value"), [("batch_size", 0), ("max_whole_pixels", -1)])
def test_bad_limits_are_user_errors(key, value):
    with pytest.raises(UserError, match=f"eval.{key}"):
        Predictor(pointwise_model(), **{key: value})


def test_evaluation_records_the_switch_in_metrics_json(tmp_path):
    keras.utils.set_random_seed(2)
    model = build_unet(4, (None, None, 3), base_filters=4, depth=3)
    cfg = compose_config(
        [*TINY_TRAIN, "eval.max_whole_pixels=100", "eval.crop_size=[16,16]", "eval.num_samples=0"]
    )
    report = evaluate_model(model, cfg, "val", tmp_path, tmp_path / "model.keras")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    # 8 synthetic 32x32 val images, each above 100 pixels.
    assert "8 image view(s) above eval.max_whole_pixels=100" in saved["protocol_change"]
    assert saved["protocol"]["mode"] == "whole, slide above eval.max_whole_pixels"
    assert report["protocol_change"] == saved["protocol_change"]
