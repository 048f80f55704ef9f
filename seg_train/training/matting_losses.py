"""Alpha matting losses on a predicted alpha [B, H, W, 1] in [0, 1] and a true alpha in [0, 1].

The true alpha may come as [B, H, W] or [B, H, W, 1]; when its size differs from the
prediction's it is resized bilinearly (alpha is continuous, unlike class ids). Every loss is a
mean over the pixels of the batch (trimap-free: the portrait set has no trimap, so every pixel
counts), computes in float32 under mixed precision, and is registered for `.keras`
(de)serialisation. Weighted sums use `seg_train.training.losses.WeightedSum` through the `loss`
group (see configs/loss/alpha_*.yaml).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from seg_train.errors import UserError


def _alphas(y_true, y_pred):
    """float32 [B, H, W, 1] prediction and truth at the prediction's size."""
    pred = ops.cast(y_pred, "float32")
    true = ops.cast(y_true, "float32")
    if len(true.shape) == 3:
        true = true[..., None]
    if None not in pred.shape[1:3] and tuple(true.shape[1:3]) != tuple(pred.shape[1:3]):
        true = ops.image.resize(true, pred.shape[1:3], interpolation="bilinear")
    return pred, true


class _AlphaLoss(keras.losses.Loss):
    """float32 regardless of the global policy; the loss reduces to a scalar itself."""

    def __init__(self, name: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(name=name, **kwargs)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}


@keras.saving.register_keras_serializable(package="seg_train")
class AlphaL1(_AlphaLoss):
    """Mean absolute alpha difference (the alpha prediction loss of trimap-free matting)."""

    def __init__(self, name: str = "alpha_l1", **kwargs):
        super().__init__(name, **kwargs)

    def call(self, y_true, y_pred):
        pred, true = _alphas(y_true, y_pred)
        return ops.mean(ops.abs(pred - true))


@keras.saving.register_keras_serializable(package="seg_train")
class AlphaGradientLoss(_AlphaLoss):
    """L1 between the alpha gradients of prediction and truth.

    Gradients are forward differences along x and y (no smoothing, so edges stay sharp); the
    loss is mean |dx(pred) - dx(true)| + mean |dy(pred) - dy(true)|, which penalises blurry or
    noisy transitions that the plain L1 barely sees.
    """

    def __init__(self, name: str = "alpha_gradient", **kwargs):
        super().__init__(name, **kwargs)

    def call(self, y_true, y_pred):
        pred, true = _alphas(y_true, y_pred)
        diff = pred - true  # both differences are linear: d(pred) - d(true) = d(pred - true)
        dx = diff[:, :, 1:, :] - diff[:, :, :-1, :]
        dy = diff[:, 1:, :, :] - diff[:, :-1, :, :]
        return ops.mean(ops.abs(dx)) + ops.mean(ops.abs(dy))


# The 5x5 binomial kernel of Burt & Adelson's Laplacian pyramid.
_BINOMIAL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
_KERNEL = np.outer(_BINOMIAL, _BINOMIAL)[:, :, None, None].astype("float32")


def _blur(image, kernel):
    """5x5 filter with reflected borders (the reference implementations' padding)."""
    padded = ops.pad(image, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="reflect")
    return ops.conv(padded, kernel, padding="valid")


def _upsample(image, kernel):
    """Doubles height and width: zeros between samples, then the blur with 4x the kernel."""
    batch, height, width = ops.shape(image)[0], ops.shape(image)[1], ops.shape(image)[2]
    zeros = ops.zeros_like(image)
    image = ops.reshape(ops.stack([image, zeros], axis=2), (batch, 2 * height, width, 1))
    zeros = ops.zeros_like(image)
    image = ops.reshape(ops.stack([image, zeros], axis=3), (batch, 2 * height, 2 * width, 1))
    return _blur(image, 4.0 * kernel)


def laplacian_pyramid(image, levels: int):
    """Band-pass levels (finest first) and the final low-pass residual of [B, H, W, 1].

    Stops early once a level is smaller than 3 pixels, where reflected 2-pixel padding is no
    longer defined (e.g. 5 levels of a 32x32 crop give 4 band-pass levels and a 2x2 residual).
    Odd sizes lose their last row/column when upsampled back, so each band is compared on the
    common size.
    """
    kernel = ops.convert_to_tensor(_KERNEL)
    pyramid = []
    current = image
    for _ in range(levels):
        height, width = current.shape[1], current.shape[2]
        if height is not None and width is not None and min(height, width) < 3:
            break
        down = _blur(current, kernel)[:, ::2, ::2, :]
        up = _upsample(down, kernel)
        h, w = ops.shape(current)[1], ops.shape(current)[2]
        pyramid.append(current - up[:, :h, :w, :])
        current = down
    pyramid.append(current)
    return pyramid


@keras.saving.register_keras_serializable(package="seg_train")
class LaplacianLoss(_AlphaLoss):
    """Laplacian-pyramid L1 (Hou & Liu 2019; FBA Matting): sum_i 2^i * mean |L_i(pred - true)|.

    The pyramid is linear, so L_i(pred) - L_i(true) = L_i(pred - true) and one pyramid is
    built. Coarser levels weigh more (2^i), so global structure is not drowned by pixel noise.

    Args:
        levels: Band-pass levels (5 in the references), fewer for small inputs.
        name: Loss name.
    """

    def __init__(self, levels: int = 5, name: str = "alpha_laplacian", **kwargs):
        super().__init__(name, **kwargs)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise UserError(f"loss.levels must be an integer >= 1, got {levels!r}")
        self.levels = levels

    def call(self, y_true, y_pred):
        pred, true = _alphas(y_true, y_pred)
        pyramid = laplacian_pyramid(pred - true, self.levels)
        return sum((2.0**i) * ops.mean(ops.abs(level)) for i, level in enumerate(pyramid))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "levels": self.levels}
