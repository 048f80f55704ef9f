"""ImageNet backbones from `keras.applications`: the one tap-point table, weights and atrous form.

`BACKBONES` is the one table of backbones: each entry's `keras.applications` constructor, the
input preprocessing its ImageNet weights expect, and its tap points - the layers the
segmentation heads read:

* `P1`..`P5`: the last feature map at stride 2, 4, 8, 16 and 32 of the *plain* network (the
  names keep their meaning after the network is made atrous; only the strides change).
* `P4_inner`: the stride-16 features inside the last stride-16 block, after its 3x3 conv and
  ReLU (ResNet-50: `conv4_block6_2_relu`, 256 channels): what keras-io's DeepLabV3+ feeds its
  DSPP instead of the atrous last stage.
* `low_level`: the stride-4 features DeepLabV3+'s decoder fuses (keras-io's choice for ResNets).

`build_backbone` returns a feature-extractor `keras.Model` whose outputs are a dict keyed by
those names. ResNets and MobileNetV2 can be made atrous (`output_stride` 16 or 8) by cloning the
network with stride 1 and a dilation rate on the later stages: kernel shapes do not change, so
ImageNet weights are loaded into the original network and copied over unchanged.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras

from seg_train.errors import UserError
from seg_train.models.layers import ImagePreprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where its features are.

    Attributes:
        application: The `keras.applications` constructor.
        preprocessing: `imagenet_utils.preprocess_input` mode the ImageNet weights expect.
        taps: Tap-point key -> layer name.
        atrous: Whether `output_stride` 16 / 8 is supported.
    """

    application: Callable[..., keras.Model]
    preprocessing: str
    taps: dict[str, str]
    atrous: bool = True


def _resnet_taps(conv4_blocks: int) -> dict[str, str]:
    return {
        "P1": "conv1_relu",
        "P2": "conv2_block3_out",
        "P3": "conv3_block4_out",
        "P4": f"conv4_block{conv4_blocks}_out",
        "P5": "conv5_block3_out",
        "P4_inner": f"conv4_block{conv4_blocks}_2_relu",
        "low_level": "conv2_block3_2_relu",
    }


BACKBONES: dict[str, BackboneSpec] = {
    # VGG has no BatchNorm and is only used un-dilated (FCN); taps are the pooling outputs.
    "vgg16": BackboneSpec(
        keras.applications.VGG16,
        "caffe",
        {f"P{i}": f"block{i}_pool" for i in range(1, 6)},
        atrous=False,
    ),
    "resnet50": BackboneSpec(keras.applications.ResNet50, "caffe", _resnet_taps(6)),
    "resnet101": BackboneSpec(keras.applications.ResNet101, "caffe", _resnet_taps(23)),
    # The TF segmentation tutorial's U-Net taps (block_16_project is before the 1280-ch conv).
    "mobilenetv2": BackboneSpec(
        keras.applications.MobileNetV2,
        "tf",
        {
            "P1": "block_1_expand_relu",
            "P2": "block_3_expand_relu",
            "P3": "block_6_expand_relu",
            "P4": "block_13_expand_relu",
            "P5": "block_16_project",
            # Block 12 is the last at stride 16 (block 13's depthwise conv strides to 32).
            "P4_inner": "block_12_depthwise_relu",
            "low_level": "block_3_expand_relu",
        },
    ),
}
# Stages made atrous for each output stride: (stage, dilation rate) in network order.
RESNET_ATROUS = {32: (), 16: (("conv5", 2),), 8: (("conv4", 2), ("conv5", 4))}
# MobileNetV2 stride-2 blocks (block_6: stride 8 -> 16, block_13: 16 -> 32) and their blocks.
MOBILENET_STAGES = {"block_6": range(6, 13), "block_13": range(13, 17)}
MOBILENET_ATROUS = {32: (), 16: (("block_13", 2),), 8: (("block_6", 2), ("block_13", 4))}
# keras.applications refuse smaller inputs (and the stride-32 features would be empty).
MIN_INPUT_SIZE = 32


def spec(backbone: str) -> BackboneSpec:
    """The table entry for `backbone`, or a UserError listing the choices."""
    if backbone not in BACKBONES:
        raise UserError(f"model.backbone {backbone!r} is not one of {sorted(BACKBONES)}")
    return BACKBONES[backbone]


def preprocessing(backbone: str, name: str = "preprocess") -> ImagePreprocessing:
    """The layer normalising 0..255 RGB images for `backbone`'s ImageNet weights."""
    return ImagePreprocessing(spec(backbone).preprocessing, name=name)


def check_input_shape(
    input_shape: Sequence[int | None], multiple: int = 1, model: str = "this model"
) -> tuple[int | None, int | None, int]:
    """Validates [H, W, 3] (None = any size) and returns it as a tuple of ints / None.

    Raises:
        UserError: naming data.crop_size when a side is too small or not a multiple of
            `multiple` (the models' skip connections need exact halving / doubling).
    """
    if len(input_shape) != 3 or input_shape[2] != 3:
        raise UserError(f"model.input_shape must be [height, width, 3], got {list(input_shape)}")
    height, width = (None if side is None else int(side) for side in input_shape[:2])
    for side in (height, width):
        if side is None:
            continue
        if side < MIN_INPUT_SIZE:
            raise UserError(
                f"{model} needs input sides of at least {MIN_INPUT_SIZE} px, got "
                f"{[height, width]}; increase data.crop_size"
            )
        if side % multiple:
            raise UserError(
                f"{model} needs input sides divisible by {multiple}, got "
                f"{[height, width]}; change data.crop_size (e.g. "
                f"[{_round_to(height, multiple)}, {_round_to(width, multiple)}])"
            )
    return height, width, 3


def _round_to(side: int | None, multiple: int) -> int | None:
    return None if side is None else max(multiple, round(side / multiple) * multiple)


def keras_models_dir() -> Path:
    """Where `keras.utils.get_file(cache_subdir="models")` looks for application weights."""
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"


def application(
    backbone: str,
    input_shape: Sequence[int | None],
    weights: str | None,
    include_top: bool = False,
    **kwargs,
) -> keras.Model:
    """Calls the `keras.applications` constructor, turning weight problems into one-line errors.

    Args:
        backbone: A key of `BACKBONES`.
        input_shape: [H, W, 3]; None sides allowed.
        weights: "imagenet" (Keras downloads the file into ~/.keras/models/ once), None (random
            initialisation) or a path to a weights file for this network.
        include_top: Also build (and load) the ImageNet classifier.
        **kwargs: Passed on (e.g. `alpha` for MobileNetV2).
    """
    entry = spec(backbone)
    if weights not in ("imagenet", None):
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.backbone_weights {weights!r} is not 'imagenet', null or an "
                "existing weights file; fix it or use model.backbone_weights=null"
            )
        weights = str(path)
    try:
        return entry.application(
            include_top=include_top, weights=weights, input_shape=tuple(input_shape), **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - re-raised as a UserError or unchanged
        message = str(exc).strip()
        first = message.splitlines()[0] if message else type(exc).__name__
        fetch = re.search(r"URL fetch failure on (\S+):\s", message)
        if weights == "imagenet" and fetch:
            origin = fetch.group(1)
            file = keras_models_dir() / origin.rsplit("/", 1)[-1]
            raise UserError(
                f"model.backbone_weights=imagenet: cannot download {file.name} for {backbone} "
                f"(offline?); save {origin} as {file}, or use model.backbone_weights=null"
            ) from exc
        if weights == "imagenet" and isinstance(exc, ValueError):
            # Hash mismatch of a cached file, or options without ImageNet weights (e.g. alpha).
            raise UserError(f"model.backbone_weights=imagenet for {backbone}: {first}") from exc
        if weights is not None and weights != "imagenet":
            raise UserError(
                f"model.backbone_weights {weights}: cannot load it into {backbone}: {first}"
            ) from exc
        raise


def build_backbone(
    backbone: str,
    input_shape: Sequence[int | None],
    weights: str | None,
    taps: Sequence[str],
    output_stride: int = 32,
    alpha: float = 1.0,
    name: str | None = None,
) -> keras.Model:
    """Builds a feature extractor returning {tap: features} for the requested tap keys.

    Args:
        backbone: "vgg16", "resnet50", "resnet101" or "mobilenetv2".
        input_shape: [H, W, 3] of the *preprocessed* images; None sides allowed.
        weights: "imagenet", None or a weights-file path (see `application`).
        taps: Keys of `BACKBONES[backbone].taps`.
        output_stride: 32 (plain), 16 or 8 (atrous; ResNets and MobileNetV2 only).
        alpha: MobileNetV2 width multiplier (ImageNet weights exist for 0.35..1.4).
        name: Model name (default: the backbone name).
    """
    entry = spec(backbone)
    unknown = [tap for tap in taps if tap not in entry.taps]
    if unknown:
        raise ValueError(f"{backbone} has no taps {unknown}; known: {sorted(entry.taps)}")
    if output_stride not in (8, 16, 32) or (output_stride != 32 and not entry.atrous):
        allowed = "8, 16 or 32" if entry.atrous else "32"
        raise UserError(
            f"model.output_stride must be {allowed} for backbone {backbone}, got {output_stride}"
        )
    kwargs = {}
    build_shape = (None, None, 3)
    if backbone == "mobilenetv2":
        # Keras has MobileNetV2 ImageNet weights trained at 96..224 px and picks them by size.
        kwargs, build_shape = {"alpha": alpha}, tuple(input_shape)
    base = application(backbone, build_shape, weights, **kwargs)
    if output_stride != 32 or base.input.shape[1:3] != (None, None):
        base = make_atrous(base, backbone, output_stride)
    outputs = {tap: base.get_layer(entry.taps[tap]).output for tap in taps}
    return keras.Model(base.input, outputs, name=name or backbone)


def atrous_changes(backbone: str, output_stride: int, layer: str) -> dict:
    """Config changes (strides, dilation_rate, padding) of one layer for an output stride."""
    if backbone.startswith("resnet"):
        for stage, rate in RESNET_ATROUS[output_stride]:
            # keras.applications' ResNet v1 strides in block 1's 1x1 convs (main path and
            # shortcut); every 3x3 conv of the stage gets the rate, as in DeepLab's ResNets.
            if layer in (f"{stage}_block1_0_conv", f"{stage}_block1_1_conv"):
                return {"strides": (1, 1)}
            if re.fullmatch(rf"{stage}_block\d+_2_conv", layer):
                return {"dilation_rate": (rate, rate)}
    elif backbone == "mobilenetv2":
        previous_rate = 1
        for stage, rate in MOBILENET_ATROUS[output_stride]:
            first, *rest = MOBILENET_STAGES[stage]
            # The strided depthwise conv (`valid` padding after an explicit ZeroPadding2D)
            # keeps the previous rate, as in DeepLab's MobileNetV2; the blocks after it dilate.
            if layer == f"block_{first}_pad":
                return {"padding": ((previous_rate, previous_rate),) * 2}
            if layer == f"block_{first}_depthwise":
                return {"strides": (1, 1), "dilation_rate": (previous_rate, previous_rate)}
            if layer in {f"block_{block}_depthwise" for block in rest}:
                return {"dilation_rate": (rate, rate)}
            previous_rate = rate
    return {}


def make_atrous(base: keras.Model, backbone: str, output_stride: int) -> keras.Model:
    """Clones `base` with strides removed and dilation added, then copies all its weights.

    Dilation does not change kernel shapes, so the copy is exact: whatever `base` was loaded
    with (ImageNet or a file) is what the atrous network starts from. The clone takes inputs of
    any size (`output_stride=32` just makes a size-agnostic copy): the enclosing model's input
    carries the static size, and a size-agnostic backbone lets the whole model be re-run on
    other sizes (e.g. `predict.dynamic_twin`).
    """

    def clone_layer(layer):
        config = layer.get_config()
        config.update(atrous_changes(backbone, output_stride, layer.name))
        return layer.__class__.from_config(config)

    # Same input name as `base`, so every layer keeps its name in the clone.
    inputs = keras.Input(shape=(None, None, base.input.shape[-1]), name=base.layers[0].name)
    atrous = keras.models.clone_model(base, input_tensors=inputs, clone_function=clone_layer)
    for layer in base.layers:
        if layer.weights:
            atrous.get_layer(layer.name).set_weights(layer.get_weights())
    return atrous


def freeze_batch_norm(model: keras.Model) -> int:
    """Makes every BatchNormalization layer (nested ones too) non-trainable; returns the count.

    In Keras 3 a non-trainable BatchNormalization also runs in inference mode, so its moving
    statistics and its gamma / beta all stay fixed (DeepLab's recipe for small batches).
    """
    count = 0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


def _all_layers(model: keras.Model):
    """The layers of `model`, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def warn_frozen_random_bn(freeze_bn: bool, weights: str | None, model: str) -> None:
    """Frozen BatchNorm with random weights is an identity: legal, but rarely what one wants."""
    if freeze_bn and weights is None:
        log.warning(
            "%s: freeze_bn with backbone_weights=null fixes BatchNorm at its initial "
            "identity statistics, so nothing is normalised; set model.freeze_bn=false "
            "to train from scratch",
            model,
        )


def logits_float32(x, name: str = "logits_float32"):
    """float32 logits even under a mixed-precision policy, so the loss runs in float32."""
    return keras.layers.Activation("linear", dtype="float32", name=name)(x)
