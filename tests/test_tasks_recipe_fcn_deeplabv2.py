"""voc_fcn32s / voc_fcn8s / voc_deeplabv2* against their references, with the numbers written here.

FCN: github.com/shelhamer/fcn.berkeleyvision.org commit 1305c7378a9f0ab44b2c936f4d60e4687e3d8743
(voc-fcn32s/solver.prototxt and net.py, voc-fcn8s-atonce/net.py and solver.prototxt,
data/pascal/README.md). DeepLab v2: seeds/002_5319f1dc62a162e8.txt and
github.com/DrSleep/tensorflow-deeplab-resnet commit 066023c033624e6c8154340e06e8fbad4f702bdf
(train.py, train_msc.py, deeplab_resnet/utils.py, image_reader.py).
"""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra.utils import instantiate
from PIL import Image

from seg_train.data import pipeline
from seg_train.data.voc import VOCSource
from seg_train.errors import UserError
from seg_train.models import deeplabv2, fcn
from seg_train.training import losses
from tests.fixture_writers import write_sbd, write_voc
from tests.helpers import REPO, compose_config

# --- FCN reference solver (voc-fcn32s/solver.prototxt, net.py) --------------------------------
REF_BASE_LR = 1e-10  # base_lr, "lr for unnormalized softmax"
REF_WEIGHT_DECAY = 5e-4  # weight_decay
REF_MOMENTUM = 0.99  # momentum ("high momentum")
REF_BIAS_LR_MULT = 2  # conv param [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
# SoftmaxWithLoss(normalize=False) sums over the image's pixels; our loss averages them. The
# recipe converts with N = 500 x 500 px (VOC's largest image side is 500):
PIXELS = 500 * 500  # = 250,000
# Caffe: v <- m v - lr (N dL_mean/dw + wd w). Ours: v <- m v - lr' (dL_mean/dw + wd' w).
# Equal for lr' = lr N = 1e-10 x 250,000 = 2.5e-5 and lr' wd' = lr wd, i.e.
# wd' = 5e-4 / 250,000 = 2e-9.
EXPECTED_LR = 2.5e-5
EXPECTED_WD = 2e-9
FCN_STEPS = {"voc_fcn32s": 100_000, "voc_fcn8s": 300_000}  # max_iter of each solver.prototxt
SBD_TRAIN = "train_sbd"  # data/pascal/README.md: "We train on the 8,498 images of SBD train."


def compose(experiment: str, *overrides: str):
    return compose_config([f"experiment={experiment}", "data.root=/nonexistent", *overrides])


@pytest.mark.parametrize("experiment", sorted(FCN_STEPS))
def test_fcn_recipes_compose_to_the_reference_solver(experiment):
    cfg = compose(experiment)
    opt = cfg.optimizer
    assert opt.inner._target_ == "keras.optimizers.SGD"
    assert opt.inner.momentum == REF_MOMENTUM and not opt.inner.nesterov
    assert opt.schedule is None  # lr_policy: "fixed"
    assert opt.learning_rate == pytest.approx(REF_BASE_LR * PIXELS)
    assert opt.learning_rate == pytest.approx(EXPECTED_LR)
    assert opt.weight_decay == pytest.approx(REF_WEIGHT_DECAY / PIXELS)
    assert opt.weight_decay == pytest.approx(EXPECTED_WD)
    # The decay step lr' wd' w is the reference's lr wd w.
    assert opt.learning_rate * opt.weight_decay == pytest.approx(REF_BASE_LR * REF_WEIGHT_DECAY)
    assert opt.accumulation_steps == 1  # iter_size: 1

    data = cfg.data
    assert data.batch_size == 1
    assert data.transform == "crop" and list(data.scale_range) == [1.0, 1.0]
    assert data.hflip is False
    assert min(data.crop_size) >= 500  # every VOC image (sides <= 500) is trained whole
    assert data.aug is True and data.train_list == SBD_TRAIN
    assert data.source.train_list == SBD_TRAIN
    assert cfg.trainer.epochs * cfg.trainer.steps_per_epoch == FCN_STEPS[experiment]


def test_sbd_train_split_is_sbds_own_train_list(tmp_path):
    voc = tmp_path / "VOC2012"
    voc_train, voc_val = ["2007_000032", "2007_000039"], ["2007_000033"]
    voc_masks = write_voc(voc, voc_train, voc_val)
    # SBD train: one VOC train id, one VOC val id (SBD train overlaps VOC val, hence FCN's
    # seg11valid) and one new image; SBD val: one more image, which SBD train leaves out.
    sbd_train, sbd_val = [voc_train[1], voc_val[0], "2008_000002"], ["2008_000003"]
    sbd_masks = write_sbd(tmp_path / "sbd", sbd_train, sbd_val)
    for image_id in ("2008_000002", "2008_000003"):
        blank = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
        blank.save(voc / "JPEGImages" / f"{image_id}.jpg")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "prepare_voc_aug.py"),
            "--voc-root",
            str(voc),
            "--sbd-root",
            str(tmp_path / "sbd"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    listed = (voc / "ImageSets" / "Segmentation" / f"{SBD_TRAIN}.txt").read_text().split()
    assert listed == sorted(sbd_train)

    source = VOCSource(str(voc), aug=True, num_classes=21, train_list=SBD_TRAIN)
    decoded = dict(
        zip(listed, (m for _, m in pipeline.decoded_dataset(source, "train").as_numpy_iterator()))
    )
    assert sorted(decoded) == sorted(sbd_train)
    np.testing.assert_array_equal(decoded["2008_000002"], sbd_masks["2008_000002"])
    # Where VOC has its own mask it is used (listed under the recipe's Differs).
    np.testing.assert_array_equal(decoded[voc_val[0]], voc_masks[voc_val[0]])
    assert source.describe_split("val").endswith("val.txt")
    with pytest.raises(UserError, match="data.train_list"):
        VOCSource(str(voc), aug=False, train_list=SBD_TRAIN)


def test_fcn8s_recipe_is_the_at_once_net():
    cfg = compose("voc_fcn8s")
    assert cfg.model._target_ == "seg_train.models.fcn.build_fcn8s"
    # voc-fcn8s-atonce/net.py: L.Scale(pool4, filler constant 0.01), L.Scale(pool3, 0.0001).
    assert list(cfg.model.skip_scales) == [0.01, 0.0001]


def tiny_fcn8s(**kwargs) -> keras.Model:
    return fcn.build_fcn8s(3, (64, 64, 3), fc_filters=8, backbone_weights=None, **kwargs)


def test_fcn8s_skip_features_are_scaled_before_scoring():
    model = tiny_fcn8s()
    rng = np.random.default_rng(0)
    for skip, factor in (("pool4", 0.01), ("pool3", 0.0001)):
        score = model.get_layer(f"score_{skip}")
        kernel = rng.normal(size=score.kernel.shape).astype("float32")
        score.set_weights([kernel, np.zeros(3, "float32")])
        probe = keras.Model(model.input, [model.get_layer(f"scale_{skip}").input, score.output])
        features, scores = (np.asarray(t) for t in probe(rng.uniform(0, 255, (1, 64, 64, 3))))
        # A 1x1 conv with zero bias on factor * features: sum_c factor * f[c] * K[c, k].
        expected = np.einsum("bhwc,ck->bhwk", factor * features, kernel[0, 0])
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
        assert np.abs(features).max() > 0  # a non-trivial check


def test_fcn8s_without_skip_scales_scores_the_raw_features():
    model = tiny_fcn8s(skip_scales=None)
    assert not any(layer.name.startswith("scale_pool") for layer in model.layers)


def test_fcn_bias_step_is_twice_the_kernel_step_and_upsampling_is_fixed():
    cfg = compose("voc_fcn32s")
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(2, 1, name="score_fr")(inputs)
    x = keras.layers.Conv2DTranspose(
        2, 4, strides=2, padding="same", use_bias=False, name="upscore"
    )(x)
    model = keras.Model(inputs, x)
    optimizer = instantiate(cfg.optimizer, total_steps=10, steps_per_epoch=10)
    kernel, bias = model.get_layer("score_fr").weights
    upscore = model.get_layer("upscore").kernel
    for variable in (kernel, bias, upscore):
        variable.assign(np.zeros(variable.shape, "float32"))
    grads = [np.ones(v.shape, "float32") for v in (kernel, bias, upscore)]
    optimizer.apply(grads, [kernel, bias, upscore])
    # First momentum-SGD step from v = 0, w = 0 (so no decay term): w = -lr * lr_mult * g.
    np.testing.assert_allclose(np.asarray(kernel), -2.5e-5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bias), -5.0e-5, rtol=1e-6)  # lr_mult 2
    np.testing.assert_array_equal(np.asarray(upscore), 0.0)  # Deconvolution lr_mult 0
    # decay_mult 0 on biases (and the fixed upsampling), 1 on kernels.
    assert optimizer.decay_coefficient(kernel) == pytest.approx(2e-9)
    assert optimizer.decay_coefficient(bias) == 0.0
    assert optimizer.decay_coefficient(upscore) == 0.0


# --- DeepLab v2 (DrSleep train.py / train_msc.py, seed 002) -----------------------------------
# Keras' caffe-style preprocessing subtracts this RGB mean (keras.applications.imagenet_utils);
# padding with it gives 0 after subtraction, as DrSleep pads the mean-subtracted image.
KERAS_CAFFE_MEAN_RGB = [123.68, 116.779, 103.939]


@pytest.mark.parametrize(
    "experiment", ["voc_deeplabv2", "voc_deeplabv2_msc", "voc_deeplabv2_msc_crf"]
)
def test_deeplabv2_recipes_have_drsleeps_values(experiment):
    cfg = compose(experiment)
    opt = cfg.optimizer
    assert opt.learning_rate == 2.5e-4  # LEARNING_RATE
    assert opt.inner._target_ == "keras.optimizers.SGD" and opt.inner.momentum == 0.9
    assert opt.weight_decay == 5e-4  # WEIGHT_DECAY
    assert opt.schedule._target_ == "seg_train.training.optim.PolyDecay"
    assert opt.schedule.power == 0.9 and opt.schedule.warmup_steps == 0  # POWER
    assert cfg.trainer.epochs * cfg.trainer.steps_per_epoch == 20_000  # NUM_STEPS 20001
    assert cfg.data.batch_size == 10  # train.py BATCH_SIZE (train_msc: 1 x 10 accumulated)
    assert list(cfg.data.crop_size) == [321, 321]  # INPUT_SIZE '321,321'
    assert cfg.data.transform == "crop"
    assert list(cfg.data.scale_range) == [0.5, 1.5]  # image_scaling: uniform 0.5 .. 1.5
    assert cfg.data.hflip is True  # --random-mirror
    assert list(cfg.data.pad_value) == KERAS_CAFFE_MEAN_RGB and cfg.data.ignore_label == 255
    assert cfg.data.aug is True and cfg.data.train_list is None  # train_aug, 10,582 images
    assert cfg.model.backbone == "resnet101" and cfg.model.freeze_bn is True
    assert list(cfg.model.aspp_rates) == [6, 12, 18, 24]  # fc1_voc12_c0..c3

    # fc weights at 10x, fc biases at 20x (opt_fc_w / opt_fc_b); only 'weights' decay.
    optimizer = instantiate(opt, total_steps=20_000, steps_per_epoch=1_000)
    head = keras.layers.Conv2D(2, 3, name="aspp_conv_1")
    body = keras.layers.Conv2D(2, 3, name="res5c_branch2c")
    keras.Sequential([keras.Input((5, 5, 1)), body, head])
    lr_mults = {
        v.path.split("/", 1)[1]: optimizer.groups[optimizer.group_index(v)].lr_mult
        for v in (*head.weights, *body.weights)
    }
    assert lr_mults == {
        "aspp_conv_1/kernel": 10,
        "aspp_conv_1/bias": 20,
        "res5c_branch2c/kernel": 1,
        "res5c_branch2c/bias": 1,
    }
    assert optimizer.decay_coefficient(head.bias) == 0.0
    assert optimizer.decay_coefficient(head.kernel) == pytest.approx(5e-4)


def test_deeplabv2_msc_recipe_scales():
    assert list(compose("voc_deeplabv2_msc").model.msc_scales) == [1.0, 0.75, 0.5]


@pytest.mark.slow
def test_deeplabv2_resnet101_maps_321_to_41():
    # Seed 002: "如默认321*321,最后结果矩阵是41*41" (321x321 in, a 41x41 score map out).
    # Keras ResNet: conv1 7x7/2 pad 3: (321 + 6 - 7) // 2 + 1 = 161; pool 3x3/2 pad 1:
    # (161 + 2 - 3) // 2 + 1 = 81; conv3 1x1/2: (81 - 1) // 2 + 1 = 41; conv4/5 atrous: 41.
    model = deeplabv2.build_deeplabv2(
        21, (321, 321, 3), backbone="resnet101", backbone_weights=None
    )
    assert tuple(model.get_layer("aspp_sum").output.shape) == (None, 41, 41, 21)
    assert tuple(model.output.shape) == (None, 321, 321, 21)


@pytest.fixture(scope="module")
def msc_view():
    model = deeplabv2.build_deeplabv2(
        4,
        (321, 321, 3),
        backbone="mobilenetv2",
        backbone_alpha=0.35,
        msc_scales=[1.0, 0.75, 0.5],
        backbone_weights=None,
    )
    image = np.random.default_rng(0).uniform(0, 255, (1, 321, 321, 3)).astype("float32")
    view = deeplabv2.msc_training_model(model)
    outputs = {k: np.asarray(v) for k, v in view(image, training=False).items()}
    return model, image, outputs


def test_msc_training_view_outputs_each_scales_own_map(msc_view):
    model, image, outputs = msc_view
    # DrSleep's train_msc.py feeds int(321 * 0.75) = 240 and int(321 * 0.5) = 160 px; at stride
    # 8 (as 321 -> 41 above): 240 -> 120 -> 60 -> 30, 160 -> 80 -> 40 -> 20.
    shapes = {k: v.shape for k, v in outputs.items()}
    assert shapes == {
        "fused": (1, 321, 321, 4),
        "fused_scores": (1, 41, 41, 4),
        "scale_100": (1, 41, 41, 4),
        "scale_075": (1, 30, 30, 4),
        "scale_050": (1, 20, 20, 4),
    }
    # The saved (inference) model still outputs input-size logits, the view's "fused".
    np.testing.assert_allclose(
        outputs["fused"], np.asarray(model(image, training=False)), atol=1e-5
    )


def test_msc_fused_map_is_the_max_of_the_scale_maps_at_the_full_scale_size(msc_view):
    _, _, outputs = msc_view
    # train_msc.py: reduce_max(stack([out100, resize(out075, 41x41), resize(out05, 41x41)])),
    # bilinear. Our resize is TF2's (half-pixel centres), DrSleep's TF1's (see the recipe).
    up075 = tf.image.resize(outputs["scale_075"], (41, 41), method="bilinear").numpy()
    up050 = tf.image.resize(outputs["scale_050"], (41, 41), method="bilinear").numpy()
    expected = np.maximum(np.maximum(outputs["scale_100"], up075), up050)
    np.testing.assert_allclose(outputs["fused_scores"], expected, atol=1e-5)


def tf1_nearest_rows(in_size: int, out_size: int) -> np.ndarray:
    """TF1 resize_nearest_neighbor(align_corners=False) source rows: floor(i * in / out).

    DrSleep's prepare_label runs on TF 1.1 (README), before `half_pixel_centers` existed: the
    scale in/out and the product are float32, then floored (resize_nearest_neighbor_op.cc).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(
        np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(int), in_size - 1
    )


def test_tf1_nearest_rule_by_hand():
    # 321 -> 31: scale 10.354839; rows 0, 10, 20, 31, ... 310 (30 * 10.3548 = 310.6).
    rows = tf1_nearest_rows(321, 31)
    assert rows[:4].tolist() == [0, 10, 20, 31] and rows[-1] == 310
    # TF2's half-pixel rule would take floor((i + 0.5) * scale): 5, 15, 25, ...
    # The same rule as TensorFlow's own TF1 op, as a reference library:
    labels = np.arange(321)[None, :, None, None].repeat(2, axis=2).astype("int32")
    tf1 = tf.compat.v1.image.resize_nearest_neighbor(
        labels, (31, 2), align_corners=False, half_pixel_centers=False
    )
    np.testing.assert_array_equal(np.asarray(tf1)[0, :, 0, 0], rows)


@pytest.mark.parametrize("size", [41, 30, 20])
def test_loss_on_a_score_map_uses_nearest_shrunk_labels(size):
    rng = np.random.default_rng(size)
    labels = rng.integers(0, 4, (2, 321, 321)).astype("int32")
    labels[:, :40, :] = 255  # ignored rows, some of which survive the shrink
    logits = rng.normal(size=(2, size, size, 4)).astype("float32")
    rows = tf1_nearest_rows(321, size)
    shrunk = labels[:, rows][:, :, rows]
    valid = shrunk != 255
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, np.where(valid, shrunk, 0)[..., None], axis=-1)[..., 0]
    expected = -(picked * valid).sum() / valid.sum()
    got = float(losses.CrossEntropy()(labels, logits))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
