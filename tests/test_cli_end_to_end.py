"""The `seg-train` CLI end to end: train -> eval -> infer, multirun, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_TRAIN, error_lines, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """One tiny training run shared by the tests of this module."""
    work = tmp_path_factory.mktemp("cli")
    run_dir = work / "train"
    result = run_cli([*TINY_TRAIN, f"hydra.run.dir={run_dir}"], cache_dir, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def evaluate(checkpoint, cache_dir, tmp_path, *overrides) -> dict:
    """`seg-train mode=eval ckpt_path=CHECKPOINT ...` into tmp_path/e; its metrics.json."""
    result = run_cli(
        ["mode=eval", f"ckpt_path={checkpoint}", *overrides, f"hydra.run.dir={tmp_path / 'e'}"],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "e" / "metrics.json").read_text())


def test_training_writes_the_run_dir(trained_run):
    run_dir, result = trained_run
    for name in (
        ".hydra/config.yaml",
        "config_resolved.yaml",
        "checkpoints/best.keras",
        "history.csv",
        "metrics.json",
        "training_curves.png",
        "confusion_matrix.csv",
    ):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "samples").glob("*.png"))) == 2
    rows = (run_dir / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and "val_mean_iou" in rows[0]  # header + 2 epochs
    assert list((run_dir / "tensorboard" / "train").glob("events.*"))
    assert list((run_dir / "tensorboard" / "val_predictions").glob("events.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["per_class_iou"]) == {"background", "disc", "square", "triangle"}
    assert metrics["num_images"] == 8 and 0.0 <= metrics["mean_iou"] <= 1.0
    defined = [v for v in metrics["per_class_iou"].values() if v is not None]
    assert metrics["mean_iou"] == pytest.approx(sum(defined) / len(defined))
    # The config tree is printed at start, the per-class table at the end.
    assert "data" in result.stdout and "triangle" in result.stdout and "IoU" in result.stdout


def test_eval_of_run_dir_reproduces_training_metrics(trained_run, cache_dir, tmp_path):
    run_dir, _ = trained_run
    evaluated = evaluate(run_dir, cache_dir, tmp_path)
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert abs(trained["mean_iou"] - evaluated["mean_iou"]) < 1e-4
    for key in (
        "mean_iou",
        "pixel_accuracy",
        "mean_accuracy",
        "per_class_iou",
        "num_images",
        "checkpoint",
    ):
        assert key in evaluated
    assert evaluated["checkpoint"].endswith("best.keras")


def test_eval_of_keras_file_with_data_override(trained_run, cache_dir, tmp_path):
    run_dir, _ = trained_run
    # The run's data config is reused (32 px, 8 val images) with one key overridden on top.
    best = run_dir / "checkpoints" / "best.keras"
    evaluated = evaluate(best, cache_dir, tmp_path, "data.batch_size=2")
    assert evaluated["num_images"] == 8


def test_eval_max_images_evaluates_only_the_first_images(trained_run, cache_dir, tmp_path):
    """eval.max_images=3 on the run's 8 validation images: 3 evaluated, and metrics.json and
    report.html say the result is partial."""
    run_dir, _ = trained_run
    evaluated = evaluate(run_dir, cache_dir, tmp_path, "eval.max_images=3")
    assert evaluated["num_images"] == 3 and evaluated["protocol"]["max_images"] == 3
    report = (tmp_path / "e" / "report.html").read_text()
    assert "first 3 images were evaluated" in report


def test_infer_writes_id_pngs_at_original_size(trained_run, cache_dir, tmp_path):
    run_dir, _ = trained_run
    inputs = tmp_path / "photos"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(inputs / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 21), dtype=np.uint8)).save(inputs / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)).save(inputs / "rgba.png")
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "preds"
    args = [
        "mode=infer",
        f"ckpt_path={run_dir}",
        f"infer.input={inputs}",
        f"infer.output_dir={out}",
        f"hydra.run.dir={tmp_path / 'i1'}",
    ]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for stem, size in (("rgb", (70, 45)), ("gray", (21, 33)), ("rgba", (40, 40))):
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P" and mask.size == size
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2, 3}
        assert Image.open(out / f"{stem}_overlay.jpg").size == size
    assert not (out / "notes.png").exists()

    # Running again refuses to overwrite, leaving the files as they were.
    before = (out / "rgb.png").stat().st_mtime_ns
    again = run_cli(args[:-1] + [f"hydra.run.dir={tmp_path / 'i2'}"], cache_dir, cwd=tmp_path)
    assert again.returncode == 2
    lines = error_lines(again)
    assert len(lines) == 1 and "already exists" in lines[0] and "infer.overwrite" in lines[0]
    assert (out / "rgb.png").stat().st_mtime_ns == before
    forced = run_cli(
        args[:-1] + ["infer.overwrite=true", f"hydra.run.dir={tmp_path / 'i3'}"],
        cache_dir,
        cwd=tmp_path,
    )
    assert forced.returncode == 0, forced.stderr[-3000:]


def test_infer_glob_and_refusal_to_write_into_input_dir(trained_run, cache_dir, tmp_path):
    run_dir, _ = trained_run
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    result = run_cli(
        [
            "mode=infer",
            f"ckpt_path={run_dir}",
            f"infer.input={tmp_path}/*.png",
            f"infer.output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'i'}",
        ],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "input directory" in error_lines(result)[0]
    result = run_cli(
        [
            "mode=infer",
            f"ckpt_path={run_dir}",
            f"infer.input={tmp_path}/*.png",
            f"hydra.run.dir={tmp_path / 'j'}",
        ],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "j" / "predictions" / "a.png").is_file()


def test_rerunning_into_a_used_run_dir_is_refused(trained_run, cache_dir, tmp_path):
    run_dir, _ = trained_run
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    result = run_cli([*TINY_TRAIN, "seed=7", f"hydra.run.dir={run_dir}"], cache_dir, cwd=tmp_path)
    assert result.returncode == 2
    assert str(run_dir) in error_lines(result)[0]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == saved


def test_multirun_runs_one_job_per_value(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "-m",
            "optimizer.learning_rate=1e-3,3e-4",
            "trainer.epochs=1",
            *[a for a in TINY_TRAIN if not a.startswith("trainer.epochs")],
            f"hydra.sweep.dir={sweep}",
        ],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rates = []
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert 0 <= metrics["mean_iou"] <= 1
        resolved = (sweep / job / "config_resolved.yaml").read_text()
        rates.append(next(line for line in resolved.splitlines() if "learning_rate" in line))
    assert rates[0] != rates[1]


def test_a_non_ascii_value_gets_the_quoting_hint(tmp_path, cache_dir):
    # Hydra's override grammar rejects unquoted non-ASCII values with a bare lexer error.
    result = run_cli(
        ["--cfg", "job", "data=folder", "data.root=/data/données"], cache_dir, tmp_path
    )
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "data.root" in lines[0] and """'data.root="/data/données"'""" in lines[0]
    quoted = run_cli(["--cfg", "job", 'data.root="/data/données"'], cache_dir, tmp_path)
    assert quoted.returncode == 0 and "/data/données" in quoted.stdout


def test_a_resume_may_add_a_tracker_but_not_change_the_model(tmp_path):
    from seg_train.cli import _changes_on_resume
    from seg_train.errors import UserError

    saved = ["model=unet", "trainer.epochs=4"]
    tracking = ["logger=[tensorboard,mlflow]", "logger.mlflow.experiment_name=pets", "model=unet"]
    assert _changes_on_resume(tmp_path, saved, tracking) == tracking[:2]
    with pytest.raises(UserError, match="cannot change model=fcn8s"):
        _changes_on_resume(tmp_path, saved, ["model=fcn8s"])
