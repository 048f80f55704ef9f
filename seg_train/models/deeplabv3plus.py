"""DeepLabV3 (Chen et al. 2017, https://arxiv.org/abs/1706.05587) and DeepLabV3+ (Chen et al.
2018, https://arxiv.org/abs/1802.02611).

An atrous backbone (ResNet-50 / ResNet-101 / MobileNetV2 at output stride 16 or 8) feeds ASPP:
image pooling + a 1x1 conv + three 3x3 atrous convs (rates 6 / 12 / 18 at stride 16, doubled
at 8), each with `aspp_filters` channels, BatchNorm and ReLU, concatenated and fused by a 1x1
conv (+ BN, ReLU, dropout). DeepLabV3 puts 1x1 class logits on that and upsamples them to the
input size. DeepLabV3+ adds the decoder: the ASPP output upsampled x4 (bilinearly, to the exact
size of the stride-4 features), concatenated with those low-level features reduced to 48
channels, two 3x3 conv blocks, then the logits and the upsampling to the input size.

Computing the 1x1 logits before the final bilinear upsampling (as the reference implementation
does) gives the same result as upsampling the features first - both are linear, and bilinear
weights sum to one - at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from seg_train.errors import UserError
from seg_train.models import backbones
from seg_train.models.layers import ResizeLike

BACKBONES = ("resnet50", "resnet101", "mobilenetv2")
# ASPP rates at output stride 16; they double at output stride 8 (same field of view).
ASPP_RATES_OS16 = (6, 12, 18)


def conv_bn_relu(x, filters: int, kernel_size: int, name: str, dilation_rate: int = 1):
    """Conv (no bias: BatchNorm follows) + BatchNorm + ReLU, named `<name>`, `_bn`, `_relu`."""
    x = layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def aspp(x, filters: int, rates: Sequence[int], dropout: float):
    """DeepLabV3's ASPP: image pooling, 1x1 and atrous 3x3 branches, concatenated and fused."""
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
    pooled = conv_bn_relu(pooled, filters, 1, name="aspp_pool_conv")
    # Bilinear resizing of a 1x1 map broadcasts it to the feature map's (dynamic) size.
    branches = [
        ResizeLike(name="aspp_pool_upsample")([pooled, x]),
        conv_bn_relu(x, filters, 1, name="aspp_conv_1"),
    ]
    branches += [
        conv_bn_relu(x, filters, 3, name=f"aspp_conv_{i}", dilation_rate=rate)
        for i, rate in enumerate(rates, start=2)
    ]
    x = layers.Concatenate(name="aspp_concat")(branches)
    x = conv_bn_relu(x, filters, 1, name="aspp_project")
    return layers.Dropout(dropout, name="aspp_dropout")(x)


def _check_args(backbone: str, output_stride: int, aspp_rates: Sequence[int] | None):
    if backbone not in BACKBONES:
        raise UserError(f"model.backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    if output_stride not in (8, 16):
        raise UserError(f"model.output_stride must be 16 or 8, got {output_stride!r}")
    if aspp_rates is None:
        return [rate * 16 // output_stride for rate in ASPP_RATES_OS16]
    return list(aspp_rates)


def _encoder(
    input_shape,
    backbone,
    output_stride,
    aspp_filters,
    aspp_rates,
    aspp_dropout,
    backbone_alpha,
    backbone_weights,
    taps,
    name,
):
    """Input, preprocessing, atrous backbone and ASPP; returns (inputs, taps dict, ASPP out)."""
    rates = _check_args(backbone, output_stride, aspp_rates)
    shape = backbones.check_input_shape(input_shape, model=f"model={name}")
    features = backbones.build_backbone(
        backbone,
        shape,
        backbone_weights,
        taps,
        output_stride=output_stride,
        alpha=backbone_alpha,
        name=backbone,
    )
    inputs = keras.Input(shape=shape, name="image")
    # Images arrive as 0..255 floats; each backbone normalises them its own way.
    feats = features(backbones.preprocessing(backbone)(inputs))
    return inputs, feats, aspp(feats["P5"], aspp_filters, rates, aspp_dropout)


def _finish(inputs, x, num_classes, freeze_bn, backbone_weights, name):
    x = layers.Conv2D(num_classes, 1, name="logits")(x)
    x = ResizeLike(name="upsample")([x, inputs])
    model = keras.Model(inputs, backbones.logits_float32(x), name=name)
    if freeze_bn:
        backbones.freeze_batch_norm(model)
        backbones.warn_frozen_random_bn(freeze_bn, backbone_weights, name)
    return model


def build_deeplabv3plus(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    backbone: str = "resnet50",
    output_stride: int = 16,
    aspp_filters: int = 256,
    aspp_rates: Sequence[int] | None = None,
    aspp_dropout: float = 0.1,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    backbone_alpha: float = 1.0,
    freeze_bn: bool = False,
    backbone_weights: str | None = "imagenet",
    name: str = "deeplabv3plus",
) -> keras.Model:
    """Builds DeepLabV3+ (atrous backbone, ASPP, low-level decoder).

    Full size (20 classes, output stride 16): ResNet-50 40,426,580 parameters; ResNet-101
    59,497,044; MobileNetV2 (alpha 1) 5,856,020.

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3], any size of at least 32 px (None = any size).
        backbone: "resnet50", "resnet101" or "mobilenetv2".
        output_stride: 16 or 8 (conv5 / conv4+conv5 made atrous).
        aspp_filters: Channels of every ASPP branch and of its 1x1 projection.
        aspp_rates: Rates of the three atrous ASPP branches; default (6, 12, 18) at output
            stride 16 and (12, 24, 36) at 8.
        aspp_dropout: Dropout after the ASPP projection (0.1 in the reference code).
        low_level_filters: Channels the stride-4 features are reduced to (48 in the paper).
        decoder_filters: Channels of the decoder's two 3x3 conv blocks.
        backbone_alpha: MobileNetV2 width multiplier (ignored by ResNets).
        freeze_bn: Keep all BatchNorm statistics and affine parameters fixed.
        backbone_weights: "imagenet", None (random init) or a path to a no-top weights file
            of the backbone; loaded before it is made atrous.
        name: Model name.

    Returns:
        An uncompiled model mapping float32 0..255 RGB images [B, H, W, 3] to float32 logits
        [B, H, W, num_classes].
    """
    inputs, feats, x = _encoder(
        input_shape,
        backbone,
        output_stride,
        aspp_filters,
        aspp_rates,
        aspp_dropout,
        backbone_alpha,
        backbone_weights,
        ("low_level", "P5"),
        name,
    )
    low = conv_bn_relu(feats["low_level"], low_level_filters, 1, name="decoder_low_level_conv")
    x = ResizeLike(name="decoder_upsample")([x, low])
    x = layers.Concatenate(name="decoder_concat")([x, low])
    x = conv_bn_relu(x, decoder_filters, 3, name="decoder_conv_1")
    x = conv_bn_relu(x, decoder_filters, 3, name="decoder_conv_2")
    return _finish(inputs, x, num_classes, freeze_bn, backbone_weights, name)


def build_deeplabv3(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    backbone: str = "resnet50",
    output_stride: int = 16,
    aspp_filters: int = 256,
    aspp_rates: Sequence[int] | None = None,
    aspp_dropout: float = 0.1,
    backbone_alpha: float = 1.0,
    freeze_bn: bool = False,
    backbone_weights: str | None = "imagenet",
    name: str = "deeplabv3",
) -> keras.Model:
    """Builds DeepLabV3 (atrous backbone and ASPP, logits upsampled straight to the input).

    Full size (20 classes, output stride 16): ResNet-50 39,131,028 parameters; ResNet-101
    58,201,492.

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3], any size of at least 32 px (None = any size).
        backbone: "resnet50", "resnet101" or "mobilenetv2".
        output_stride: 16 or 8 (conv5 / conv4+conv5 made atrous).
        aspp_filters: Channels of every ASPP branch and of its 1x1 projection.
        aspp_rates: Rates of the three atrous ASPP branches; default (6, 12, 18) at output
            stride 16 and (12, 24, 36) at 8.
        aspp_dropout: Dropout after the ASPP projection.
        backbone_alpha: MobileNetV2 width multiplier (ignored by ResNets).
        freeze_bn: Keep all BatchNorm statistics and affine parameters fixed.
        backbone_weights: "imagenet", None (random init) or a path to a no-top weights file
            of the backbone; loaded before it is made atrous.
        name: Model name.

    Returns:
        An uncompiled model mapping float32 0..255 RGB images [B, H, W, 3] to float32 logits
        [B, H, W, num_classes].
    """
    inputs, _, x = _encoder(
        input_shape,
        backbone,
        output_stride,
        aspp_filters,
        aspp_rates,
        aspp_dropout,
        backbone_alpha,
        backbone_weights,
        ("P5",),
        name,
    )
    return _finish(inputs, x, num_classes, freeze_bn, backbone_weights, name)
