"""DeepLab v2 (Chen et al. 2017, https://arxiv.org/abs/1606.00915).

ResNet-101 made atrous (conv4: stride 1, dilation 2; conv5: stride 1, dilation 4), so the score
map has output stride 8 (a 321x321 input gives 41x41 scores). ASPP-L is the **sum** of four 3x3
atrous convolutions straight to `num_classes`, at rates 6 / 12 / 18 / 24. The scores are
upsampled bilinearly to the input size.

Multi-scale inputs (`msc_scales`, e.g. [1.0, 0.75, 0.5]): the same network (shared weights) runs
on each rescaled image, every score map is resized to the full-scale one and the maps are fused
by an element-wise max. The built model returns only the fused logits upsampled to the input
size (what eval, infer and checkpoints use); `msc_training_model` exposes each scale's own
score map and the fused score map as well, because DeepLab v2 (DrSleep's `train_msc.py`) puts
a loss on each of them against labels shrunk by nearest neighbour to that map's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from seg_train.errors import UserError
from seg_train.models import backbones
from seg_train.models.layers import ResizeByScale, ResizeLike

BACKBONES = ("resnet101", "resnet50", "mobilenetv2")
OUTPUT_STRIDE = 8
FUSED_LAYER = "msc_fused"
SCALE_LOGITS_PREFIX = "msc_logits_"
# Outputs of the training view (`msc_training_model`): the input-size logits that metrics
# follow (no loss), and the max-fused score map (a loss, like each scale's own map).
METRIC_OUTPUT = "fused"
FUSED_SCORES = "fused_scores"


def scale_tag(scale: float) -> str:
    """A layer-name-safe tag for a scale: 1.0 -> "100", 0.75 -> "075"."""
    return f"{round(scale * 100):03d}"


def aspp_sum(x, num_classes: int, rates: Sequence[int]):
    """DeepLab v2's ASPP-L: parallel 3x3 atrous convs to class scores, summed."""
    branches = [
        # Caffe DeepLab initialises the classifier branches with N(0, 0.01) and zero bias.
        layers.Conv2D(
            num_classes,
            3,
            padding="same",
            dilation_rate=rate,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name=f"aspp_conv_{i}",
        )(x)
        for i, rate in enumerate(rates, start=1)
    ]
    return layers.Add(name="aspp_sum")(branches) if len(branches) > 1 else branches[0]


def build_deeplabv2(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    backbone: str = "resnet101",
    aspp_rates: Sequence[int] = (6, 12, 18, 24),
    msc_scales: Sequence[float] | None = None,
    backbone_alpha: float = 1.0,
    freeze_bn: bool = False,
    backbone_weights: str | None = "imagenet",
    name: str = "deeplabv2",
) -> keras.Model:
    """Builds DeepLab v2 (ASPP-L on an output-stride-8 atrous ResNet).

    Full size (ResNet-101, 21 classes): 44,206,548 parameters (42,658,176 in the backbone).

    Args:
        num_classes: Number of output classes.
        input_shape: [H, W, 3], any size of at least 32 px (None = any size).
        backbone: "resnet101" (the paper), "resnet50" or "mobilenetv2" (a cheap variant for
            CPUs; also made atrous to output stride 8).
        aspp_rates: Dilation rates of the ASPP branches (ASPP-L: 6, 12, 18, 24; [12] gives
            the paper's single-branch "DeepLab-LargeFOV" head).
        msc_scales: Input scales for multi-scale max fusion, e.g. [1.0, 0.75, 0.5]; must
            contain 1.0. None = single scale.
        backbone_alpha: MobileNetV2 width multiplier (ignored by ResNets).
        freeze_bn: Keep all BatchNorm statistics and affine parameters fixed (the paper
            trains with frozen ImageNet BatchNorm).
        backbone_weights: "imagenet", None (random init) or a path to a no-top weights file of
            the backbone; loaded before the network is made atrous.
        name: Model name.

    Returns:
        An uncompiled model mapping float32 0..255 RGB images [B, H, W, 3] to float32 logits
        [B, H, W, num_classes]. Layer "aspp_sum" holds the stride-8 score map.

    Raises:
        UserError: for an unknown backbone, bad msc_scales or too small an input.
    """
    if backbone not in BACKBONES:
        raise UserError(
            f"model.backbone must be one of {list(BACKBONES)} for DeepLab v2, got {backbone!r}"
        )
    scales = _check_scales(msc_scales)
    shape = backbones.check_input_shape(input_shape, model=f"model={name}")
    features = backbones.build_backbone(
        backbone,
        shape,
        backbone_weights,
        ("P5",),
        output_stride=OUTPUT_STRIDE,
        alpha=backbone_alpha,
        name=backbone,
    )
    # With several scales the shared network sees several sizes, so its input takes any size.
    image = keras.Input(shape=shape if scales is None else (None, None, 3), name="image")
    x = features(backbones.preprocessing(backbone)(image))["P5"]
    scores = aspp_sum(x, num_classes, aspp_rates)

    if scales is None:
        inputs = image
    else:
        # One shared-weight network, called once per scale.
        scale_net = keras.Model(image, scores, name="scale_net")
        inputs = keras.Input(shape=shape, name="image")
        per_scale = {
            scale: scale_net(
                inputs
                if scale == 1.0
                else ResizeByScale(scale, name=f"msc_input_{scale_tag(scale)}")(inputs)
            )
            for scale in scales
        }
        full = per_scale[1.0]
        resized = [
            layers.Identity(name=SCALE_LOGITS_PREFIX + scale_tag(scale))(logits)
            if scale == 1.0
            else ResizeLike(name=SCALE_LOGITS_PREFIX + scale_tag(scale))([logits, full])
            for scale, logits in per_scale.items()
        ]
        scores = layers.Maximum(name=FUSED_LAYER)(resized)
    logits = ResizeLike(name="upsample")([scores, inputs])
    model = keras.Model(inputs, backbones.logits_float32(logits), name=name)
    if freeze_bn:
        backbones.freeze_batch_norm(model)
        backbones.warn_frozen_random_bn(freeze_bn, backbone_weights, name)
    return model


def _check_scales(msc_scales: Sequence[float] | None) -> list[float] | None:
    if msc_scales is None or len(msc_scales) == 0:
        return None
    scales = [float(s) for s in msc_scales]
    if any(s <= 0 for s in scales) or 1.0 not in scales or len(set(scales)) != len(scales):
        raise UserError(
            "model.msc_scales must be distinct positive scales including 1.0 (the "
            f"fused map has the full-scale size), got {list(msc_scales)}; "
            "e.g. model.msc_scales=[1.0,0.75,0.5] or null"
        )
    return scales


def msc_training_model(model: keras.Model) -> keras.Model:
    """The training view of a multi-scale DeepLab v2: its score maps and the fused logits.

    The returned model shares every layer (and so every weight) with `model`; train it, and
    save / evaluate `model`. It works on a freshly built model and on one loaded from a
    `.keras` checkpoint.

    As in DrSleep's `train_msc.py`, the maps a loss applies to are not upsampled: each scale's
    own output stride-8 score map (41, 31 and 21 px for a 321 px input and scales 1 / 0.75 /
    0.5) and the max-fused map at the full-scale map's size (41 px). The segmentation losses
    shrink the labels to each map by nearest neighbour
    (`seg_train.training.losses`), so the losses on
    these four outputs are the four cross-entropy terms of DrSleep's `reduced_loss`.

    Args:
        model: A model from `build_deeplabv2(..., msc_scales=[...])`.

    Returns:
        A model whose output is a dict of float32 logits [B, h, w, num_classes]:
        "fused" (`model`'s own output at input resolution, for metrics: no loss goes on it),
        "fused_scores" (the max-fused score map) and "scale_<tag>" for each input scale
        (tag = percent, e.g. "scale_100", "scale_075", "scale_050"; that scale's own score
        map), in `msc_scales` order. Put the loss on every output but "fused" and sum them.

    Raises:
        ValueError: if `model` was built without `msc_scales`.
    """
    scale_layers = [layer for layer in model.layers if layer.name.startswith(SCALE_LOGITS_PREFIX)]
    if not scale_layers:
        raise ValueError(
            f"model {model.name} has no multi-scale outputs; build it with "
            "msc_scales, e.g. [1.0, 0.75, 0.5]"
        )
    outputs = {
        METRIC_OUTPUT: model.output,
        FUSED_SCORES: backbones.logits_float32(
            model.get_layer(FUSED_LAYER).output, name=FUSED_SCORES
        ),
    }
    for layer in scale_layers:
        tag = layer.name.removeprefix(SCALE_LOGITS_PREFIX)
        # The scale-1 layer is an Identity on its map; the others resize [own map, scale-1
        # map] to the fused size: their first input is the scale's own map.
        own = layer.input[0] if isinstance(layer.input, (list, tuple)) else layer.input
        outputs[f"scale_{tag}"] = backbones.logits_float32(own, name=f"scale_{tag}")
    return keras.Model(model.input, outputs, name=f"{model.name}_msc_train")
