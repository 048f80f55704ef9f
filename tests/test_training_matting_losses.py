"""The alpha matting losses against hand-computed values, and their configs."""

import keras
import numpy as np
import pytest
from hydra.utils import instantiate

from seg_train.errors import UserError
from seg_train.training import matting_losses as losses
from tests.helpers import CONFIG_DIR, compose_config

ALPHA_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "loss").glob("alpha_*.yaml"))


def as_batch(array):
    """[H, W] -> float32 [1, H, W, 1]."""
    return np.asarray(array, dtype="float32")[None, :, :, None]


PRED = as_batch([[0.0, 0.5], [1.0, 0.25]])
TRUE = as_batch([[0.0, 1.0], [0.5, 0.25]])


def test_l1_by_hand():
    # |diff| = 0, 0.5, 0.5, 0 over 4 pixels.
    assert float(losses.AlphaL1()(TRUE, PRED)) == pytest.approx(0.25)
    # Truth without the channel axis, and at twice the size (resized bilinearly: constant).
    assert float(losses.AlphaL1()(np.full((1, 4, 4), 0.5, "float32"), PRED)) == pytest.approx(
        (0.5 + 0.0 + 0.5 + 0.25) / 4
    )


def test_gradient_loss_by_hand():
    # diff = pred - true = [[0, -0.5], [0.5, 0]]: x-differences -0.5 and -0.5 (mean |.| 0.5),
    # y-differences 0.5 and 0.5 (0.5); a constant offset has no gradient.
    assert float(losses.AlphaGradientLoss()(TRUE, PRED)) == pytest.approx(1.0)
    assert float(losses.AlphaGradientLoss()(TRUE, TRUE + 0.2)) == pytest.approx(0.0, abs=1e-6)


def test_laplacian_loss_by_hand():
    # A constant error c has no band-pass content; 32x32 gives bands at 32, 16, 8, 4 and a
    # 2x2 residual (level 4, weight 2^4) equal to c.
    true = np.zeros((2, 32, 32, 1), "float32")
    assert float(losses.LaplacianLoss(levels=5)(true, true + 0.1)) == pytest.approx(1.6)
    # A +-1 checkerboard is killed by the binomial blur: all of it is in band 0 (weight 1),
    # the residual is 0.
    board = as_batch((-1.0) ** np.add.outer(np.arange(4), np.arange(4)))
    zero = np.zeros_like(board)
    assert float(losses.LaplacianLoss(levels=1)(zero, board)) == pytest.approx(1.0, abs=1e-6)
    assert float(losses.LaplacianLoss()(TRUE, TRUE)) == 0.0
    with pytest.raises(UserError, match="levels"):
        losses.LaplacianLoss(levels=0)


@pytest.mark.parametrize("name", ALPHA_CONFIGS)
def test_alpha_loss_configs_instantiate_and_serialise(name):
    loss = instantiate(compose_config([f"loss={name}"]).loss)
    rng = np.random.default_rng(0)
    pred = rng.uniform(size=(2, 16, 16, 1)).astype("float32")
    true = rng.uniform(size=(2, 16, 16)).astype("float32")
    value = float(loss(true, pred))
    assert np.isfinite(value) and value > 0
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert float(clone(true, pred)) == pytest.approx(value)
