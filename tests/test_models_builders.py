"""Model builders: shapes, dtypes, reloading, bilinear upsampling, atrous backbones, configs.

Every model is built small (64 px inputs, narrow heads, MobileNetV2 at alpha 0.35) with
`backbone_weights=None`, since ImageNet weights cannot be downloaded here; full-size parameter
counts are in test_models_full_size.py.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from skimage.transform import rescale

from seg_train.errors import UserError
from seg_train.models import backbones, deeplabv2, deeplabv3plus, fcn, unet, unet_mobilenetv2
from seg_train.models.layers import BilinearUpsampling, bilinear_kernel
from seg_train.training import losses

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODEL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
SIZE = 64
NUM_CLASSES = 3
TINY_MNV2 = {"backbone": "mobilenetv2", "backbone_alpha": 0.35, "aspp_filters": 16}
# name -> (builder, small-size keyword arguments)
MODELS = {
    "fcn32s": (fcn.build_fcn32s, {"fc_filters": 16}),
    "fcn16s": (fcn.build_fcn16s, {"fc_filters": 16}),
    "fcn8s": (fcn.build_fcn8s, {"fc_filters": 16}),
    # ResNet-50 keeps the tests fast; ResNet-101 (the default) is built in the 321 px test.
    "deeplabv2_r50": (deeplabv2.build_deeplabv2, {"backbone": "resnet50", "freeze_bn": True}),
    "deeplabv2_msc_mnv2": (
        deeplabv2.build_deeplabv2,
        {"backbone": "mobilenetv2", "backbone_alpha": 0.35, "msc_scales": [1.0, 0.75, 0.5]},
    ),
    "deeplabv3_mnv2": (deeplabv3plus.build_deeplabv3, TINY_MNV2),
    "deeplabv3plus_atrous_r50_os8": (
        deeplabv3plus.build_deeplabv3plus_atrous,
        {"output_stride": 8, "aspp_filters": 16, "decoder_filters": 16},
    ),
    "deeplabv3plus_mnv2": (deeplabv3plus.build_deeplabv3plus, {**TINY_MNV2, "decoder_filters": 16}),
    "unet_mobilenetv2": (
        unet_mobilenetv2.build_unet_mobilenetv2,
        {"alpha": 0.35, "decoder_filters": [32, 16, 16, 8]},
    ),
    "unet": (unet.build_unet, {"base_filters": 4, "depth": 3}),
    # Seed 003's variant: no BatchNorm, 3x3 up-conv + ReLU, 0..1 inputs, PyTorch init.
    "unet_seed003": (
        unet.build_unet,
        {
            "base_filters": 4,
            "depth": 3,
            "batch_norm": False,
            "up_conv": "transpose3x3_relu",
            "input_scaling": "unit",
            "initializer": "pytorch",
        },
    ),
}


def build(name: str, input_shape=(SIZE, SIZE, 3), **overrides) -> keras.Model:
    builder, kwargs = MODELS[name]
    if builder is not unet.build_unet:
        kwargs = {**kwargs, "backbone_weights": None}
    return builder(NUM_CLASSES, input_shape, **{**kwargs, **overrides})


def images(batch: int = 2, height: int = SIZE, width: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype("float32")


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Inference-mode logits from an eager call (tracing `model.predict` costs seconds)."""
    return keras.ops.convert_to_numpy(model(x, training=False))


@pytest.fixture(autouse=True)
def fresh_session():
    yield
    keras.backend.clear_session()


@pytest.fixture
def mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("name", MODELS)
def test_logits_shape_dtype_and_keras_reload(name, tmp_path):
    model = build(name)
    x = images()
    logits = predict(model, x)
    assert logits.shape == (2, SIZE, SIZE, NUM_CLASSES)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()

    path = tmp_path / f"{name}.keras"
    model.save(path)
    # Safe mode: only registered classes are rebuilt (what checkpoints.load_model does).
    reloaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    np.testing.assert_array_equal(predict(reloaded, x), logits)
    if name == "deeplabv2_msc_mnv2":  # a resumed run needs the MSC training view again
        assert "scale_050" in deeplabv2.msc_training_model(reloaded).output


@pytest.mark.parametrize("name", MODELS)
def test_float32_logits_under_mixed_precision(name, mixed_precision):
    model = build(name)
    assert model.get_layer("logits_float32").compute_dtype == "float32"
    logits = predict(model, images(1))
    assert logits.shape == (1, SIZE, SIZE, NUM_CLASSES)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("fcn8s", [(64, 96), (96, 64)]),
        ("deeplabv3plus_mnv2", [(67, 45), (96, 128)]),
        ("deeplabv2_msc_mnv2", [(57, 75)]),
        ("unet_mobilenetv2", [(64, 96)]),
    ],
)
def test_any_input_size(name, sizes):
    model = build(name, input_shape=[None, None, 3])
    for height, width in sizes:
        logits = model.predict(images(1, height, width), verbose=0)
        assert logits.shape == (1, height, width, NUM_CLASSES)


@pytest.mark.parametrize(
    ("name", "size", "hint"),
    [
        ("fcn32s", 100, "divisible by 32"),
        ("unet_mobilenetv2", 80, "divisible by 32"),
        ("deeplabv3plus_mnv2", 16, "at least 32"),
        ("deeplabv2_r50", 24, "at least 32"),
    ],
)
def test_unusable_input_size_is_a_user_error(name, size, hint):
    with pytest.raises(UserError, match=hint) as error:
        build(name, input_shape=[size, size, 3])
    assert "data.crop_size" in str(error.value)


@pytest.mark.parametrize("factor", range(2, 10))
def test_bilinear_transposed_conv_equals_skimage_rescale(factor):
    channels = 2
    layer = keras.layers.Conv2DTranspose(
        channels,
        2 * factor - factor % 2,
        strides=factor,
        padding="same",
        use_bias=False,
        kernel_initializer=BilinearUpsampling(),
    )
    # Values outside [0, 1] check the borders too (hence clip=False for skimage).
    x = np.random.default_rng(factor).normal(0, 3, (1, 5, 7, channels)).astype("float32")
    upsampled = keras.ops.convert_to_numpy(layer(x))[0]
    expected = rescale(x[0], factor, order=1, mode="constant", cval=0, clip=False, channel_axis=-1)
    assert upsampled.shape == expected.shape
    assert np.allclose(upsampled, expected, atol=1e-5)


def test_fcn_upsampling_layers_start_bilinear_and_train():
    model = build("fcn8s")
    for layer_name, size in [("upscore_pool4", 4), ("upscore_pool3", 4), ("upscore8", 16)]:
        layer = model.get_layer(layer_name)
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        assert layer.trainable and layer.strides == (size // 2,) * 2
        np.testing.assert_array_equal(kernel[:, :, 1, 1], bilinear_kernel(size))
        assert not kernel[:, :, 0, 1].any()  # nothing leaks across classes


def test_deeplabv2_321_input_gives_41x41_score_map():
    model = deeplabv2.build_deeplabv2(21, [321, 321, 3], backbone_weights=None)
    assert model.get_layer("aspp_sum").output.shape == (None, 41, 41, 21)
    assert model.output_shape == (None, 321, 321, 21)
    # The MSC inputs follow DrSleep's train_msc.py, int(321 * 0.75) = 240, int(321 * 0.5) = 160.
    layer = deeplabv2.ResizeByScale(0.75)
    assert layer.compute_output_shape((None, 321, 321, 3)) == (None, 240, 240, 3)
    assert deeplabv2.ResizeByScale(0.5).compute_output_shape((None, 321, 321, 3))[1] == 160
    assert tuple(layer(np.zeros((1, 321, 321, 3), "float32")).shape) == (1, 240, 240, 3)


def test_deeplabv2_msc_training_model_shares_weights():
    size = 32  # the 0.5 scale runs the network on 16 px: fine for a dynamic-size network
    model = build("deeplabv2_msc_mnv2", input_shape=(size, size, 3))
    train_model = deeplabv2.msc_training_model(model)
    assert list(train_model.output) == [
        "fused",
        "fused_scores",
        "scale_100",
        "scale_075",
        "scale_050",
    ]
    x = images(2, size, size)
    labels = np.random.default_rng(1).integers(0, NUM_CLASSES, (2, size, size))
    # Eager calls and an eager fit: tracing three MobileNetV2 copies would dominate the test.
    outputs = {k: keras.ops.convert_to_numpy(v) for k, v in train_model(x).items()}
    np.testing.assert_allclose(outputs["fused"], keras.ops.convert_to_numpy(model(x)), atol=1e-5)
    # The max-fused score map bounds the full-scale map it shares its size with.
    assert np.all(outputs["fused_scores"] >= outputs["scale_100"] - 1e-5)

    aspp = model.get_layer("scale_net").get_layer("aspp_conv_1")
    aspp_before = keras.ops.convert_to_numpy(aspp.kernel).copy()
    # The seg_train loss shrinks the labels to each score map (Keras' would not).
    loss = losses.CrossEntropy()
    train_model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss={key: None if key == "fused" else loss for key in train_model.output},
        run_eagerly=True,
    )
    history = train_model.fit(x, {key: labels for key in train_model.output}, verbose=0)
    assert {"fused_scores_loss", "scale_050_loss"} <= set(history.history)
    # Training the view trains `model`: they share their weights.
    assert not np.array_equal(keras.ops.convert_to_numpy(aspp.kernel), aspp_before)
    with pytest.raises(ValueError, match="msc_scales"):
        deeplabv2.msc_training_model(build("deeplabv3plus_mnv2"))


def test_msc_scales_must_include_full_scale():
    with pytest.raises(UserError, match="model.msc_scales"):
        build("deeplabv2_msc_mnv2", msc_scales=[0.75, 0.5])


def test_freeze_bn_fixes_statistics_and_affine_parameters():
    model = build("deeplabv3plus_mnv2", freeze_bn=True)
    norms = [
        layer
        for layer in backbones._all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert norms and not any(layer.trainable for layer in norms)
    before = [keras.ops.convert_to_numpy(w).copy() for layer in norms for w in layer.weights]
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )
    model.fit(images(2), np.zeros((2, SIZE, SIZE)), verbose=0)
    after = [keras.ops.convert_to_numpy(w) for layer in norms for w in layer.weights]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new, old)


def test_unet_mobilenetv2_freezes_the_encoder_by_default():
    model = build("unet_mobilenetv2")
    encoder = model.get_layer("encoder")
    assert not encoder.trainable and encoder.trainable_weights == []
    assert model.trainable_weights  # the decoder trains
    assert build("unet_mobilenetv2", freeze_encoder=False).get_layer("encoder").trainable


def assert_same_weights(plain: keras.Model, atrous: keras.Model) -> None:
    checked = 0
    for layer in plain.layers:
        if not layer.weights:
            continue
        twin = atrous.get_layer(layer.name)
        for weight, twin_weight in zip(layer.weights, twin.weights, strict=True):
            assert weight.shape == twin_weight.shape
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(twin_weight), keras.ops.convert_to_numpy(weight)
            )
            checked += 1
    assert checked == len(plain.weights) > 0


def assert_configs(model: keras.Model, changes: dict[str, dict]) -> None:
    for layer_name, expected in changes.items():
        config = model.get_layer(layer_name).get_config()
        for key, value in expected.items():
            assert tuple(config[key]) == value, (layer_name, key)


def test_atrous_resnet_keeps_kernel_shapes_and_weights():
    plain = backbones.application("resnet50", (SIZE, SIZE, 3), None)
    atrous = backbones.make_atrous(plain, "resnet50", output_stride=8)
    x = images(1)
    assert plain(x).shape[1] == SIZE // 32 and atrous(x).shape[1] == SIZE // 8
    assert_same_weights(plain, atrous)
    assert_configs(
        atrous,
        {
            "conv4_block1_0_conv": {"strides": (1, 1)},
            "conv4_block1_1_conv": {"strides": (1, 1)},
            "conv4_block6_2_conv": {"dilation_rate": (2, 2)},
            "conv5_block1_1_conv": {"strides": (1, 1)},
            "conv5_block3_2_conv": {"dilation_rate": (4, 4)},
            "conv3_block1_1_conv": {"strides": (2, 2)},
        },
    )
    os16 = backbones.make_atrous(plain, "resnet50", output_stride=16)
    assert os16(x).shape[1] == SIZE // 16
    assert_configs(
        os16,
        {
            "conv4_block1_1_conv": {"strides": (2, 2)},
            "conv5_block2_2_conv": {"dilation_rate": (2, 2)},
        },
    )


def test_atrous_backbone_loads_a_weights_file(tmp_path):
    # A weights file written by the plain network stands in for the ImageNet file.
    plain_file = tmp_path / "mobilenetv2.weights.h5"
    shape = (SIZE, SIZE, 3)
    backbones.application("mobilenetv2", shape, None, alpha=0.35).save_weights(plain_file)
    plain = backbones.build_backbone("mobilenetv2", shape, str(plain_file), ["P5"], alpha=0.35)
    atrous = backbones.build_backbone(
        "mobilenetv2", shape, str(plain_file), ["P5"], output_stride=8, alpha=0.35
    )
    x = images(1)
    assert plain(x)["P5"].shape[1] == SIZE // 32 and atrous(x)["P5"].shape[1] == SIZE // 8
    assert_same_weights(plain, atrous)
    assert_configs(
        atrous,
        {
            "block_6_depthwise": {"strides": (1, 1), "dilation_rate": (1, 1)},
            "block_12_depthwise": {"dilation_rate": (2, 2)},
            "block_13_depthwise": {"strides": (1, 1), "dilation_rate": (2, 2)},
            "block_16_depthwise": {"dilation_rate": (4, 4)},
        },
    )


@pytest.fixture
def offline_keras(monkeypatch, tmp_path):
    """Keras' weight cache in tmp_path and a download that fails as it does without network."""
    import keras.src.backend.config as keras_config
    import keras.src.utils.file_utils as file_utils

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    return tmp_path / "models"


@pytest.mark.parametrize(
    ("build_offline", "file"),
    [
        (
            lambda: build("deeplabv3plus_mnv2", backbone_weights="imagenet"),
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5",
        ),
        (
            lambda: fcn.build_fcn32s(NUM_CLASSES, [SIZE, SIZE, 3]),
            "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        ),
    ],
)
def test_offline_imagenet_weights_fail_with_one_line(build_offline, file, offline_keras):
    with pytest.raises(UserError) as error:
        build_offline()
    message = str(error.value)
    assert "\n" not in message
    assert f"as {offline_keras / file}," in message
    assert "model.backbone_weights=null" in message


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model.backbone_weights"):
        build("unet_mobilenetv2", backbone_weights=str(tmp_path / "missing.h5"))


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_model_config_composes_and_instantiates(config):
    overrides = [f"model={config}", "data.crop_size=[64,64]", "model.backbone_weights=null"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, keras.Model)
    assert model.name == cfg.model.name
    assert model.output_shape == (None, 64, 64, cfg.data.num_classes)
