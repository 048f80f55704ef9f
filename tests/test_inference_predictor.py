"""Predictor: whole vs slide, test-time augmentation and fusion against independent computations."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from seg_train.errors import UserError
from seg_train.inference.predictor import Predictor, dynamic_twin
from seg_train.models.unet import build_unet


def pointwise_model(num_classes: int = 3, size=(None, None)) -> keras.Model:
    """A 1x1-conv network: exactly equivariant to flips (and translation)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((*size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 1, activation="tanh")(x)
    return keras.Model(inputs, keras.layers.Conv2D(num_classes, 1)(x))


@pytest.fixture(scope="module")
def unet():
    keras.utils.set_random_seed(1)
    return build_unet(4, (32, 32, 3), base_filters=4, depth=3)


def random_image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_plain_prediction_equals_a_direct_model_call(unet):
    image = random_image((32, 32, 3))
    expected = unet(image[None].astype(np.float32)).numpy()[0]
    np.testing.assert_allclose(Predictor(unet).logits(image), expected, atol=1e-5)
    np.testing.assert_array_equal(Predictor(unet).labels(image), expected.argmax(-1))


def test_fixed_size_model_gets_a_dynamic_twin_with_the_same_weights(unet):
    twin = dynamic_twin(unet)
    assert twin.input_shape == (None, None, None, 3)
    image = random_image((1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(twin(image), unet(image), atol=1e-6)
    # Any size works; a side that is not a multiple of the network stride is padded.
    assert Predictor(unet).logits(random_image((45, 70, 3))).shape == (45, 70, 4)


def test_single_scale_without_flip_is_plain_evaluation(unet):
    image = random_image((40, 24, 3))
    plain = Predictor(unet).logits(image)
    for fusion in ("mean_prob", "max_logit"):
        np.testing.assert_array_equal(
            Predictor(unet, scales=[1.0], flip=False, fusion=fusion).logits(image), plain
        )


def test_flip_tta_on_a_flip_equivariant_model_changes_nothing():
    model = pointwise_model()
    image = random_image((20, 30, 3))
    plain = Predictor(model).labels(image)
    np.testing.assert_array_equal(Predictor(model, flip=True).labels(image), plain)
    np.testing.assert_allclose(
        Predictor(model, flip=True, fusion="max_logit").logits(image),
        Predictor(model).logits(image),
        atol=1e-6,
    )


def test_flip_pairs_swap_scores_of_mirrored_view():
    model = pointwise_model(num_classes=3)
    image = random_image((8, 8, 3))
    logits = Predictor(model).logits(image)
    both = Predictor(model, flip=True, fusion="max_logit", flip_pairs=[[1, 2]]).logits(image)
    # The mirrored view is equivariant, so its scores equal the plain ones with 1 and 2 swapped.
    np.testing.assert_allclose(both, np.maximum(logits, logits[..., [0, 2, 1]]), atol=1e-6)


def test_max_logit_fusion_equals_hand_computed_maximum():
    model = pointwise_model()
    image = random_image((16, 24, 3))
    as_float = image.astype(np.float32)
    half = tf.image.resize(as_float, (8, 12), method="bilinear")
    views = [
        model(as_float[None]).numpy()[0],
        tf.image.resize(model(half[None])[0], (16, 24), method="bilinear").numpy(),
    ]
    fused = Predictor(model, scales=[1.0, 0.5], fusion="max_logit").logits(image)
    np.testing.assert_allclose(fused, np.maximum(*views), atol=1e-5)
    mean_prob = Predictor(model, scales=[1.0, 0.5], fusion="mean_prob").logits(image)
    expected = np.log(np.mean([tf.nn.softmax(v).numpy() for v in views], axis=0) + 1e-12)
    np.testing.assert_allclose(mean_prob, expected, atol=1e-5)


def test_slide_with_window_covering_the_image_equals_whole(unet):
    image = random_image((30, 28, 3))
    whole = Predictor(unet).logits(image)
    slide = Predictor(unet, mode="slide", crop_size=[32, 32]).logits(image)
    # The window pads the image to 32x32 exactly as whole mode pads to the size divisor.
    np.testing.assert_allclose(slide, whole, atol=1e-5)


def test_slide_averages_overlapping_windows_of_a_translation_equivariant_model():
    model = pointwise_model()
    image = random_image((50, 37, 3))
    whole = Predictor(model).logits(image)
    slide = Predictor(model, mode="slide", crop_size=[16, 16], stride=[10, 7]).logits(image)
    np.testing.assert_allclose(slide, whole, atol=1e-5)


def test_bad_options_are_user_errors(unet):
    with pytest.raises(UserError, match="eval.mode"):
        Predictor(unet, mode="tiles")
    with pytest.raises(UserError, match="eval.tta.fusion"):
        Predictor(unet, fusion="vote")
    with pytest.raises(UserError, match="eval.tta.scales"):
        Predictor(unet, scales=[0.0])


def test_resize_mode_runs_the_image_at_crop_size_and_resizes_logits_back():
    # The protocol of recipes trained on whole images resized to a fixed size (the tutorials).
    model = pointwise_model()
    image = random_image((45, 70, 3))
    small = tf.image.resize(image.astype(np.float32), (16, 24), method="bilinear")
    expected = tf.image.resize(model(small[None])[0], (45, 70), method="bilinear").numpy()
    got = Predictor(model, mode="resize", crop_size=[16, 24]).logits(image)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resize_mode_of_a_fixed_size_model_is_no_protocol_change():
    # Reshapes pin the size: no size-agnostic twin exists, so whole mode would have to resize.
    inputs = keras.Input((16, 24, 3))
    x = keras.layers.Conv2D(3, 1)(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Reshape((16, 24, 3))(keras.layers.Reshape((16 * 24, 3))(x))
    fixed = keras.Model(inputs, x)
    assert "resized to 16x24" in Predictor(fixed).protocol_change  # the model's input
    predictor = Predictor(fixed, mode="resize", crop_size=[16, 24])
    assert predictor.protocol_change is None
    assert predictor.logits(random_image((30, 50, 3))).shape == (30, 50, 3)
    with pytest.raises(UserError, match=r"eval.crop_size \[8, 8\] must equal"):
        Predictor(fixed, mode="resize", crop_size=[8, 8])
