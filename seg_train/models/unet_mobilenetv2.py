"""MobileNetV2 U-Net, the TensorFlow image-segmentation tutorial model
(https://www.tensorflow.org/tutorials/images/segmentation).

Encoder: MobileNetV2 (Sandler et al. 2018, https://arxiv.org/abs/1801.04381) tapped at
`block_1_expand_relu`, `block_3_expand_relu`, `block_6_expand_relu`, `block_13_expand_relu` and
`block_16_project` (strides 2..32). Decoder: pix2pix upsample blocks (Isola et al. 2017,
https://arxiv.org/abs/1611.07004) - a stride-2 transposed conv without bias, BatchNorm, ReLU -
with 512 / 256 / 128 / 64 filters, each concatenated with the next finer tap; a final stride-2
3x3 transposed conv gives the class logits at the input size. The tutorial passes kernel size 3
to the upsample blocks (pix2pix itself uses 4) and freezes the encoder.

`input_scaling` picks how the 0..255 input is normalised: "symmetric" (-1..1, the range
MobileNetV2's ImageNet weights were trained with) or "unit" (0..1, what the tutorial feeds its
encoder: `normalize` divides by 255 and nothing rescales it further).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras
from keras import layers

from seg_train.errors import UserError
from seg_train.models import backbones, heads

log = logging.getLogger(__name__)
ENCODER_TAPS = ("P1", "P2", "P3", "P4", "P5")
INPUT_SCALINGS = ("symmetric", "unit")


def normalization(input_scaling: str) -> layers.Layer:
    """The first layer: 0..255 images to -1..1 ("symmetric") or to 0..1 ("unit")."""
    if input_scaling == "unit":
        # float32 like the symmetric ImagePreprocessing, also under mixed precision.
        return layers.Rescaling(1.0 / 255.0, dtype="float32", name="preprocess")
    return backbones.preprocessing("mobilenetv2")


def upsample_block(x, filters: int, kernel_size: int, name: str):
    """pix2pix `upsample`: Conv2DTranspose (stride 2, N(0, 0.02), no bias) + BatchNorm + ReLU."""
    x = layers.Conv2DTranspose(
        filters,
        kernel_size,
        strides=2,
        padding="same",
        use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
        name=f"{name}_upconv",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_unet_mobilenetv2(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    decoder_filters: Sequence[int] = (512, 256, 128, 64),
    kernel_size: int = 3,
    alpha: float = 1.0,
    freeze_encoder: bool = True,
    freeze_bn: bool = False,
    input_scaling: str = "symmetric",
    backbone_weights: str | None = "imagenet",
    name: str = "unet_mobilenetv2",
    task: str = "segmentation",
) -> keras.Model:
    """Builds the TF tutorial's U-Net on a MobileNetV2 encoder.

    Full size (alpha 1, 3 classes): 6,504,227 parameters, 4,660,323 of them trainable with the
    encoder frozen - the tutorial's counts.

    Args:
        num_classes: Number of output classes (3 for the Oxford-IIIT Pet trimaps).
        input_shape: [H, W, 3]; sides must be multiples of 32 (None = any such size).
        decoder_filters: Filters of the four upsample blocks, coarse to fine.
        kernel_size: Kernel of the upsample blocks' transposed convs (3 as in the tutorial).
        alpha: MobileNetV2 width multiplier (ImageNet weights exist for 0.35, 0.5, 0.75, 1.0,
            1.3 and 1.4).
        freeze_encoder: Keep the whole encoder fixed (its BatchNorm too), as the tutorial does.
        freeze_bn: Keep every BatchNorm (decoder ones included) fixed.
        input_scaling: "symmetric" (0..255 -> -1..1, MobileNetV2's own preprocessing) or
            "unit" (0..255 -> 0..1, as the tutorial feeds the encoder).
        backbone_weights: "imagenet", None (random init) or a path to a MobileNetV2 no-top
            weights file.
        name: Model name.
        task: "segmentation" (class logits) or "matting" (one sigmoid alpha channel).

    Returns:
        An uncompiled model mapping float32 0..255 RGB images [B, H, W, 3] to float32 logits
        [B, H, W, num_classes] (matting: the alpha [B, H, W, 1] in [0, 1]).
    """
    if len(decoder_filters) != len(ENCODER_TAPS) - 1:
        raise ValueError(
            f"decoder_filters needs {len(ENCODER_TAPS) - 1} values, got {list(decoder_filters)}"
        )
    if input_scaling not in INPUT_SCALINGS:
        raise UserError(
            f"model.input_scaling must be one of {', '.join(INPUT_SCALINGS)}; got {input_scaling!r}"
        )
    shape = backbones.check_input_shape(input_shape, multiple=32, model=f"model={name}")
    encoder = backbones.build_backbone(
        "mobilenetv2", shape, backbone_weights, ENCODER_TAPS, alpha=alpha, name="encoder"
    )
    # Keras 3 runs non-trainable BatchNorm layers in inference mode, as the tutorial relies on.
    encoder.trainable = not freeze_encoder
    if freeze_encoder and backbone_weights is None:
        log.warning(
            "%s: freeze_encoder with backbone_weights=null keeps a random encoder; set "
            "model.freeze_encoder=false to train it",
            name,
        )

    inputs = keras.Input(shape=shape, name="image")
    taps = encoder(normalization(input_scaling)(inputs))
    x = taps[ENCODER_TAPS[-1]]
    skips = reversed(ENCODER_TAPS[:-1])
    for stage, (filters, skip) in enumerate(zip(decoder_filters, skips, strict=True), start=1):
        x = upsample_block(x, filters, kernel_size, name=f"decoder_stage{stage}")
        x = layers.Concatenate(name=f"decoder_stage{stage}_concat")([x, taps[skip]])
    channels = heads.output_channels(task, num_classes)
    x = layers.Conv2DTranspose(channels, 3, strides=2, padding="same", name="logits")(x)
    model = keras.Model(inputs, heads.output(x, task), name=name)
    if freeze_bn:
        backbones.freeze_batch_norm(model)
        backbones.warn_frozen_random_bn(freeze_bn, backbone_weights, name)
    return model
