"""`seg-train benchmark` (mode=benchmark): the verb, its settings, its arithmetic, the
developer-suite hook, and one tiny end-to-end run whose report is checked against the test's
own inputs."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

from seg_train.cli import expand_verb
from seg_train.config_checks import check_config
from seg_train.errors import UserError
from seg_train.tasks import instantiate
from tests.helpers import REPO, compose_config, run_cli

sys.path.insert(0, str(REPO))

from benchmarks import run_all  # noqa: E402


def test_run_length_takes_the_epochs_from_total_steps():
    # DeepLab v2 on VOC aug: 10,582 images, batch 10, 20k iterations (the paper's schedule):
    # 1,058 steps per epoch, and 19 epochs cover 20k steps (18 x 1,058 = 19,044 do not).
    cfg = compose_config(["trainer.total_steps=20000", "data.batch_size=10"])
    assert instantiate.run_length(cfg, 10_582) == (1058, 19)
    cfg = compose_config(["trainer.epochs=3", "trainer.steps_per_epoch=7"])
    assert instantiate.run_length(cfg, 10_582) == (7, 3)


def test_the_verb_is_mode_benchmark():
    assert expand_verb(["benchmark", "seed=3"]) == ["mode=benchmark", "seed=3"]
    assert expand_verb(["-m", "benchmark", "seed=1,2"]) == ["-m", "mode=benchmark", "seed=1,2"]
    with pytest.raises(UserError, match="give one"):
        expand_verb(["benchmark", "mode=train"])


def test_mode_benchmark_composes_and_its_settings_are_checked():
    cfg = compose_config(["mode=benchmark", "benchmark.steps=7", "benchmark.eval_images=0"])
    assert cfg.mode.name == "benchmark" and cfg.mode.task == "seg_train.tasks.benchmark.run"
    assert cfg.benchmark.steps == 7 and cfg.benchmark.eval_images == 0
    check_config(cfg)
    for bad in ("benchmark.steps=0", "benchmark.warmup_steps=-1", "benchmark.eval_images=-2"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            check_config(compose_config(["mode=benchmark", bad]))


def test_help_names_the_verb():
    result = subprocess.run(
        [sys.executable, "-m", "seg_train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "check or benchmark" in result.stdout
    modes = next(line for line in result.stdout.splitlines() if line.startswith("mode: "))
    assert "benchmark" in modes.removeprefix("mode: ").split(", ")


def test_training_speed_counts_only_the_steps_after_the_warm_up():
    from seg_train.tasks.benchmark import training_speed

    # Step ends at 10.0 (tracing), 10.5, then 10.7, 11.0, 11.4: three steps after 2 warm-up
    # steps take 11.4 - 10.5 = 0.9 s; 4 images per step.
    ends = {0: 10.0, 1: 10.5, 2: 10.7, 3: 11.0, 4: 11.4}
    speed = training_speed(ends, warmup_steps=2, batch_size=4)
    assert speed["steps"] == 3 and speed["images"] == 12
    assert speed["seconds"] == pytest.approx(0.9)
    assert speed["seconds_per_step"] == pytest.approx(0.3)
    assert speed["images_per_s"] == pytest.approx(12 / 0.9)
    # steps_per_execution=2: Keras reports every second step (indices 1, 3, 5).
    speed = training_speed({1: 2.0, 3: 3.0, 5: 3.5}, warmup_steps=2, batch_size=1)
    assert speed["steps"] == 4 and speed["seconds"] == pytest.approx(1.5)
    with pytest.raises(UserError, match="warm-up"):
        training_speed({0: 1.0, 1: 2.0}, warmup_steps=2, batch_size=1)


def test_run_all_calls_the_benchmark_verb(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        run_dir = command[-1].removeprefix("hydra.run.dir=")
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "benchmark.json").write_text(json.dumps({"train": {"steps": 3}}))
        assert run_dir == str(tmp_path / "r")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    report = run_all.run_mode_benchmark(["experiment=voc_fcn8s", "seed=3"], tmp_path / "r")
    assert report == {"train": {"steps": 3}}
    assert calls[0][1:6] == ["-m", "seg_train", "benchmark", "experiment=voc_fcn8s", "seed=3"]

    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 2, "", "seg-train: error: bad key\n")

    monkeypatch.setattr(run_all.subprocess, "run", failing_run)
    assert run_all.run_mode_benchmark([], tmp_path / "none") == {
        "error": "seg-train: error: bad key"
    }


@pytest.mark.slow
def test_benchmark_verb_writes_a_sane_report_and_prints_a_table(cache_dir, tmp_path):
    batch, warmup, steps, eval_images = 4, 2, 3, 2
    run_dir = tmp_path / "bench"
    result = run_cli(
        [
            "benchmark",
            "data.source.num_train=16",
            "data.source.num_val=4",
            "data.source.image_size=32",
            "data.crop_size=[32,32]",
            f"data.batch_size={batch}",
            "model=unet",
            "model.base_filters=4",
            "model.depth=2",
            "model.backbone_weights=null",
            f"benchmark.warmup_steps={warmup}",
            f"benchmark.steps={steps}",
            f"benchmark.eval_images={eval_images}",
            f"hydra.run.dir={run_dir}",
        ],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "benchmark.json").read_text())
    train, evaluation = report["train"], report["eval"]
    assert report["choices"]["mode"] == "benchmark" and report["model"] == "unet"
    assert train["steps"] == steps and train["warmup_steps"] == warmup
    assert train["batch_size"] == batch and train["images"] == batch * steps
    assert train["images_per_s"] > 0 and train["seconds_per_step"] > 0
    assert train["images_per_s"] == pytest.approx(batch * steps / train["seconds"])
    assert train["seconds_per_step"] == pytest.approx(train["seconds"] / steps)
    assert 0 <= train["data_stall"] <= 1
    assert evaluation["images"] == eval_images and evaluation["images_per_s"] > 0
    assert evaluation["images_per_s"] == pytest.approx(eval_images / evaluation["seconds"])
    # TensorFlow alone takes hundreds of MiB; no machine has a terabyte for this.
    assert 100 < report["memory"]["peak_host_mb"] < 2**20
    env = report["environment"]
    assert env["tensorflow"] == importlib.metadata.version("tensorflow")
    if not env["gpus"]:
        assert report["memory"]["peak_gpu_mb"] is None
    # The table is on stdout; nothing of a training run (checkpoints, backups, logs) was written.
    assert "seg-train benchmark: unet on synthetic" in result.stdout
    assert "train images/s" in result.stdout and "eval images/s" in result.stdout
    written = {path.name for path in run_dir.iterdir()}
    assert not written & {"checkpoints", "backup", "history.csv", "tensorboard", "metrics.json"}


def test_a_run_dir_with_a_benchmark_report_is_not_reused(tmp_path):
    from seg_train.files import ensure_fresh_run_dir

    (tmp_path / "benchmark.json").write_text("{}\n")
    with pytest.raises(UserError, match="benchmark.json"):
        ensure_fresh_run_dir(tmp_path, ignore=(".hydra",))
