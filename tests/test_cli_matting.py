"""experiment=portrait_matting end to end on a tiny portrait set: train, mode=eval, mode=infer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.fixture_writers import write_portrait
from tests.helpers import error_lines, run_cli, train_through_cli

MATTING_ERRORS = ("sad", "mse", "grad", "conn")


@pytest.mark.slow
def test_portrait_matting_trains_and_evaluates(tmp_path, cache_dir):
    root = tmp_path / "portrait"
    write_portrait(root, num_train=4, num_test=2)
    recipe = ["experiment=portrait_matting", f"data.root={root}", "model.base_filters=4"]
    run_dir = tmp_path / "run"
    metrics = train_through_cli(recipe, run_dir, cache_dir, tmp_path)
    assert metrics["task"] == "matting" and metrics["num_images"] == 2
    for name in MATTING_ERRORS:
        assert isinstance(metrics[name], float) and metrics[name] >= 0, name
    # The segmentation view: IoU of the thresholded alpha, keyed as a segmentation report.
    assert set(metrics["per_class_iou"]) == {"background", "person"}
    assert metrics["selection"]["metric"] == "val_sad"
    assert "val_sad" in (run_dir / "history.csv").read_text().splitlines()[0]
    assert (run_dir / "samples" / "val_0000_alpha.png").is_file()
    assert (run_dir / "samples" / "val_0000_cutout.png").is_file()

    eval_dir = tmp_path / "eval"
    args = ["mode=eval", f"ckpt_path={run_dir}", f"hydra.run.dir={eval_dir}"]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    for name in (*MATTING_ERRORS, "mean_iou"):
        assert evaluated[name] == pytest.approx(metrics[name], rel=1e-5), name

    predicted = tmp_path / "predicted"
    photos = tmp_path / "photos"  # the test images without their mattes
    photos.mkdir()
    for source in (root / "testing").glob("?????.png"):
        shutil.copy(source, photos)
    image = photos / "00005.png"
    runs = []

    def infer(inputs, *extra):
        runs.append(tmp_path / f"infer{len(runs)}")
        args = [
            "mode=infer",
            f"ckpt_path={run_dir}",
            f"infer.input={inputs}",
            f"infer.output_dir={predicted}",
            f"hydra.run.dir={runs[-1]}",
            *extra,
        ]
        return run_cli(args, cache_dir, cwd=tmp_path)

    result = infer(image, "infer.save_probs=true")
    assert result.returncode == 0, result.stderr[-3000:]
    alpha = Image.open(predicted / "00005_alpha.png")
    cutout = Image.open(predicted / "00005_cutout.png")
    assert alpha.mode == "L" and cutout.mode == "RGBA"
    assert alpha.size == cutout.size == Image.open(image).size  # the original size
    np.testing.assert_array_equal(np.asarray(cutout)[..., 3], np.asarray(alpha))
    # The unrounded alpha: float16 in [0, 1], which the 8-bit PNG is round(255 * alpha) of.
    array = np.load(predicted / "00005_alpha.npy")
    assert array.dtype == np.float16 and array.shape == np.asarray(alpha).shape
    rounded = np.round(array.astype(np.float64) * 255)
    assert np.abs(rounded - np.asarray(alpha)).max() <= 1  # float16 steps near 1 are 1/2048

    # Both photos now (00005 and one other): 00005's outputs exist, so a plain run refuses in one
    # line before writing anything; infer.resume=true predicts only the other image.
    before = {p.name: p.stat().st_mtime_ns for p in predicted.iterdir()}
    result = infer(photos)
    assert result.returncode != 0
    assert error_lines(result)[-1:] and "00005_" in error_lines(result)[-1]
    assert "infer.resume=true" in error_lines(result)[-1]
    assert {p.name: p.stat().st_mtime_ns for p in predicted.iterdir()} == before
    result = infer(photos, "infer.resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    for name, mtime in before.items():  # 00005's outputs are left as they were
        assert (predicted / name).stat().st_mtime_ns == mtime, name
    other = sorted(p.stem for p in photos.iterdir() if p.stem != "00005")
    assert len(other) == 1
    written = {p.name for p in predicted.iterdir()} - set(before)
    assert written == {f"{other[0]}_{kind}.png" for kind in ("alpha", "cutout", "overlay")}
