"""The U-Net recipes against their sources: seed 003 (PyTorch portrait U-Net) and seed 004 (the
TensorFlow segmentation tutorial's MobileNetV2 U-Net).

Every expected value here is read off the seed texts in ../shared/seeds/ (or computed by hand
from their code, written out below), never from our builders or configs.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hydra.utils import instantiate

from seg_train.models import unet
from tests.helpers import compose_config, trainable_count


@pytest.fixture(autouse=True)
def fresh_session():
    yield
    keras.backend.clear_session()


# ---------------------------------------------------------------------------------------------
# Seed 003: PyTorch U-Net on the portrait matting set.

# The seed's values: BATCH_SIZE = 8, transforms.Resize((256, 256)) + ToTensor() (no
# augmentation), Adam(lr=0.001), StepLR(step_size=7, gamma=0.1) stepped once per epoch,
# epochs = 10, CrossEntropyLoss, nn.Conv2d(64, 2, kernel_size=1) -> 2 classes.
SEED_003 = {
    "batch": 8,
    "size": 256,
    "lr": 0.001,
    "step_size": 7,
    "gamma": 0.1,
    "epochs": 10,
    "classes": 2,
}


def conv(k: int, cin: int, cout: int) -> int:
    """nn.Conv2d / nn.ConvTranspose2d parameters: k*k*cin*cout weights + cout biases."""
    return k * k * cin * cout + cout


def downsample(cin: int, cout: int) -> int:
    """The seed's Downsample: two 3x3 convs (cin->cout, cout->cout), ReLU, max-pool."""
    return conv(3, cin, cout) + conv(3, cout, cout)


def upsample(c: int) -> int:
    """The seed's Upsample(c): 3x3 convs 2c->c and c->c, then ConvTranspose2d(c, c // 2, 3)."""
    return conv(3, 2 * c, c) + conv(3, c, c) + conv(3, c, c // 2)


# Net(): down1..down5, up = ConvTranspose2d(1024, 512, 3), up1..up3, conv_2, last.
SEED_003_LAYERS = [
    downsample(3, 64),  # 1,792 + 36,928 = 38,720
    downsample(64, 128),  # 73,856 + 147,584 = 221,440
    downsample(128, 256),  # 295,168 + 590,080 = 885,248
    downsample(256, 512),  # 1,180,160 + 2,359,808 = 3,539,968
    downsample(512, 1024),  # 4,719,616 + 9,438,208 = 14,157,824
    conv(3, 1024, 512),  # self.up: 4,719,104
    upsample(512),  # 4,719,104 + 2,359,808 + 1,179,904 = 8,258,816
    upsample(256),  # 1,179,904 + 590,080 + 295,040 = 2,065,024
    upsample(128),  # 295,040 + 147,584 + 73,792 = 516,416
    downsample(128, 64),  # conv_2: 73,792 + 36,928 = 110,720
    conv(1, 64, 2),  # last: 130
]
SEED_003_PARAMS = 34_513_410  # the sum above, added up by hand


def portrait_cfg(*overrides: str):
    return compose_config(["experiment=portrait_unet", "data.root=/nonexistent", *overrides])


def test_seed_003_parameter_arithmetic_adds_up():
    assert sum(SEED_003_LAYERS) == SEED_003_PARAMS


def test_portrait_unet_builds_seed_003s_network():
    cfg = portrait_cfg()
    model = instantiate(cfg.model, _convert_="all")
    assert model.count_params() == SEED_003_PARAMS
    assert trainable_count(model) == SEED_003_PARAMS  # no BatchNorm statistics, nothing frozen
    assert not [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    # The shapes the seed's forward() comments give for a 256x256 input ([B, C, H, W] there).
    expected = {
        "decoder4_concat": (32, 32, 1024),  # torch.cat([x4, x5]): 32*32*1024
        "decoder3_upconv_relu": (64, 64, 256),  # up1: 64*64*256
        "decoder3_concat": (64, 64, 512),
        "decoder2_upconv_relu": (128, 128, 128),  # up2: 128*128*128
        "decoder2_concat": (128, 128, 256),
        "decoder1_upconv_relu": (256, 256, 64),  # up3: 256*256*64
        "decoder1_concat": (256, 256, 128),
        "decoder1_relu2": (256, 256, 64),  # conv_2
        "logits_float32": (256, 256, SEED_003["classes"]),  # last: 2 values per pixel
    }
    for name, shape in expected.items():
        assert tuple(model.get_layer(name).output.shape[1:]) == shape, name
    # ConvTranspose2d(1024, 512, 3) holds a [1024, 512, 3, 3] weight; Keras stores it transposed.
    assert tuple(model.get_layer("decoder4_upconv").kernel.shape) == (3, 3, 512, 1024)
    assert tuple(model.get_layer("decoder4_upconv").bias.shape) == (512,)


def test_portrait_unet_takes_images_to_0_1_as_to_tensor_does():
    cfg = portrait_cfg("data.crop_size=[32,32]", "model.base_filters=2")
    normalize = instantiate(cfg.model, _convert_="all").get_layer("normalize")
    out = keras.ops.convert_to_numpy(normalize(np.array([[[[0.0, 127.5, 255.0]]]], np.float32)))
    np.testing.assert_allclose(out, [[[[0.0, 0.5, 1.0]]]], atol=1e-7)


def torch_conv_transpose(x, weight, bias, stride=2, padding=1, output_padding=1):
    """PyTorch's ConvTranspose2d written from its definition, for one image [H, W, Cin].

    Input pixel i reaches output pixel o = stride * i + k - padding through kernel tap k, with
    weight [Cin, Cout, k, k] (PyTorch's layout); the output has
    (H - 1) * stride - 2 * padding + k + output_padding rows.
    """
    cin, cout, kh, kw = weight.shape
    height, width = x.shape[:2]
    out_h = (height - 1) * stride - 2 * padding + kh + output_padding
    out_w = (width - 1) * stride - 2 * padding + kw + output_padding
    out = np.tile(bias, (out_h, out_w, 1)).astype(np.float64)
    for i in range(height):
        for j in range(width):
            for ky in range(kh):
                for kx in range(kw):
                    oy, ox = stride * i + ky - padding, stride * j + kx - padding
                    if 0 <= oy < out_h and 0 <= ox < out_w:
                        out[oy, ox] += x[i, j] @ weight[:, :, ky, kx]
    return out


def test_3x3_up_conv_is_pytorchs_conv_transpose_pixel_for_pixel():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    inputs = keras.Input((None, None, 5))
    up = keras.Model(inputs, unet.upsample(inputs, 6, "transpose3x3_relu", "up"))
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in up.get_layer("up_upconv").weights)
    torch_weight = kernel.transpose(3, 2, 0, 1)  # Keras [k, k, Cout, Cin] -> [Cin, Cout, k, k]
    expected = np.maximum(torch_conv_transpose(x, torch_weight, bias), 0.0)  # + nn.ReLU
    assert expected.shape == (6, 8, 6)
    got = keras.ops.convert_to_numpy(up(x[None]))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_pytorch_initializer_bounds():
    """PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases."""
    model = unet.build_unet(
        2,
        (16, 16, 3),
        base_filters=8,
        depth=2,
        batch_norm=False,
        up_conv="transpose3x3_relu",
        initializer="pytorch",
    )
    # fan_in: Conv2d 3*3*Cin; ConvTranspose2d 3*3*Cout (PyTorch reads weight.size(1) = Cout).
    for name, fan_in in (
        ("encoder1_conv1", 27),
        ("bottleneck_conv2", 144),
        ("decoder1_upconv", 72),
        ("logits", 8),
    ):
        bound = 1 / np.sqrt(fan_in)
        for weight in model.get_layer(name).weights:
            values = keras.ops.convert_to_numpy(weight)
            assert np.abs(values).max() <= bound, name
            if values.size >= 64:  # spread over the whole range, not a narrower one
                assert np.abs(values).max() > 0.8 * bound, name


def test_portrait_unet_recipe_values_are_seed_003s():
    cfg = portrait_cfg()
    data = cfg.data
    assert data.transform == "resize"
    assert list(data.crop_size) == [SEED_003["size"]] * 2
    assert data.batch_size == SEED_003["batch"]
    assert (data.hflip, list(data.scale_range)) == (False, [1.0, 1.0])
    assert all(value == 0 for value in data.jitter.values())
    assert data.matte_threshold == 0  # the seed's anno_tensor[anno_tensor > 0] = 1
    assert data.num_classes == SEED_003["classes"]
    assert cfg.model.base_filters == 64 and cfg.model.depth == 5  # Downsample(3, 64)..(512, 1024)
    assert (cfg.model.batch_norm, cfg.model.dropout) == (False, 0.0)
    assert (cfg.model.input_scaling, cfg.model.up_conv) == ("unit", "transpose3x3_relu")
    assert cfg.trainer.epochs == SEED_003["epochs"]
    assert (
        cfg.loss._target_ == "seg_train.training.losses.CrossEntropy"
        and cfg.loss.class_weights is None
    )

    steps = 1700 // SEED_003["batch"]
    optimizer = instantiate(
        cfg.optimizer, total_steps=SEED_003["epochs"] * steps, steps_per_epoch=steps
    )
    assert isinstance(optimizer, keras.optimizers.Adam)
    # torch.optim.Adam defaults: betas (0.9, 0.999), eps 1e-8.
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (0.9, 0.999, 1e-8)
    schedule = optimizer._learning_rate
    # StepLR(step_size=7, gamma=0.1): lr 1e-3 in epochs 0..6, 1e-4 in epochs 7..9.
    for epoch, lr in ((0, 1e-3), (6, 1e-3), (7, 1e-4), (9, 1e-4)):
        for step in (epoch * steps, (epoch + 1) * steps - 1):
            np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)


def test_default_unet_keeps_the_paper_up_conv_and_symmetric_inputs():
    """The default job's narrow U-Net is what it was: 2x2 up-convs, BatchNorm, -1..1 inputs."""
    cfg = compose_config(["data.crop_size=[32,32]"])
    model = instantiate(cfg.model, _convert_="all")
    assert tuple(model.get_layer("decoder1_upconv").kernel.shape) == (2, 2, 16, 32)
    assert isinstance(model.get_layer("encoder1_bn1"), keras.layers.BatchNormalization)
    out = model.get_layer("normalize")(np.array([[[[0.0, 255.0, 0.0]]]], np.float32))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), [[[[-1.0, 1.0, -1.0]]]])


def test_unet_rejects_unknown_options_with_the_key():
    from seg_train.errors import UserError

    for key, value in (
        ("up_conv", "bilinear"),
        ("input_scaling", "imagenet"),
        ("initializer", "xavier"),
    ):
        with pytest.raises(UserError, match=f"model.{key}"):
            unet.build_unet(2, (16, 16, 3), base_filters=2, depth=2, **{key: value})


# ---------------------------------------------------------------------------------------------
# Seed 004: the TensorFlow segmentation tutorial (MobileNetV2 U-Net on Oxford-IIIT Pet).

# The tutorial's values: tf.image.resize(..., (128, 128)), flip if tf.random.uniform(()) > 0.5,
# BATCH_SIZE = 64, BUFFER_SIZE = 1000, STEPS_PER_EPOCH = TRAIN_LENGTH // BATCH_SIZE,
# EPOCHS = 20, optimizer='adam', SparseCategoricalCrossentropy(from_logits=True),
# OUTPUT_CHANNELS = 3, down_stack.trainable = False.
SEED_004 = {"size": 128, "batch": 64, "buffer": 1000, "epochs": 20, "classes": 3}
TRAIN_LENGTH = 3680  # TFDS oxford_iiit_pet:3 train split (annotations/trainval.txt)


def pets_cfg(*overrides: str):
    return compose_config(["experiment=pets_unet_mobilenetv2", *overrides])


def mobilenetv2_encoder_params() -> int:
    """keras.applications.MobileNetV2 (alpha 1) up to block_16_project, from the paper's table.

    Conv1 3x3 s2 3->32 (no bias) + BN; then inverted residual blocks (t, c, n): 1x1 expand to
    t*cin (skipped when t = 1) + BN, 3x3 depthwise + BN, 1x1 project to c + BN; every BN holds 4
    values per channel (gamma, beta, moving mean, moving variance). The tutorial's down_stack
    ends at block_16_project, so the last block's projection BN is not part of it.
    """

    def bn(channels):
        return 4 * channels

    total = 3 * 3 * 3 * 32 + bn(32)
    cin = 32
    for t, c, n in (
        (1, 16, 1),
        (6, 24, 2),
        (6, 32, 3),
        (6, 64, 4),
        (6, 96, 3),
        (6, 160, 3),
        (6, 320, 1),
    ):
        for _ in range(n):
            hidden = t * cin
            if t != 1:
                total += cin * hidden + bn(hidden)
            total += 9 * hidden + bn(hidden) + hidden * c + bn(c)
            cin = c
    return total - bn(320)


# The decoder: pix2pix.upsample(filters, 3) = Conv2DTranspose(3x3, no bias) + BatchNorm + ReLU,
# each concatenated with a tap; the taps have 6x the channels of the block before them:
# block_13_expand_relu 576, block_6 192, block_3 144, block_1 96 (block_16_project: 320).
DECODER = [
    (9 * 320 * 512, 4 * 512),  # 4x4 -> 8x8, then concat 576 -> 1088 channels
    (9 * 1088 * 256, 4 * 256),  # 8x8 -> 16x16, concat 192 -> 448
    (9 * 448 * 128, 4 * 128),  # 16x16 -> 32x32, concat 144 -> 272
    (9 * 272 * 64, 4 * 64),  # 32x32 -> 64x64, concat 96 -> 160
]
LAST = 9 * 160 * 3 + 3  # Conv2DTranspose(3, 3, strides=2, padding='same'), 64x64 -> 128x128


def test_tutorial_parameter_arithmetic():
    """The counts the issue quotes for the tutorial's model, recomputed from its layers.

    6,504,227 total / 4,660,323 trainable are not printed in seed 004 (it shows the model only
    as a plot_model PNG); these hand sums from the tutorial's layers reproduce them.
    """
    encoder = mobilenetv2_encoder_params()
    assert encoder == 1_841_984
    decoder = sum(conv + bn for conv, bn in DECODER) + LAST
    moving_stats = sum(bn // 2 for _, bn in DECODER)  # BN mean and variance never train
    assert encoder + decoder == 6_504_227
    assert decoder - moving_stats == 4_660_323  # the encoder is frozen


def test_pets_unet_builds_the_tutorial_model():
    cfg = pets_cfg("model.backbone_weights=null")
    model = instantiate(cfg.model, _convert_="all")
    assert model.count_params() == 6_504_227
    assert trainable_count(model) == 4_660_323
    assert tuple(model.output_shape) == (
        None,
        SEED_004["size"],
        SEED_004["size"],
        SEED_004["classes"],
    )
    encoder = model.get_layer("encoder")
    # The tutorial's layer_names comments (spatial size) and MobileNetV2's channels.
    taps = {
        "block_1_expand_relu": (64, 64, 96),
        "block_3_expand_relu": (32, 32, 144),
        "block_6_expand_relu": (16, 16, 192),
        "block_13_expand_relu": (8, 8, 576),
        "block_16_project": (4, 4, 320),
    }
    named = keras.Model(encoder.input, [encoder.get_layer(name).output for name in taps])
    image = np.random.default_rng(0).uniform(0, 1, (1, 128, 128, 3)).astype(np.float32)
    named_outputs = [keras.ops.convert_to_numpy(t) for t in named(image)]
    assert [t.shape[1:] for t in named_outputs] == list(taps.values())
    # What the decoder is fed are exactly these layers' outputs.
    fed = [keras.ops.convert_to_numpy(t) for t in encoder(image).values()]
    assert sorted(t.shape[1:] for t in fed) == sorted(taps.values())
    for tap in named_outputs:
        (same,) = [t for t in fed if t.shape == tap.shape]
        np.testing.assert_array_equal(same, tap)
    # up_stack comments: 4x4 -> 8x8 -> 16x16 -> 32x32 -> 64x64, then the last layer -> 128.
    for stage, side in enumerate((8, 16, 32, 64), start=1):
        assert tuple(model.get_layer(f"decoder_stage{stage}_relu").output.shape[1:3]) == (
            side,
            side,
        )
    # normalize(): tf.cast(input_image, tf.float32) / 255.0 feeds the encoder directly.
    out = model.get_layer("preprocess")(np.array([[[[0.0, 51.0, 255.0]]]], np.float32))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), [[[[0.0, 0.2, 1.0]]]], atol=1e-7)


def test_pets_unet_recipe_values_are_the_tutorials():
    cfg = pets_cfg()
    data = cfg.data
    assert data.transform == "resize"
    assert list(data.crop_size) == [SEED_004["size"]] * 2
    assert data.hflip is True and list(data.scale_range) == [1.0, 1.0]
    assert all(value == 0 for value in data.jitter.values())
    assert data.batch_size == SEED_004["batch"]
    assert data.shuffle_buffer == SEED_004["buffer"]
    assert data.num_classes == SEED_004["classes"] and data.border_as_ignore is False
    assert data.splits.train == "train" and data.splits.val == "test"
    assert cfg.trainer.epochs == SEED_004["epochs"]
    # null: train.py runs num_train // batch_size steps, the tutorial's STEPS_PER_EPOCH (57).
    assert cfg.trainer.steps_per_epoch is None and TRAIN_LENGTH // SEED_004["batch"] == 57
    assert cfg.model.freeze_encoder is True and cfg.model.backbone_weights == "imagenet"
    assert cfg.model.input_scaling == "unit"
    assert list(cfg.model.decoder_filters) == [512, 256, 128, 64] and cfg.model.kernel_size == 3

    optimizer = instantiate(cfg.optimizer, total_steps=20 * 57, steps_per_epoch=57)
    # optimizer='adam': tf.keras Adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999,
    # epsilon=1e-07), constant.
    assert type(optimizer) is keras.optimizers.Adam
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (0.9, 0.999, 1e-7)
    assert cfg.optimizer.schedule is None
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(optimizer.learning_rate)), 1e-3)

    loss = instantiate(cfg.loss)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (2, 8, 8)).astype(np.int32)
    logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    np.testing.assert_allclose(float(loss(labels, logits)), float(reference), rtol=1e-5)
