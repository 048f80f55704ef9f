"""DeepLabV3+ as keras-io builds it, the atrous DeepLabV3+ of the paper, and DeepLabV3.

Two DeepLabV3+ models share the head (ASPP with image pooling, 48-channel low-level decoder):

* `build_deeplabv3plus` is the keras-io example "Multiclass semantic segmentation using
  DeepLabV3+" (keras-team/keras-io, examples/vision/deeplabv3_plus.py): a plain (not atrous)
  ImageNet ResNet-50 read at `conv4_block6_2_relu` - the 256-channel 3x3 output inside the last
  conv4 block, at output stride 16 - so conv5 is never built. Its "DSPP" is image pooling (a 1x1
  conv *with* bias + BN + ReLU) and a 1x1 and three 3x3 branches at rates 6 / 12 / 18 (no bias,
  BN, ReLU), concatenated and fused by a 1x1 conv block, with no dropout. 11,857,236 parameters
  for 20 classes (ResNet-50).
* `build_deeplabv3plus_atrous` is the paper's (Chen et al. 2018, https://arxiv.org/abs/1802.02611)
  and mmsegmentation's form: an atrous backbone at output stride 16 or 8 read at its last stage
  (`conv5_block3_out`, 2048 channels for ResNet-50), ASPP without a pooling-conv bias, and
  dropout 0.1 after the ASPP projection. 40,426,580 parameters for 20 classes (ResNet-50, OS 16).

Both decoders upsample the ASPP output x4 (bilinearly, to the exact size of the stride-4
features), concatenate it with those low-level features reduced to 48 channels, and apply two
3x3 conv blocks. `build_deeplabv3` (Chen et al. 2017, https://arxiv.org/abs/1706.05587) is the
atrous encoder with logits upsampled straight to the input size.

Computing the 1x1 logits before the final bilinear upsampling (as DeepLab's reference code
does; keras-io upsamples the 256-channel features first) gives the same result - both are
linear and bilinear weights sum to one, so even the logits' bias passes through unchanged - at a
fraction of the cost. Likewise global average pooling plus a bilinear resize of the 1x1 map
equals keras-io's `AveragePooling2D(pool_size=feature size)` plus `UpSampling2D`, but does not
fix the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from seg_train.errors import UserError
from seg_train.models import backbones, heads
from seg_train.models.layers import ResizeLike

BACKBONES = ("resnet50", "resnet101", "mobilenetv2")
# ASPP rates at output stride 16; they double at output stride 8 (same field of view).
ASPP_RATES_OS16 = (6, 12, 18)
# The backbone tap keras-io's DSPP reads (see backbones.BACKBONES: the stride-16 features
# inside the last stride-16 block, conv4_block6_2_relu for ResNet-50).
KERAS_IO_ENCODER_TAP = "P4_inner"


def conv_bn_relu(
    x, filters: int, kernel_size: int, name: str, dilation_rate: int = 1, use_bias: bool = False
):
    """Conv + BatchNorm + ReLU, named `<name>`, `_bn`, `_relu` (keras-io's convolution_block).

    The conv has no bias by default: the BatchNorm that follows cancels it (keras-io keeps one
    only in the image-pooling branch, `use_bias=True`).
    """
    x = layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=use_bias,
        kernel_initializer="he_normal",
        name=name,
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def aspp(
    x,
    filters: int,
    rates: Sequence[int],
    dropout: float | None,
    pool_bias: bool = False,
):
    """ASPP: image pooling, 1x1 and atrous 3x3 branches, concatenated and fused by a 1x1 block.

    Args:
        x: Encoder features.
        filters: Channels of every branch and of the fused output.
        rates: Dilation rates of the 3x3 branches.
        dropout: Rate of a dropout layer after the fusion; None = no dropout layer (keras-io).
        pool_bias: Give the image-pooling branch's 1x1 conv a bias (keras-io does).
    """
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
    pooled = conv_bn_relu(pooled, filters, 1, name="aspp_pool_conv", use_bias=pool_bias)
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
    if dropout is None:
        return x
    return layers.Dropout(dropout, name="aspp_dropout")(x)


def decoder(x, low_level, low_level_filters: int, decoder_filters: int):
    """DeepLabV3+'s decoder: x upsampled to the low-level size, fused with 48-ch features."""
    low = conv_bn_relu(low_level, low_level_filters, 1, name="decoder_low_level_conv")
    x = ResizeLike(name="decoder_upsample")([x, low])
    x = layers.Concatenate(name="decoder_concat")([x, low])
    x = conv_bn_relu(x, decoder_filters, 3, name="decoder_conv_1")
    return conv_bn_relu(x, decoder_filters, 3, name="decoder_conv_2")


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise UserError(f"model.backbone must be one of {list(BACKBONES)}, got {backbone!r}")


def _check_args(backbone: str, output_stride: int, aspp_rates: Sequence[int] | None):
    _check_backbone(backbone)
    if output_stride not in (8, 16):
        raise UserError(f"model.output_stride must be 16 or 8, got {output_stride!r}")
    if aspp_rates is None:
        return [rate * 16 // output_stride for rate in ASPP_RATES_OS16]
    return list(aspp_rates)


def _backbone_features(input_shape, backbone, weights, taps, output_stride, alpha, name):
    """Input, preprocessing and backbone; returns (inputs, {tap: features})."""
    shape = backbones.check_input_shape(input_shape, model=f"model={name}")
    features = backbones.build_backbone(
        backbone,
        shape,
        weights,
        taps,
        output_stride=output_stride,
        alpha=alpha,
        name=backbone,
    )
    inputs = keras.Input(shape=shape, name="image")
    # Images arrive as 0..255 floats; each backbone normalises them its own way (ResNets:
    # caffe mode, keras-io's resnet50.preprocess_input).
    return inputs, features(backbones.preprocessing(backbone)(inputs))


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
    inputs, feats = _backbone_features(
        input_shape, backbone, backbone_weights, taps, output_stride, backbone_alpha, name
    )
    return inputs, feats, aspp(feats["P5"], aspp_filters, rates, aspp_dropout)


def _finish(inputs, x, num_classes, freeze_bn, backbone_weights, name, task="segmentation"):
    x = layers.Conv2D(heads.output_channels(task, num_classes), 1, name="logits")(x)
    x = ResizeLike(name="upsample")([x, inputs])
    # Matting: the sigmoid after the upsampling, as the logits are upsampled for segmentation.
    model = keras.Model(inputs, heads.output(x, task), name=name)
    if freeze_bn:
        backbones.freeze_batch_norm(model)
        backbones.warn_frozen_random_bn(freeze_bn, backbone_weights, name)
    return model


def build_deeplabv3plus(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    backbone: str = "resnet50",
    aspp_filters: int = 256,
    aspp_rates: Sequence[int] = ASPP_RATES_OS16,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    backbone_alpha: float = 1.0,
    freeze_bn: bool = False,
    backbone_weights: str | None = "imagenet",
    name: str = "deeplabv3plus",
    task: str = "segmentation",
) -> keras.Model:
    """Builds keras-io's DeepLabV3+ (plain ResNet-50 read inside conv4, DSPP, decoder).

    The backbone is the unmodified ImageNet network read at two points: the DSPP input
    `conv4_block6_2_relu` (256 channels, output stride 16; conv5 is not part of the model) and
    the decoder's `conv2_block3_2_relu` (64 channels, stride 4). Nothing is dilated except the
    DSPP's branches. With ResNet-50 and 20 classes: 11,857,236 parameters.

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3], any size of at least 32 px (None = any size).
        backbone: "resnet50" (keras-io), "resnet101" (`conv4_block23_2_relu`) or
            "mobilenetv2" (`block_12_depthwise_relu`, the same position: the 3x3 output inside
            the last stride-16 block).
        aspp_filters: Channels of every DSPP branch and of its 1x1 fusion block.
        aspp_rates: Rates of the three 3x3 DSPP branches (keras-io: 6, 12, 18).
        low_level_filters: Channels the stride-4 features are reduced to (48).
        decoder_filters: Channels of the decoder's two 3x3 conv blocks.
        backbone_alpha: MobileNetV2 width multiplier (ignored by ResNets).
        freeze_bn: Keep all BatchNorm statistics and affine parameters fixed.
        backbone_weights: "imagenet", None (random init) or a path to a no-top weights file
            of the backbone.
        name: Model name.
        task: "segmentation" (class logits) or "matting" (one sigmoid alpha channel).

    Returns:
        An uncompiled model mapping float32 0..255 RGB images [B, H, W, 3] to float32 logits
        [B, H, W, num_classes] (matting: the alpha [B, H, W, 1] in [0, 1]).
    """
    _check_backbone(backbone)
    inputs, feats = _backbone_features(
        input_shape,
        backbone,
        backbone_weights,
        ("low_level", KERAS_IO_ENCODER_TAP),
        32,  # not atrous: keras-io reads the plain network inside conv4
        backbone_alpha,
        name,
    )
    x = aspp(feats[KERAS_IO_ENCODER_TAP], aspp_filters, aspp_rates, None, pool_bias=True)
    x = decoder(x, feats["low_level"], low_level_filters, decoder_filters)
    return _finish(inputs, x, num_classes, freeze_bn, backbone_weights, name, task)


def build_deeplabv3plus_atrous(
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
    name: str = "deeplabv3plus_atrous",
) -> keras.Model:
    """Builds the paper's DeepLabV3+ (atrous backbone to its last stage, ASPP, decoder).

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
    x = decoder(x, feats["low_level"], low_level_filters, decoder_filters)
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
