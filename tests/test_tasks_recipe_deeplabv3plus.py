"""The DeepLabV3+ recipes against their sources.

`cihp_deeplabv3plus` is the keras-io example "Multiclass semantic segmentation using DeepLabV3+"
(keras-team/keras-io examples/vision/deeplabv3_plus.py, commit 1152d883930e; seed
001_1dfc365e7d3d21e1.txt). Every expected number below is copied from that source: its code
(IMAGE_SIZE = 512, BATCH_SIZE = 4, NUM_CLASSES = 20, Adam(learning_rate=0.001), epochs=25,
SparseCategoricalCrossentropy(from_logits=True), no flip) and the `model.summary()` printed in
examples/vision/md/deeplabv3_plus.md (commit 0a4be8bbc3ae), whose rows are quoted in KERAS_IO.

`voc_deeplabv3plus` is mmsegmentation v0.x's
configs/deeplabv3plus/deeplabv3plus_r50-d8_512x512_20k_voc12aug.py: SGD lr 0.01, momentum 0.9,
weight_decay 0.0005, poly power 0.9, 20k iterations, 4 GPUs x 4 images, crop 512x512,
ratio_range (0.5, 2.0), RandomFlip 0.5, `Pad(pad_val=0, seg_pad_val=255)` after `Normalize`.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hydra.utils import instantiate

from seg_train.models import deeplabv3plus
from tests.helpers import compose_config, trainable_count

# keras-io's model.summary() for IMAGE_SIZE 512, NUM_CLASSES 20 (the md file's table).
KERAS_IO_TOTAL_PARAMS = 11_857_236
KERAS_IO_TRAINABLE_PARAMS = 11_824_500
# Output shapes of the two backbone layers the head reads:
# "conv4_block6_2_relu (Activation (None, 32, 32, 256)" and conv2_block3_2_relu, the input of
# "conv2d_6 (Conv2D) (None, 128, 128, 48) 3072" (3072 = 1 * 1 * 64 * 48: 64 channels).
DSPP_INPUT_SHAPE = (None, 32, 32, 256)
LOW_LEVEL_SHAPE = (None, 128, 128, 64)
# Our layer -> the parameter count of keras-io's corresponding summary row.
KERAS_IO_LAYER_PARAMS = {
    "aspp_pool_conv": 65_792,  # conv2d: 1x1, 256 -> 256, with bias
    "aspp_conv_1": 65_536,  # conv2d_1: 1x1, no bias
    "aspp_conv_2": 589_824,  # conv2d_2: 3x3 rate 6
    "aspp_conv_3": 589_824,  # conv2d_3: 3x3 rate 12
    "aspp_conv_4": 589_824,  # conv2d_4: 3x3 rate 18
    "aspp_project": 327_680,  # conv2d_5: 1x1, 1280 -> 256
    "decoder_low_level_conv": 3_072,  # conv2d_6: 1x1, 64 -> 48
    "decoder_conv_1": 700_416,  # conv2d_7: 3x3, 304 -> 256
    "decoder_conv_2": 589_824,  # conv2d_8: 3x3, 256 -> 256
    "logits": 5_140,  # conv2d_9: 1x1, 256 -> 20, with bias
}
# keras.applications' caffe-mode ImageNet mean, as an RGB colour (imagenet_utils: BGR
# [103.939, 116.779, 123.68]).
CAFFE_MEAN_RGB = [123.68, 116.779, 103.939]


@pytest.fixture(scope="module")
def keras_io_model():
    """The model `experiment=cihp_deeplabv3plus` builds (random weights: no download)."""
    cfg = compose_config(
        ["experiment=cihp_deeplabv3plus", "data.root=/nonexistent", "model.backbone_weights=null"]
    )
    model = instantiate(cfg.model, _convert_="all")
    yield model
    keras.backend.clear_session()


def test_keras_io_model_has_the_example_summary_counts(keras_io_model):
    assert keras_io_model.count_params() == KERAS_IO_TOTAL_PARAMS
    assert trainable_count(keras_io_model) == KERAS_IO_TRAINABLE_PARAMS
    assert keras_io_model.output_shape == (None, 512, 512, 20)
    for layer, params in KERAS_IO_LAYER_PARAMS.items():
        assert keras_io_model.get_layer(layer).count_params() == params, layer


def test_keras_io_model_reads_conv4_block6_and_conv2_block3(keras_io_model):
    assert tuple(keras_io_model.get_layer("aspp_conv_1").input.shape) == DSPP_INPUT_SHAPE
    assert tuple(keras_io_model.get_layer("aspp_pool").input.shape) == DSPP_INPUT_SHAPE
    low_level = keras_io_model.get_layer("decoder_low_level_conv").input
    assert tuple(low_level.shape) == LOW_LEVEL_SHAPE
    backbone = keras_io_model.get_layer("resnet50")
    names = [layer.name for layer in backbone.layers]
    # The backbone stops at conv4_block6_2_relu: nothing after it, no conv5 at all.
    assert names[-1] == "conv4_block6_2_relu"
    assert "conv2_block3_2_relu" in names
    assert not [name for name in names if name.startswith("conv5")]
    # keras-io's head has no dropout.
    assert not [layer for layer in keras_io_model.layers if isinstance(layer, keras.layers.Dropout)]


def test_keras_io_model_normalises_as_resnet50_preprocess_input(keras_io_model):
    """keras-io feeds resnet50.preprocess_input(image): our model does it in its first layer."""
    image = np.random.default_rng(0).uniform(0, 255, (1, 512, 512, 3)).astype("float32")
    first = keras.Model(keras_io_model.input, keras_io_model.get_layer("preprocess").output)
    expected = keras.applications.resnet50.preprocess_input(image.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first(image)), expected, atol=1e-4)


def test_keras_io_model_takes_other_input_sizes():
    """No size is baked in (keras-io's pool size and upsampling factors assume 512)."""
    model = deeplabv3plus.build_deeplabv3plus(
        20, [None, None, 3], aspp_filters=8, decoder_filters=8, backbone_weights=None
    )
    for height, width in [(67, 45), (96, 128)]:
        image = np.zeros((1, height, width, 3), "float32")
        logits = keras.ops.convert_to_numpy(model(image, training=False))
        assert logits.shape == (1, height, width, 20)
        assert logits.dtype == np.float32 and np.isfinite(logits).all()
    keras.backend.clear_session()


@pytest.mark.slow  # cloning ResNet-50 into its atrous form takes ~20 s on a shared CPU
def test_atrous_variant_reads_the_dilated_conv5_at_output_stride_16():
    """The paper's form: conv5 kept (dilated), 2048 channels at 1/16, dropout after ASPP."""
    model = deeplabv3plus.build_deeplabv3plus_atrous(
        21, [64, 64, 3], aspp_filters=8, decoder_filters=8, backbone_weights=None
    )
    # 64 px / 16 = 4; ResNet-50's conv5 has 2048 channels.
    assert tuple(model.get_layer("aspp_conv_1").input.shape) == (None, 4, 4, 2048)
    assert model.get_layer("aspp_dropout").rate == 0.1
    assert model.output_shape == (None, 64, 64, 21)
    keras.backend.clear_session()


def test_cihp_recipe_has_keras_io_training_values():
    cfg = compose_config(["experiment=cihp_deeplabv3plus", "data.root=/nonexistent"])
    assert cfg.model._target_ == "seg_train.models.deeplabv3plus.build_deeplabv3plus"
    assert cfg.model.backbone == "resnet50"
    assert list(cfg.model.aspp_rates) == [6, 12, 18]
    assert (cfg.model.low_level_filters, cfg.model.decoder_filters) == (48, 256)
    assert cfg.data.num_classes == 20
    # read_image: tf_image.resize(..., size=[IMAGE_SIZE, IMAGE_SIZE]); no flip, no crop.
    assert cfg.data.transform == "resize"
    assert list(cfg.data.crop_size) == [512, 512]
    assert cfg.data.hflip is False
    assert cfg.data.batch_size == 4
    # keras.optimizers.Adam(learning_rate=0.001) with Keras' default betas and epsilon.
    assert cfg.optimizer.inner._target_ == "keras.optimizers.Adam"
    assert cfg.optimizer.learning_rate == 1e-3
    assert (cfg.optimizer.inner.beta_1, cfg.optimizer.inner.beta_2) == (0.9, 0.999)
    assert cfg.optimizer.inner.epsilon == 1e-7
    assert cfg.optimizer.schedule is None
    assert cfg.optimizer.weight_decay == 0
    assert cfg.trainer.epochs == 25
    # SparseCategoricalCrossentropy(from_logits=True) = our `ce` loss.
    assert cfg.loss._target_ == "seg_train.training.losses.CrossEntropy"
    assert cfg.loss.class_weights is None


def test_voc_recipe_has_mmsegmentation_values():
    cfg = compose_config(["experiment=voc_deeplabv3plus", "data.root=/nonexistent"])
    assert cfg.model._target_ == "seg_train.models.deeplabv3plus.build_deeplabv3plus_atrous"
    assert cfg.model.backbone == "resnet50"
    assert cfg.model.output_stride == 16
    assert cfg.optimizer.inner._target_ == "keras.optimizers.SGD"
    assert cfg.optimizer.inner.momentum == 0.9
    assert cfg.optimizer.learning_rate == 0.01
    assert cfg.optimizer.schedule._target_ == "seg_train.training.optim.PolyDecay"
    assert cfg.optimizer.schedule.power == 0.9
    assert cfg.optimizer.weight_decay == 5e-4
    # One learning rate for every layer (no paramwise_cfg in the mmsegmentation config).
    assert list(cfg.optimizer.param_groups) == []
    assert cfg.data.batch_size == 4 * 4
    assert cfg.data.transform == "crop"
    assert list(cfg.data.crop_size) == [512, 512]
    assert list(cfg.data.scale_range) == [0.5, 2.0]
    assert cfg.data.hflip is True
    assert cfg.data.ignore_label == 255  # seg_pad_val
    assert cfg.trainer.epochs * cfg.trainer.steps_per_epoch == 20_000
    assert cfg.loss._target_ == "seg_train.training.losses.CrossEntropy"


def test_voc_recipe_pads_with_zero_after_normalisation():
    """mmsegmentation pads with 0 after Normalize: the colour our caffe normalisation zeroes."""
    cfg = compose_config(["experiment=voc_deeplabv3plus", "data.root=/nonexistent"])
    pad = np.array([[list(cfg.data.pad_value)]], "float32")
    np.testing.assert_allclose(pad[0, 0], CAFFE_MEAN_RGB)
    normalised = keras.applications.resnet50.preprocess_input(pad.copy())
    np.testing.assert_allclose(normalised, 0, atol=1e-4)
