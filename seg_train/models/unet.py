"""U-Net (Ronneberger et al. 2015, https://arxiv.org/abs/1505.04597).

Five levels of two 3x3 conv + ReLU, 2x2 max-pool down, 2x2 transposed-conv up, skip
connections by concatenation and a 1x1 conv to class logits. Unlike the paper, convolutions use
`same` padding so the logits come out at the input resolution (the input size must then be a
multiple of 2**(depth-1)). `base_filters=64` gives the classic 64..1024 channel widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from seg_train.errors import UserError


def conv_block(x, filters: int, batch_norm: bool, name: str):
    """Two 3x3 convolutions, each followed by (optional BatchNorm and) ReLU."""
    for i in (1, 2):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_unet(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    base_filters: int = 64,
    depth: int = 5,
    batch_norm: bool = False,
    dropout: float = 0.0,
    backbone_weights: str | None = None,
    name: str = "unet",
) -> keras.Model:
    """Builds a U-Net returning float32 logits [B, H, W, num_classes].

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3]; H and W (or None) must be multiples of 2**(depth-1).
        base_filters: Channels of the first level; level i has base_filters * 2**i.
        depth: Number of levels (resolutions), 5 in the paper.
        batch_norm: Add BatchNorm after each conv (not in the paper; trains faster).
        dropout: Dropout rate before the bottleneck's upsampling (the paper uses 0.5).
        backbone_weights: Must be None: U-Net has no pretrained backbone.
        name: Model name.
    """
    if backbone_weights is not None:
        raise UserError(
            "model.backbone_weights must be null for model=unet: U-Net trains from "
            "scratch and has no pretrained backbone"
        )
    factor = 2 ** (depth - 1)
    for side in input_shape[:2]:
        if side is not None and side % factor:
            raise UserError(
                f"U-Net with depth {depth} needs input sides divisible by {factor}, "
                f"got {list(input_shape[:2])}; change data.crop_size"
            )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    # Images arrive as 0..255 floats; the model owns its normalisation (see data/pipeline.py).
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    skips = []
    for level in range(depth - 1):
        x = conv_block(x, base_filters * 2**level, batch_norm, name=f"encoder{level + 1}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"encoder{level + 1}_pool")(x)
    x = conv_block(x, base_filters * 2 ** (depth - 1), batch_norm, name="bottleneck")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth - 1)):
        stage = f"decoder{level + 1}"
        x = layers.Conv2DTranspose(base_filters * 2**level, 2, strides=2, name=f"{stage}_upconv")(x)
        x = layers.Concatenate(name=f"{stage}_concat")([skips[level], x])
        x = conv_block(x, base_filters * 2**level, batch_norm, name=stage)
    logits = layers.Conv2D(num_classes, 1, name="logits")(x)
    # float32 logits even under a mixed-precision policy, so the loss is computed in float32.
    logits = layers.Activation("linear", dtype="float32", name="logits_float32")(logits)
    return keras.Model(inputs, logits, name=name)
