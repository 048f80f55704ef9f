"""A run dir written by seg-train before the layers redesign still evaluates and resumes.

tests/fixtures/run_dir_affb1b3 was written by commit affb1b3 (the last commit before the
package was re-laid into tasks/, training/, inference/) with

    seg-train data.source.num_train=16 data.source.num_val=8 data.source.image_size=32 \
        data.crop_size=[32,32] data.batch_size=4 model.base_filters=4 model.depth=2 \
        trainer.epochs=2 logger=csv eval.num_samples=1 eval.report_worst=1

killed (SIGKILL, as tests/test_tasks_train_resume_kills.py does) during the second epoch's
validation: it holds epoch 1's row in history.csv, its best.keras and the epoch-end backup, as a
preempted run does. Only its stale run.lock was removed. Its .keras checkpoint names the classes
registered by that code.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from tests.helpers import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "run_dir_affb1b3"
# What that run wrote to history.csv as epoch 1's val mIoU (8 images): best.keras's score.
RECORDED_VAL_MIOU = 0.0975828410139887


def _copy_fixture(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def test_the_fixture_is_what_the_old_code_wrote():
    state = json.loads((FIXTURE / "backup" / "state.json").read_text())
    assert state["epoch"] == 1 and state["finished"] is False
    assert abs(state["best"] - RECORDED_VAL_MIOU) < 1e-12


def test_an_old_run_dir_evaluates_to_its_recorded_score(cache_dir, tmp_path):
    run_dir = _copy_fixture(tmp_path)
    result = run_cli(
        ["mode=eval", f"ckpt_path={run_dir}", f"hydra.run.dir={tmp_path / 'eval'}"],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(metrics["mean_iou"] - RECORDED_VAL_MIOU) < 1e-6


def test_an_old_run_dir_resumes_to_its_end(cache_dir, tmp_path):
    run_dir = _copy_fixture(tmp_path)
    result = run_cli([f"trainer.resume={run_dir}"], cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "history.csv", newline="") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    # Keras' CSVLogger counts epochs from 0: the old run wrote epoch 0, the resume epoch 1.
    assert epochs == [0, 1]
    state = json.loads((run_dir / "backup" / "state.json").read_text())
    assert state["epoch"] == 2 and state["finished"] is True
    assert (run_dir / "metrics.json").is_file() and (run_dir / "report.html").is_file()
