"""The matting SavedModel: alpha at the input size, equal to the in-framework alpha."""

from __future__ import annotations

import numpy as np
import pytest

from seg_train.inference.predictor import Predictor
from seg_train.inference.serving import run_in_fresh_process
from seg_train.models.unet import build_unet
from seg_train.tasks import export_matting as export


def test_parity_is_the_largest_absolute_difference():
    reference = [np.array([[0.0, 0.5]]), np.array([[1.0]])]
    exported = [np.array([[0.0, 0.25]], np.float32), np.array([[0.875]], np.float32)]
    report = export.alpha_parity(exported, reference, tolerance=0.2)
    # |diff| = 0, 0.25, 0.125: max 0.25 > 0.2; mean 0.375 / 3.
    assert report["max_abs_diff"] == pytest.approx(0.25)
    assert report["mean_abs_diff"] == pytest.approx(0.125)
    assert not report["passed"] and report["num_images"] == 2
    assert export.alpha_parity([np.zeros((2, 2))], [np.zeros((1, 2))])["max_abs_diff"] == np.inf


@pytest.mark.parametrize("mode", ["resize", "whole"])
def test_saved_model_round_trips_the_alpha(tmp_path, mode):
    model = build_unet(2, (None, None, 3), base_filters=4, depth=3, task="matting")
    crop = [16, 16] if mode == "resize" else None
    predictor = Predictor(model, mode=mode, crop_size=crop, size_divisor=4, max_whole_pixels=None)
    export.write_saved_model(predictor, tmp_path / "saved_model")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)]
    serve = export.serving_function(predictor)
    reference = [serve(image[None])[export.ALPHA_NAME].numpy()[0] for image in images]
    exported = run_in_fresh_process(tmp_path / "saved_model", "saved_model", images)
    assert exported[0].shape == (18, 22) and exported[0].dtype == np.float32
    assert exported[0].min() >= 0 and exported[0].max() <= 1
    assert export.alpha_parity(exported, reference)["passed"]
