"""Full-size model checks (each builds networks of 6-140 M parameters): `pytest -m slow`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from seg_train.models import backbones, deeplabv2, deeplabv3plus, fcn, unet, unet_mobilenetv2
from tests.helpers import trainable_count

pytestmark = pytest.mark.slow

# (builder, arguments, parameter count) of each paper-size model.
FULL_SIZE = {
    "fcn32s": (fcn.build_fcn32s, {"num_classes": 21}, 136_152_917),
    "fcn16s": (fcn.build_fcn16s, {"num_classes": 21}, 134_815_994),
    "fcn8s": (fcn.build_fcn8s, {"num_classes": 21}, 134_489_759),
    "deeplabv2": (deeplabv2.build_deeplabv2, {"num_classes": 21}, 44_206_548),
    # keras-io's model.summary() (examples/vision/md/deeplabv3_plus.md): 11,857,236 total,
    # 11,824,500 trainable for 20 classes.
    "deeplabv3plus": (deeplabv3plus.build_deeplabv3plus, {"num_classes": 20}, 11_857_236),
    "deeplabv3plus_atrous": (
        deeplabv3plus.build_deeplabv3plus_atrous,
        {"num_classes": 20},
        40_426_580,
    ),
    "deeplabv3plus_atrous_r101": (
        deeplabv3plus.build_deeplabv3plus_atrous,
        {"num_classes": 20, "backbone": "resnet101"},
        59_497_044,
    ),
    "deeplabv3plus_atrous_mnv2": (
        deeplabv3plus.build_deeplabv3plus_atrous,
        {"num_classes": 20, "backbone": "mobilenetv2"},
        5_856_020,
    ),
    "deeplabv3": (deeplabv3plus.build_deeplabv3, {"num_classes": 20}, 39_131_028),
    "deeplabv3_r101": (
        deeplabv3plus.build_deeplabv3,
        {"num_classes": 20, "backbone": "resnet101"},
        58_201_492,
    ),
    "unet_mobilenetv2": (unet_mobilenetv2.build_unet_mobilenetv2, {"num_classes": 3}, 6_504_227),
}


@pytest.fixture(autouse=True)
def fresh_session():
    yield
    keras.backend.clear_session()


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_parameter_count(name):
    builder, kwargs, expected = FULL_SIZE[name]
    model = builder(input_shape=[None, None, 3], backbone_weights=None, **kwargs)
    assert model.count_params() == expected
    if name == "unet_mobilenetv2":  # the tutorial trains only the decoder
        assert trainable_count(model) == 4_660_323
    if name == "deeplabv3plus":
        assert trainable_count(model) == 11_824_500


def test_classic_unet_has_the_paper_widths():
    model = unet.build_unet(2, [None, None, 3], base_filters=64, depth=5, batch_norm=False)
    assert model.count_params() == 31_031_810
    widths = [model.get_layer(f"encoder{i}_conv2").filters for i in range(1, 5)]
    assert widths + [model.get_layer("bottleneck_conv2").filters] == [64, 128, 256, 512, 1024]


def test_fcn_imagenet_classifier_becomes_fc6_fc7(monkeypatch):
    """fc6 / fc7 are VGG16's fc1 / fc2 reshaped: same outputs where fc6 sees all of pool5."""
    loaded = []
    real_application = backbones.application

    def random_imagenet(backbone, input_shape, weights, include_top=False, **kwargs):
        if not include_top:  # the no-top feature extractor, built with weights=None
            return real_application(backbone, input_shape, weights, **kwargs)
        # Stands in for the ImageNet file (no network here): random weights, same structure.
        assert (backbone, weights) == ("vgg16", "imagenet")
        loaded.append(real_application(backbone, input_shape, None, include_top=True, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(backbones, "application", random_imagenet)
    model = fcn.build_fcn32s(21, [224, 224, 3], backbone_weights="imagenet")
    (vgg,) = loaded
    for layer_name in ("block1_conv1", "block5_conv3"):
        np.testing.assert_array_equal(
            model.get_layer("vgg16").get_layer(layer_name).get_weights()[0],
            vgg.get_layer(layer_name).get_weights()[0],
        )

    image = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    fc_outputs = keras.Model(vgg.input, [vgg.get_layer("fc1").output, vgg.get_layer("fc2").output])
    fc1, fc2 = (
        keras.ops.convert_to_numpy(t)
        for t in fc_outputs(keras.applications.vgg16.preprocess_input(image.copy()))
    )
    conv_outputs = keras.Model(
        model.input, [model.get_layer("fc6").output, model.get_layer("fc7").output]
    )
    fc6, fc7 = (keras.ops.convert_to_numpy(t) for t in conv_outputs(image))
    # pool5 is 7x7 for a 224 px image: fc6 at the centre cell sees exactly what fc1 sees.
    np.testing.assert_allclose(fc6[0, 3, 3], fc1[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fc7[0, 3, 3], fc2[0], rtol=1e-4, atol=1e-4)
