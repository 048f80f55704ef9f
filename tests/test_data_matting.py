"""Matting targets: raw mattes decoded, float alpha resized bilinearly, geometry shared."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from seg_train.data import matting, pipeline
from seg_train.data.portrait import PortraitSource
from seg_train.errors import UserError
from seg_train.tasks.sources import build_source, pipeline_options
from tests.helpers import compose_config

H, W = 30, 40


@pytest.fixture
def root(tmp_path):
    """A portrait layout whose mattes equal the red channel of their images."""
    rng = np.random.default_rng(0)
    for folder, count in (("training", 4), ("testing", 2)):
        (tmp_path / folder).mkdir()
        for index in range(count):
            image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / folder / f"{folder}{index}.png")
            Image.fromarray(image[..., 0], mode="L").save(
                tmp_path / folder / f"{folder}{index}_matte.png"
            )
    return tmp_path


def data_config(root, *overrides):
    overrides = [
        "data=portrait",
        f"data.root={root}",
        "data.task=matting",
        "data.batch_size=2",
        "data.crop_size=[16,16]",
        "data.cache=false",
        *overrides,
    ]
    return compose_config(overrides)


def test_matting_source_keeps_the_raw_alpha(root):
    source = build_source(data_config(root).data)
    assert source.task == "matting"
    for image, alpha in pipeline.decoded_dataset(source, "val").as_numpy_iterator():
        assert alpha.dtype == np.uint8
        np.testing.assert_array_equal(alpha, image[..., 0])  # not binarised
    with pytest.raises(UserError, match="data.task"):
        PortraitSource(str(root), task="trimap")


@pytest.mark.parametrize("transform", ["crop", "resize"])
def test_training_alpha_moves_and_interpolates_with_the_image(root, transform):
    cfg = data_config(
        root, f"data.transform={transform}", "data.scale_range=[0.5,1.5]", "data.hflip=true"
    )
    images, alphas = next(
        iter(pipeline.train_dataset(build_source(cfg.data), pipeline_options(cfg), seed=3))
    )
    assert alphas.dtype == tf.float32 and alphas.shape == (2, 16, 16)
    alphas = alphas.numpy()
    assert alphas.min() >= 0.0 and alphas.max() <= 1.0
    # Not thresholded: interpolated values between the 8-bit levels occur.
    assert not np.allclose(alphas * 255, np.round(alphas * 255))
    # The same crop, scale, flip and bilinear weights: alpha * 255 is the red channel.
    np.testing.assert_allclose(alphas * 255, images.numpy()[..., 0], atol=1e-3)


def test_validation_alpha_is_resized_bilinearly(root):
    cfg = data_config(root)
    images, alphas = next(iter(pipeline.val_dataset(build_source(cfg.data), pipeline_options(cfg))))
    assert alphas.dtype == tf.float32 and alphas.shape == (2, 16, 16)
    np.testing.assert_allclose(alphas.numpy() * 255, images.numpy()[..., 0], atol=1e-3)


def test_resize_gives_the_bilinear_resize_of_image_and_alpha_stacked():
    # Reference: tf.image.resize of the 4-channel float stack (RGB + alpha on 0..255), the
    # alpha then divided by 255; image and alpha are resized apart, the same values.
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (45, 70, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (45, 70)).astype(np.uint8)
    stacked = np.concatenate([image, alpha[..., None]], -1).astype(np.float32)
    expected = tf.image.resize(stacked, [32, 24], "bilinear").numpy()
    resized_image, resized_alpha = matting.resize(image, alpha, [32, 24])
    np.testing.assert_array_equal(resized_image.numpy(), expected[..., :3])
    np.testing.assert_array_equal(resized_alpha.numpy(), np.clip(expected[..., 3] / 255, 0, 1))
