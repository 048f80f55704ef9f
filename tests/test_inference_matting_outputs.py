"""Matting evaluation at original resolution, and the alpha / cut-out files inference writes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image

from seg_train.inference import matting_outputs as outputs
from seg_train.inference.matting import evaluate_alpha, predict_alpha


def red_alpha_model():
    """A stand-in matting model: alpha = red channel / 255."""
    inputs = keras.Input((None, None, 3))
    alpha = keras.layers.Rescaling(1 / 255)(inputs[..., :1])
    return keras.Model(inputs, alpha)


def images(count=2, shape=(6, 8)):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(count)]


def test_alpha_comes_back_at_the_original_size():
    model = red_alpha_model()
    image = images(1)[0]
    np.testing.assert_allclose(predict_alpha(model, image), image[..., 0] / 255, atol=1e-6)
    resized = predict_alpha(model, image, size=[4, 4])
    assert resized.shape == (6, 8) and resized.min() >= 0 and resized.max() <= 1


def test_report_holds_the_four_errors_and_the_thresholded_iou():
    model = red_alpha_model()
    pairs = [(image, image[..., 0]) for image in images()]
    # alpha = r / 255 > 0.5 exactly where r > 127: a perfect prediction in both views.
    report = evaluate_alpha(model, pairs, matte_threshold=127)
    assert report["num_images"] == 2
    for name in ("sad", "mse", "grad", "conn"):
        assert report[name] == pytest.approx(0.0, abs=1e-6), name  # float32 model
    assert report["segmentation"]["mean_iou"] == pytest.approx(1.0)
    # An inverted matte: |r - (255 - r)| / 255 per pixel, mean over the two images.
    inverted = [(image, 255 - image[..., 0]) for image in images()]
    report = evaluate_alpha(model, inverted)
    expected = np.mean([np.abs(2.0 * i[..., 0] - 255).sum() / 255 / 1000 for i in images()])
    assert report["sad"] == pytest.approx(expected, rel=1e-6)
    assert report["segmentation"]["mean_iou"] < 0.5


def test_alpha_cutout_and_overlay_files(tmp_path):
    image = images(1, (3, 2))[0]
    alpha = np.array([[0.0, 1.0], [0.5, 0.25], [1.2, -0.1]])
    paths = outputs.save_alpha_outputs(image, alpha, tmp_path / "out", "photo")
    assert [p.name for p in paths] == ["photo_alpha.png", "photo_cutout.png", "photo_overlay.png"]
    written = np.asarray(Image.open(paths[0]))
    # round(255 * a), clipped: 0, 255, 128 (127.5 rounds to even 128), 64 (63.75), 255, 0.
    np.testing.assert_array_equal(written, [[0, 255], [128, 64], [255, 0]])
    rgba = np.asarray(Image.open(paths[1]))
    assert rgba.shape == (3, 2, 4)
    np.testing.assert_array_equal(rgba[..., :3], image)
    np.testing.assert_array_equal(rgba[..., 3], written)
    shown = np.asarray(Image.open(paths[2]))
    np.testing.assert_array_equal(shown[0, 0], image[0, 0])  # alpha 0: the image as it is
    with pytest.raises(ValueError, match="must match"):
        outputs.save_alpha_outputs(image, alpha[:2], tmp_path, "x")


def test_the_unrounded_alpha_is_saved_as_float16_beside_the_images(tmp_path):
    image = images(1, (3, 2))[0]
    alpha = np.array([[0.0, 1.0], [0.5, 0.25], [1.2, -0.1]])
    paths = [tmp_path / name for name in ("o.png", "c.png", "a.png", "a.npy")]
    outputs.write_alpha_outputs(paths, image, alpha)
    saved = np.load(paths[3])
    assert saved.dtype == np.float16
    # Clipped to [0, 1]; these values are exact in float16.
    np.testing.assert_array_equal(saved, [[0.0, 1.0], [0.5, 0.25], [1.0, 0.0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.png", "c.png", "o.png"]
