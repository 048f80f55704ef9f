"""The matting head: one float32 sigmoid alpha channel on the U-Net, MobileNetV2 U-Net and
DeepLabV3+ builders, selected by data.task through model.task."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hydra.utils import instantiate

from seg_train.errors import UserError
from seg_train.models import heads
from seg_train.models.deeplabv3plus import build_deeplabv3plus
from seg_train.models.unet import build_unet
from seg_train.models.unet_mobilenetv2 import build_unet_mobilenetv2
from tests.helpers import compose_config

SHAPE = (32, 32, 3)
BUILDERS = {
    "unet": lambda task: build_unet(2, SHAPE, base_filters=4, depth=3, task=task),
    "unet_mobilenetv2": lambda task: build_unet_mobilenetv2(
        2,
        SHAPE,
        decoder_filters=(8, 8, 8, 8),
        alpha=0.35,
        freeze_encoder=False,
        backbone_weights=None,
        task=task,
    ),
    "deeplabv3plus": lambda task: build_deeplabv3plus(
        2,
        SHAPE,
        backbone="mobilenetv2",
        aspp_filters=8,
        low_level_filters=4,
        decoder_filters=8,
        backbone_alpha=0.35,
        backbone_weights=None,
        task=task,
    ),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_matting_head_is_one_sigmoid_channel(name):
    model = BUILDERS[name]("matting")
    image = np.random.default_rng(0).uniform(0, 255, (2, *SHAPE)).astype("float32")
    alpha = model(image)
    assert tuple(alpha.shape) == (2, 32, 32, 1) and alpha.dtype == "float32"
    alpha = keras.ops.convert_to_numpy(alpha)
    assert (alpha > 0).all() and (alpha < 1).all()
    assert model.layers[-1].name == "alpha"
    assert model.layers[-1].activation is keras.activations.sigmoid


def test_segmentation_head_is_unchanged():
    model = BUILDERS["unet"]("segmentation")
    assert tuple(model.output.shape) == (None, 32, 32, 2)
    assert model.layers[-1].name == "logits_float32"
    with pytest.raises(UserError, match="model.task"):
        heads.output_channels("depth", 2)


def test_model_task_follows_data_task():
    assert compose_config(["model=unet"]).model.task == "segmentation"
    cfg = compose_config(
        [
            "data=portrait",
            "data.root=/x",
            "data.task=matting",
            "model=unet",
            "model.base_filters=4",
            "model.depth=3",
            "data.crop_size=[32,32]",
        ]
    )
    assert cfg.model.task == "matting"
    model = instantiate(cfg.model, _convert_="all")
    assert tuple(model.output.shape) == (None, 32, 32, 1)
