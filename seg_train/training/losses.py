"""Segmentation losses on logits [B, H, W, C] and integer labels [B, H, W] (255 = ignore).

Every loss here:

- averages over the non-ignored pixels of the whole batch, so padding and VOC's object borders
  (label 255) contribute nothing to the loss or its gradient;
- computes in float32 even when the logits arrive as float16 (mixed precision);
- accepts logits smaller than the labels (DeepLab v2 at output stride 8, or its multi-scale
  outputs): the labels are then shrunk to the logits with nearest neighbour (TF1's
  `resize_nearest_neighbor` rule, as DrSleep's DeepLab v2 `prepare_label`), never bilinearly,
  which would invent labels between classes;
- is registered for `.keras` (de)serialisation.

Class weights are per-class factors on each pixel's loss (`loss.class_weights: [..]`); the
weighted sum is still divided by the number of non-ignored pixels (Keras' `sample_weight`
convention, so `[1, 1, ...]` equals no weights), not by the sum of the weights as PyTorch's
`CrossEntropyLoss(weight=...)` does. `class_weights: auto` asks for median-frequency weights
(Eigen & Fergus 2015, SegNet) computed from the training set's label histogram; the train task
replaces it (`seg_train.tasks.instantiate.resolve_class_weights`) before instantiating the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
from keras import ops

from seg_train.errors import UserError

AUTO = "auto"


def _class_weights(value: Any, key: str = "loss.class_weights") -> list[float] | None:
    """Validates class weights from config: None, or a list of non-negative numbers."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == AUTO:
            raise UserError(
                f"{key}=auto needs the training set's class histogram: build the "
                "loss with seg_train.tasks.instantiate.resolve_class_weights(cfg.loss, ...) "
                f"or give one weight per class, e.g. '{key}=[1.0,2.0,...]'"
            )
        raise UserError(f"{key} must be null, auto or a list of numbers, got {value!r}")
    weights = list(value)
    if not weights or any(
        isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights
    ):
        raise UserError(f"{key} must be a list of numbers >= 0 (one per class), got {weights!r}")
    return [float(w) for w in weights]


class _SegmentationLoss(keras.losses.Loss):
    """Shared label handling: squeeze, resize to the logits, ignore mask, class weights."""

    def __init__(
        self,
        ignore_label: int | None = 255,
        class_weights: Sequence[float] | str | None = None,
        name: str | None = None,
        **kwargs,
    ):
        # The loss reduces to a scalar itself (mean over valid pixels); Keras' reduction of a
        # scalar is then the identity. float32 regardless of the global mixed policy.
        kwargs.setdefault("dtype", "float32")
        super().__init__(name=name, **kwargs)
        self.ignore_label = ignore_label
        self.class_weights = _class_weights(class_weights)

    def _prepare(self, y_true, y_pred):
        """Returns float32 logits, int32 labels (ignored -> 0), float32 valid mask and weights."""
        logits = ops.cast(y_pred, "float32")
        labels = y_true
        if len(labels.shape) == len(logits.shape):
            labels = ops.squeeze(labels, axis=-1)
        labels = _resize_labels(labels, logits.shape[1:3])
        labels = ops.cast(labels, "int32")
        if self.ignore_label is None:
            valid = ops.ones_like(labels, dtype="bool")
        else:
            valid = ops.not_equal(labels, self.ignore_label)
        labels = ops.where(valid, labels, 0)
        valid = ops.cast(valid, "float32")
        weights = valid
        if self.class_weights is not None:
            num_classes = logits.shape[-1]
            if num_classes is not None and num_classes != len(self.class_weights):
                raise UserError(
                    f"loss.class_weights has {len(self.class_weights)} values but "
                    f"the model predicts {num_classes} classes; give one per class"
                )
            table = ops.convert_to_tensor(self.class_weights, dtype="float32")
            weights = weights * ops.take(table, labels)
        return logits, labels, valid, weights

    @staticmethod
    def _mean(values, valid, weights):
        """sum(values * weights) / #valid pixels; 0 (not NaN) when every pixel is ignored."""
        return ops.sum(values * weights) / ops.maximum(ops.sum(valid), 1.0)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ignore_label": self.ignore_label,
            "class_weights": self.class_weights,
        }


def _nearest_indices(in_size, out_size: int):
    """Source rows (or columns) of a nearest-neighbour shrink from `in_size` to `out_size`.

    `floor(i * in_size / out_size)` in float32 for output index i: the rule of TF1's
    `tf.image.resize_nearest_neighbor(align_corners=False)` (before `half_pixel_centers`
    existed), which DrSleep's DeepLab v2 `prepare_label` uses to shrink labels to each score
    map. Output cell i then takes the label at input pixel ~ i * stride, the top-left-aligned
    position a `same`-padded strided network samples; TF2's half-pixel rule (what
    `ops.image.resize(..., "nearest")` does) would shift it by about half a stride.
    """
    scale = ops.cast(in_size, "float32") / float(out_size)
    index = ops.floor(ops.arange(out_size, dtype="float32") * scale)
    return ops.minimum(ops.cast(index, "int32"), ops.cast(in_size, "int32") - 1)


def _resize_labels(labels, size):
    """Nearest-neighbour resize of [B, H, W] labels to `size` when the static sizes differ.

    Uses TF1's `resize_nearest_neighbor` rule (see `_nearest_indices`), by gathering rows and
    columns, so label values (255 included) are copied, never interpolated.
    """
    height, width = size
    if height is None or width is None or tuple(labels.shape[1:3]) == (height, width):
        return labels
    shape = ops.shape(labels)
    labels = ops.take(labels, _nearest_indices(shape[1], height), axis=1)
    return ops.take(labels, _nearest_indices(shape[2], width), axis=2)


@keras.saving.register_keras_serializable(package="seg_train")
class CrossEntropy(_SegmentationLoss):
    """Softmax cross-entropy from logits, averaged over non-ignored pixels, with class weights.

    Without class weights this equals
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255)` (checked
    in the tests); this class adds class weights, label resizing and a float32 guarantee.

    Args:
        ignore_label: Label value that contributes nothing (None: none ignored).
        class_weights: One weight per class, or None.
        name: Loss name.
    """

    def __init__(
        self,
        ignore_label: int | None = 255,
        class_weights: Sequence[float] | str | None = None,
        name: str = "cross_entropy",
        **kwargs,
    ):
        super().__init__(ignore_label, class_weights, name, **kwargs)

    def call(self, y_true, y_pred):
        logits, labels, valid, weights = self._prepare(y_true, y_pred)
        ce = ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return self._mean(ce, valid, weights)


@keras.saving.register_keras_serializable(package="seg_train")
class FocalLoss(_SegmentationLoss):
    """Focal loss (Lin et al. 2017, https://arxiv.org/abs/1708.02002), multi-class.

    Per pixel `-alpha_y * (1 - p_y) ** gamma * log(p_y)` with `p_y` the softmax probability of
    the true class and `alpha_y` the class weight (1 without weights), averaged over the
    non-ignored pixels. `gamma=0` gives the cross-entropy.

    Args:
        gamma: Focusing exponent (2 in the paper).
        ignore_label: Label value that contributes nothing (None: none ignored).
        class_weights: One weight (alpha) per class, or None.
        name: Loss name.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        ignore_label: int | None = 255,
        class_weights: Sequence[float] | str | None = None,
        name: str = "focal",
        **kwargs,
    ):
        super().__init__(ignore_label, class_weights, name, **kwargs)
        if gamma < 0:
            raise UserError(f"loss.gamma must be >= 0, got {gamma!r}")
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        logits, labels, valid, weights = self._prepare(y_true, y_pred)
        log_probs = ops.log_softmax(logits, axis=-1)
        log_p = ops.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        focal = -ops.power(1.0 - ops.exp(log_p), self.gamma) * log_p
        return self._mean(focal, valid, weights)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="seg_train")
class DiceLoss(_SegmentationLoss):
    """Soft Dice loss (Milletari et al. 2016, https://arxiv.org/abs/1606.04797), multi-class.

    Per class c over all non-ignored pixels of the batch, with softmax probabilities p and
    one-hot labels y: `dice_c = (2 * sum(p_c * y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth)`;
    the loss is `1 - sum_c w_c * dice_c / sum_c w_c` (w = class weights, 1 by default). A
    class absent from labels and predictions scores dice 1 thanks to `smooth`.

    Args:
        smooth: Additive smoothing of numerator and denominator.
        ignore_label: Label value that contributes nothing (None: none ignored).
        class_weights: One weight per class for the average over classes, or None.
        name: Loss name.
    """

    def __init__(
        self,
        smooth: float = 1.0,
        ignore_label: int | None = 255,
        class_weights: Sequence[float] | str | None = None,
        name: str = "dice",
        **kwargs,
    ):
        super().__init__(ignore_label, class_weights, name, **kwargs)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        logits, labels, valid, _ = self._prepare(y_true, y_pred)
        valid = valid[..., None]
        probs = ops.softmax(logits, axis=-1) * valid
        one_hot = ops.one_hot(labels, logits.shape[-1], dtype="float32") * valid
        axes = tuple(range(len(logits.shape) - 1))
        intersection = ops.sum(probs * one_hot, axis=axes)
        total = ops.sum(probs, axis=axes) + ops.sum(one_hot, axis=axes)
        dice = (2.0 * intersection + self.smooth) / (total + self.smooth)
        if self.class_weights is None:
            return 1.0 - ops.mean(dice)
        weights = ops.convert_to_tensor(self.class_weights, dtype="float32")
        return 1.0 - ops.sum(dice * weights) / ops.maximum(ops.sum(weights), 1e-12)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="seg_train")
class WeightedSum(keras.losses.Loss):
    """`sum_k weights[k] * losses[k](y_true, y_pred)`, e.g. cross-entropy + Dice.

    Args:
        losses: Named losses, e.g. `{"ce": CrossEntropy(), "dice": DiceLoss()}`.
        weights: Weight per name (missing names weigh 1).
        name: Loss name.
    """

    def __init__(
        self,
        losses: Mapping[str, keras.losses.Loss],
        weights: Mapping[str, float] | None = None,
        name: str = "weighted_sum",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(name=name, **kwargs)
        if not losses:
            raise UserError("loss.losses must name at least one loss")
        weights = dict(weights or {})
        unknown = set(weights) - set(losses)
        if unknown:
            raise UserError(
                f"loss.weights names {sorted(unknown)}, which are not in "
                f"loss.losses ({sorted(losses)})"
            )
        # Plain dicts: Hydra hands over DictConfigs, which Keras cannot serialise.
        self.losses = {str(k): v for k, v in losses.items()}
        self.weights = {k: float(weights.get(k, 1.0)) for k in self.losses}

    def call(self, y_true, y_pred):
        total = 0.0
        for key, loss in self.losses.items():
            total = total + self.weights[key] * loss(y_true, y_pred)
        return total

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": dict(self.weights),
            "losses": {k: keras.saving.serialize_keras_object(v) for k, v in self.losses.items()},
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WeightedSum:
        config = dict(config)
        config["losses"] = {
            k: keras.saving.deserialize_keras_object(v) for k, v in config["losses"].items()
        }
        return cls(**config)
