"""U-Net (Ronneberger et al. 2015, https://arxiv.org/abs/1505.04597).

Five levels of two 3x3 conv + ReLU, 2x2 max-pool down, transposed-conv up, skip connections by
concatenation and a 1x1 conv to class logits. Unlike the paper, convolutions use `same` padding
so the logits come out at the input resolution (the input size must then be a multiple of
2**(depth-1)). `base_filters=64` gives the classic 64..1024 channel widths.

Two up-convolutions:

* `transpose2x2`: the paper's 2x2 stride-2 transposed conv, no activation.
* `transpose3x3_relu`: a PyTorch `ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1)`
  followed by ReLU, as in the PyTorch portrait U-Net (seed 003). Its output pixel `o` sums
  input pixel `i` through kernel tap `k` where `o = 2i + k - 1`; Keras' `padding="same"` gives
  the same size but `o = 2i + k` (a one-pixel shift), so this is built as a `valid` transposed
  conv (`o = 2i + k`, size 2H+1) with its first row and column cropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers

from seg_train.errors import UserError
from seg_train.models import heads

# input_scaling -> (scale, offset) applied to 0..255 images.
INPUT_SCALINGS = {"symmetric": (1.0 / 127.5, -1.0), "unit": (1.0 / 255.0, 0.0)}
UP_CONVS = ("transpose2x2", "transpose3x3_relu")
INITIALIZERS = ("he_normal", "pytorch")


def check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    """Raises a one-line UserError naming `model.<key>` when `value` is not a choice."""
    if value not in choices:
        raise UserError(f"model.{key} must be one of {', '.join(choices)}; got {value!r}")


def pytorch_init(fan_in: int) -> dict:
    """Kernel and bias initialisers of PyTorch's Conv2d / ConvTranspose2d `reset_parameters`.

    PyTorch draws kernels from kaiming_uniform(a=sqrt(5)), i.e. U(-b, b) with
    b = sqrt(6 / (1 + 5)) * sqrt(3 / fan_in) = 1 / sqrt(fan_in), and biases from the same
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Keras' VarianceScaling(1/3, fan_in, uniform) has the
    bound sqrt(3 * (1/3) / fan_in), the same, and computes fan_in from the kernel shape as
    PyTorch does (for a transposed conv: kernel area x *output* channels).

    Args:
        fan_in: The layer's fan-in, needed for the bias bound (Keras bias initialisers do not
            see the kernel shape).
    """
    bound = 1.0 / math.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.VarianceScaling(
            1.0 / 3.0, mode="fan_in", distribution="uniform"
        ),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


def conv_block(x, filters: int, batch_norm: bool, name: str, initializer: str = "he_normal"):
    """Two 3x3 convolutions, each followed by (optional BatchNorm and) ReLU."""
    for i in (1, 2):
        if initializer == "pytorch":
            init = pytorch_init(9 * x.shape[-1])
        else:
            init = {"kernel_initializer": "he_normal"}
        x = layers.Conv2D(
            filters, 3, padding="same", use_bias=not batch_norm, name=f"{name}_conv{i}", **init
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def upsample(x, filters: int, kind: str, name: str, initializer: str = "he_normal"):
    """Doubles the resolution: the paper's 2x2 transposed conv or seed 003's 3x3 one + ReLU."""
    if kind == "transpose2x2":
        init = pytorch_init(4 * filters) if initializer == "pytorch" else {}
        return layers.Conv2DTranspose(filters, 2, strides=2, name=f"{name}_upconv", **init)(x)
    init = pytorch_init(9 * filters) if initializer == "pytorch" else {}
    x = layers.Conv2DTranspose(
        filters, 3, strides=2, padding="valid", name=f"{name}_upconv", **init
    )(x)
    # valid: 2H+1 pixels, o = 2i + k; PyTorch's padding=1 drops o = 0 and output_padding=1
    # keeps o = 2H, so its pixel o is our pixel o + 1.
    x = layers.Cropping2D(((1, 0), (1, 0)), name=f"{name}_upconv_crop")(x)
    return layers.ReLU(name=f"{name}_upconv_relu")(x)


def build_unet(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    base_filters: int = 64,
    depth: int = 5,
    batch_norm: bool = False,
    dropout: float = 0.0,
    input_scaling: str = "symmetric",
    up_conv: str = "transpose2x2",
    initializer: str = "he_normal",
    backbone_weights: str | None = None,
    name: str = "unet",
    task: str = "segmentation",
) -> keras.Model:
    """Builds a U-Net returning float32 logits [B, H, W, num_classes].

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3]; H and W (or None) must be multiples of 2**(depth-1).
        base_filters: Channels of the first level; level i has base_filters * 2**i.
        depth: Number of levels (resolutions), 5 in the paper.
        batch_norm: Add BatchNorm after each 3x3 conv (not in the paper; trains faster).
        dropout: Dropout rate before the bottleneck's upsampling (the paper uses 0.5).
        input_scaling: How the model maps its 0..255 input: "symmetric" to -1..1, "unit" to
            0..1 (torchvision's ToTensor, as seed 003 feeds its U-Net).
        up_conv: "transpose2x2" (the paper) or "transpose3x3_relu" (seed 003: PyTorch's
            3x3 stride-2 ConvTranspose2d with padding 1, output_padding 1, then ReLU).
        initializer: "he_normal" (3x3 convs He-normal, transposed convs and the 1x1 logits
            Keras' Glorot-uniform, zero biases) or "pytorch" (every conv as PyTorch initialises
            it: kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
        backbone_weights: Must be None: U-Net has no pretrained backbone.
        name: Model name.
        task: "segmentation" (class logits) or "matting" (one sigmoid alpha channel).
    """
    if backbone_weights is not None:
        raise UserError(
            "model.backbone_weights must be null for model=unet: U-Net trains from "
            "scratch and has no pretrained backbone"
        )
    check_choice("input_scaling", input_scaling, tuple(INPUT_SCALINGS))
    check_choice("up_conv", up_conv, UP_CONVS)
    check_choice("initializer", initializer, INITIALIZERS)
    factor = 2 ** (depth - 1)
    for side in input_shape[:2]:
        if side is not None and side % factor:
            raise UserError(
                f"U-Net with depth {depth} needs input sides divisible by {factor}, "
                f"got {list(input_shape[:2])}; change data.crop_size"
            )
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    # Images arrive as 0..255 floats; the model owns its normalisation (see data/pipeline.py).
    scale, offset = INPUT_SCALINGS[input_scaling]
    x = layers.Rescaling(scale, offset=offset, name="normalize")(inputs)
    skips = []
    for level in range(depth - 1):
        filters = base_filters * 2**level
        x = conv_block(x, filters, batch_norm, f"encoder{level + 1}", initializer)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"encoder{level + 1}_pool")(x)
    x = conv_block(x, base_filters * 2 ** (depth - 1), batch_norm, "bottleneck", initializer)
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth - 1)):
        stage = f"decoder{level + 1}"
        filters = base_filters * 2**level
        x = upsample(x, filters, up_conv, stage, initializer)
        x = layers.Concatenate(name=f"{stage}_concat")([skips[level], x])
        x = conv_block(x, filters, batch_norm, stage, initializer)
    init = pytorch_init(x.shape[-1]) if initializer == "pytorch" else {}
    logits = layers.Conv2D(heads.output_channels(task, num_classes), 1, name="logits", **init)(x)
    # float32 outputs even under a mixed-precision policy, so the loss is computed in float32.
    return keras.Model(inputs, heads.output(logits, task), name=name)
