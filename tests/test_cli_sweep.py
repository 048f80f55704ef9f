"""Sweeps: the leaderboard callback, GPU assignment per job, and real multiruns through the CLI."""

from __future__ import annotations

import csv
import json

import pytest
from omegaconf import OmegaConf

from seg_train.errors import UserError
from seg_train.runtime import job_devices
from seg_train.sweep import collect_jobs, rank_jobs, write_summary
from tests.helpers import TINY_TRAIN, run_cli


def fake_job(sweep, num, overrides, metric=None, status=None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metric is not None:
        (job / "metrics.json").write_text(json.dumps({"mean_iou": metric, "per_class_iou": {}}))
    if status is not None:
        (job / "job_status.json").write_text(json.dumps(status))


def test_summary_ranks_jobs_and_keeps_failed_ones_last(tmp_path):
    fake_job(tmp_path, 0, ["lr=1", "bs=2"], metric=0.5)
    fake_job(tmp_path, 1, ["lr=2", "bs=2"], status={"status": "failed", "error": "boom"})
    fake_job(tmp_path, 2, ["lr=3", "bs=2"], metric=0.7)
    fake_job(tmp_path, 10, ["lr=4", "bs=2"], metric=0.6)
    rows = rank_jobs(collect_jobs(tmp_path, "mean_iou"))
    assert [(r["job"], r["rank"]) for r in rows] == [(2, 1), (10, 2), (0, 3), (1, "")]
    assert rows[-1]["status"] == "failed" and rows[-1]["error"] == "boom"
    write_summary(tmp_path, rows)
    with open(tmp_path / "sweep_summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["job"] for row in table] == ["2", "10", "0", "1"]
    assert table[0]["overrides"] == "lr=3 bs=2"
    markdown = (tmp_path / "sweep_summary.md").read_text().splitlines()
    assert len(markdown) == 2 + 4
    assert "| 1 | 2 | completed | mean_iou | 0.7000 | lr=3 |" in markdown[2]  # only what varies


def test_min_mode_ranks_smaller_first(tmp_path):
    fake_job(tmp_path, 0, ["a=1"], metric=0.2)
    fake_job(tmp_path, 1, ["a=2"], metric=0.1)
    rows = rank_jobs(collect_jobs(tmp_path, "mean_iou"), mode="min")
    assert [r["job"] for r in rows] == [1, 0]


def test_gpus_per_job_gives_each_job_its_own_devices():
    hardware = OmegaConf.create({"devices": None, "gpus_per_job": 2})
    assert job_devices(hardware, 0) == [0, 1]
    assert job_devices(hardware, 3) == [6, 7]
    pool = OmegaConf.create({"devices": [4, 5, 6, 7], "gpus_per_job": 2})
    assert job_devices(pool, 1) == [6, 7]
    with pytest.raises(UserError, match="hardware.devices"):
        job_devices(pool, 2)
    assert job_devices(OmegaConf.create({"devices": [1], "gpus_per_job": None}), 5) == [1]


@pytest.mark.slow
def test_two_by_two_multirun_leaves_a_ranked_summary(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "optimizer.learning_rate=3e-3,1e-3",
        "model.base_filters=4,6",
        *[a for a in TINY_TRAIN if not a.startswith(("trainer.epochs", "model.base_filters"))],
        "trainer.epochs=1",
        "eval.num_samples=0",
        f"hydra.sweep.dir={sweep}",
    ]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    values = [float(row["value"]) for row in rows]
    assert values == sorted(values, reverse=True)
    for row in rows:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert metrics["mean_iou"] == pytest.approx(float(row["value"]))


@pytest.mark.slow
def test_sweep_with_a_failing_job_still_summarises(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "data.batch_size=8,abc",
        *TINY_TRAIN[:-2],
        "trainer.epochs=1",
        f"hydra.sweep.dir={sweep}",
    ]
    args = [a for a in args if a != "data.batch_size=8"]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 2
    assert "data.batch_size" in result.stderr
    with open(sweep / "sweep_summary.csv") as f:
        rows = {row["job"]: row for row in csv.DictReader(f)}
    assert rows["0"]["status"] == "completed" and rows["0"]["rank"] == "1"
    assert rows["1"]["status"] == "failed" and "data.batch_size" in rows["1"]["error"]


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=1,2",
        *TINY_TRAIN,
        "trainer.epochs=1",
        f"hydra.sweep.dir={sweep}",
    ]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep / "sweep_summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
