"""Fully convolutional networks (Long, Shelhamer & Darrell 2015, https://arxiv.org/abs/1411.4038).

VGG16 made fully convolutional: fc6 becomes a 7x7 convolution (with `same` padding, so the
stride-32 score map keeps one cell per 32x32 input block instead of being cropped away), fc7 a
1x1 convolution, each followed by ReLU and dropout; a zero-initialised 1x1 `score_fr` layer
gives class scores. FCN-32s upsamples them x32 with a trainable transposed convolution whose
kernel starts as the bilinear filter of size `2 * f - f % 2`. FCN-16s / FCN-8s first fuse (sum)
the x2-upsampled scores with zero-initialised 1x1 scores of pool4 / pool3, as in the paper.
FCN-8s is the authors' "at-once" variant (voc-fcn8s-atonce/net.py in
shelhamer/fcn.berkeleyvision.org): trained in one stage, with the pool4 and pool3 features
multiplied by fixed constants 0.01 and 0.0001 (Caffe `Scale` layers with lr_mult 0) before their
score layers, so the skips' contributions start small next to the stride-32 scores.

Because every convolution pads `same` and the input size is a multiple of 32, the upsampled
maps line up exactly with the skips, so the paper's 100-px input padding and crop layers are
not needed.

With `backbone_weights="imagenet"` and the paper's `fc_filters=4096`, the whole ImageNet VGG16
(`vgg16_weights_tf_dim_ordering_tf_kernels.h5`, with its classifier) is loaded and its fc1 / fc2
Dense weights are reshaped into fc6 / fc7, exactly the paper's "convolutionalization"; with a
narrower `fc_filters` only the convolutional (no-top) weights are loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from seg_train.errors import UserError
from seg_train.models import backbones
from seg_train.models.layers import BilinearUpsampling

# VGG16's classifier that fc6 / fc7 are made from: fc1 reads the 7x7x512 pool5 map.
VGG_FC_FILTERS = 4096
VGG_POOL5_SIZE = 7
VGG_TOP_INPUT = (224, 224, 3)
# Skips fused by each variant, coarse to fine, with the upsampling factor that follows them.
VARIANTS = {32: ((), 32), 16: (("P4",), 16), 8: (("P4", "P3"), 8)}
SKIP_NAMES = {"P4": "pool4", "P3": "pool3"}
# FCN-8s at-once: the fixed factors on pool4 / pool3 before their score layers.
AT_ONCE_SKIP_SCALES = (0.01, 0.0001)


def _upsample(x, num_classes: int, factor: int, name: str):
    """Trainable x`factor` transposed conv starting as bilinear interpolation (no bias, as FCN)."""
    return layers.Conv2DTranspose(
        num_classes,
        2 * factor - factor % 2,
        strides=factor,
        padding="same",
        use_bias=False,
        kernel_initializer=BilinearUpsampling(),
        name=name,
    )(x)


def _score(x, num_classes: int, name: str):
    # Long et al. zero-initialise every scoring layer (random init "did not yield better
    # performance or faster convergence"); with zeros a new skip starts as a no-op.
    return layers.Conv2D(num_classes, 1, kernel_initializer="zeros", name=name)(x)


def _imagenet_vgg16_with_fc(features: keras.Model) -> tuple[list, list]:
    """Loads ImageNet VGG16 with its classifier into `features`; returns fc6 / fc7 weights."""
    full = backbones.application("vgg16", VGG_TOP_INPUT, "imagenet", include_top=True)
    for layer in features.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    # Flatten orders pool5 as (row, col, channel), so the Dense kernel reshapes to a 7x7 conv.
    fc1_kernel, fc1_bias = full.get_layer("fc1").get_weights()
    fc2_kernel, fc2_bias = full.get_layer("fc2").get_weights()
    fc6 = [fc1_kernel.reshape(VGG_POOL5_SIZE, VGG_POOL5_SIZE, -1, VGG_FC_FILTERS), fc1_bias]
    fc7 = [fc2_kernel.reshape(1, 1, VGG_FC_FILTERS, VGG_FC_FILTERS), fc2_bias]
    return fc6, fc7


def _build_fcn(
    stride: int,
    num_classes: int,
    input_shape: Sequence[int | None],
    fc_filters: int,
    dropout: float,
    backbone_weights: str | None,
    name: str,
    skip_scales: Sequence[float] | None = None,
) -> keras.Model:
    skips, final_factor = VARIANTS[stride]
    scales = _check_skip_scales(skip_scales, len(skips), name)
    shape = backbones.check_input_shape(input_shape, multiple=32, model=f"model={name}")
    load_fc = backbone_weights == "imagenet" and fc_filters == VGG_FC_FILTERS
    features = backbones.build_backbone(
        "vgg16", shape, None if load_fc else backbone_weights, ("P3", "P4", "P5"), name="vgg16"
    )
    fc_weights = _imagenet_vgg16_with_fc(features) if load_fc else None

    inputs = keras.Input(shape=shape, name="image")
    # Images arrive as 0..255 floats; VGG16's ImageNet weights expect caffe-style BGR - mean.
    taps = features(backbones.preprocessing("vgg16")(inputs))
    x = layers.Conv2D(fc_filters, VGG_POOL5_SIZE, padding="same", activation="relu", name="fc6")(
        taps["P5"]
    )
    x = layers.Dropout(dropout, name="drop6")(x)
    x = layers.Conv2D(fc_filters, 1, activation="relu", name="fc7")(x)
    x = layers.Dropout(dropout, name="drop7")(x)
    x = _score(x, num_classes, "score_fr")
    for tap, factor in zip(skips, scales, strict=True):
        skip = SKIP_NAMES[tap]
        x = _upsample(x, num_classes, 2, name=f"upscore_{skip}")
        features_in = taps[tap]
        if factor != 1.0:
            features_in = layers.Rescaling(factor, name=f"scale_{skip}")(features_in)
        x = layers.Add(name=f"fuse_{skip}")([x, _score(features_in, num_classes, f"score_{skip}")])
    x = _upsample(x, num_classes, final_factor, name=f"upscore{final_factor}")
    logits = backbones.logits_float32(x)
    model = keras.Model(inputs, logits, name=name)
    if fc_weights is not None:
        model.get_layer("fc6").set_weights(fc_weights[0])
        model.get_layer("fc7").set_weights(fc_weights[1])
    return model


def _check_skip_scales(skip_scales: Sequence[float] | None, count: int, name: str) -> list[float]:
    """`skip_scales` as one float per skip (coarse to fine); None = 1 for every skip."""
    if skip_scales is None:
        return [1.0] * count
    scales = list(skip_scales)
    if len(scales) != count or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in scales
    ):
        raise UserError(
            f"model.skip_scales of {name} must be {count} positive factors (pool4, pool3), got "
            f"{scales!r}; e.g. model.skip_scales=[0.01,0.0001] (at-once) or null"
        )
    return [float(v) for v in scales]


def build_fcn32s(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    fc_filters: int = VGG_FC_FILTERS,
    dropout: float = 0.5,
    backbone_weights: str | None = "imagenet",
    name: str = "fcn32s",
) -> keras.Model:
    """Builds FCN-32s: VGG16 scores at stride 32, upsampled x32 by one bilinear-initialised deconv.

    Full size (fc_filters=4096, 21 classes): 136,152,917 parameters.

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3]; sides must be multiples of 32 (None = any such size).
        fc_filters: Channels of fc6 / fc7 (4096 in the paper; narrower trains faster, but
            then only the convolutional ImageNet weights are loaded).
        dropout: Dropout rate after fc6 and fc7 (0.5 in the paper).
        backbone_weights: "imagenet", None (random init) or a path to a VGG16 no-top
            weights file.
        name: Model name.

    Returns:
        An uncompiled model mapping float32 0..255 RGB images [B, H, W, 3] to float32
        logits [B, H, W, num_classes].
    """
    return _build_fcn(32, num_classes, input_shape, fc_filters, dropout, backbone_weights, name)


def build_fcn16s(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    fc_filters: int = VGG_FC_FILTERS,
    dropout: float = 0.5,
    backbone_weights: str | None = "imagenet",
    name: str = "fcn16s",
) -> keras.Model:
    """Builds FCN-16s: stride-32 scores upsampled x2 and summed with pool4 scores, then x16.

    Full size (fc_filters=4096, 21 classes): 134,815,994 parameters.

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3]; sides must be multiples of 32 (None = any such size).
        fc_filters: Channels of fc6 / fc7 (4096 in the paper).
        dropout: Dropout rate after fc6 and fc7 (0.5 in the paper).
        backbone_weights: "imagenet", None (random init) or a path to a VGG16 no-top
            weights file.
        name: Model name.

    Returns:
        An uncompiled model mapping float32 0..255 RGB images [B, H, W, 3] to float32
        logits [B, H, W, num_classes].
    """
    return _build_fcn(16, num_classes, input_shape, fc_filters, dropout, backbone_weights, name)


def build_fcn8s(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    fc_filters: int = VGG_FC_FILTERS,
    dropout: float = 0.5,
    backbone_weights: str | None = "imagenet",
    name: str = "fcn8s",
    skip_scales: Sequence[float] | None = AT_ONCE_SKIP_SCALES,
) -> keras.Model:
    """Builds FCN-8s: FCN-16s' fused scores upsampled x2 and summed with pool3 scores, then x8.

    Full size (fc_filters=4096, 21 classes): 134,489,759 parameters.

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3]; sides must be multiples of 32 (None = any such size).
        fc_filters: Channels of fc6 / fc7 (4096 in the paper).
        dropout: Dropout rate after fc6 and fc7 (0.5 in the paper).
        backbone_weights: "imagenet", None (random init) or a path to a VGG16 no-top
            weights file.
        name: Model name.
        skip_scales: Fixed factors on the pool4 and pool3 features before their score
            layers: (0.01, 0.0001) is the authors' at-once FCN-8s; None = no scaling (the
            staged FCN-8s, which starts from a trained FCN-16s).

    Returns:
        An uncompiled model mapping float32 0..255 RGB images [B, H, W, 3] to float32
        logits [B, H, W, num_classes].
    """
    return _build_fcn(
        8, num_classes, input_shape, fc_filters, dropout, backbone_weights, name, skip_scales
    )
