"""The `logger` config group: what each selection logs, read back through the loggers' own tools.

Unit tests fit a two-layer Keras model for a few epochs with the callbacks a selection builds;
expected values are the ones the test sets and Keras' own `History`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from seg_train.config_checks import check_config
from seg_train.errors import UserError
from seg_train.tasks import loggers
from tests.helpers import TINY_TRAIN, compose_config, run_cli

LEARNING_RATE = 0.0123  # set by the tests below, read back as a logged param


def tiny_fit(callbacks: list, epochs: int = 3, initial_epoch: int = 0):
    """Fits a two-layer model on 16 random rows; returns Keras' History."""
    import keras

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=["mae"])
    return model.fit(
        x,
        y,
        validation_data=(x[:4], y[:4]),
        epochs=epochs,
        initial_epoch=initial_epoch,
        batch_size=8,
        callbacks=callbacks,
        verbose=0,
    )


def tracking_config(run_dir, *overrides):
    return compose_config(
        [f"optimizer.learning_rate={LEARNING_RATE}", f"paths.output_dir={run_dir}", *overrides]
    )


def write_report_files(run_dir, report: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(report))
    (run_dir / "report.html").write_text("<html><body>report</body></html>")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh MLflow file store; the environment variables the logger sets are restored."""
    pytest.importorskip("mlflow")  # in the dev extra; skipped only in a venv without it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_run_reads_back_through_the_client(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg = tracking_config(
        run_dir,
        "logger=mlflow",
        "model=unet",
        f"logger.mlflow.tracking_uri={mlflow_store}",
        "logger.mlflow.experiment_name=logger-test",
    )
    callbacks = loggers.build(cfg)
    history = tiny_fit(callbacks, epochs=3)
    write_report_files(run_dir, {"mean_iou": 0.25, "per_class_iou": {"a": 0.5, "b": None}})
    loggers.finish(callbacks, run_dir)

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("logger-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model._target_"] == "seg_train.models.unet.build_unet"
    assert float(params["optimizer.learning_rate"]) == LEARNING_RATE
    assert params["logger.mlflow.experiment_name"] == "logger-test"
    for key in ("loss", "mae", "val_loss", "val_mae"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in sorted(logged, key=lambda m: m.step)] == [0, 1, 2]
        values = [m.value for m in sorted(logged, key=lambda m: m.step)]
        assert values == pytest.approx(history.history[key], rel=1e-6), key
    assert run.data.metrics["final/mean_iou"] == 0.25
    assert run.data.metrics["final/per_class_iou/a"] == 0.5
    assert "final/per_class_iou/b" not in run.data.metrics  # a class without an IoU
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.html"} <= artifacts
    copy = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "dl"))
    assert json.loads(Path(copy).read_text())["mean_iou"] == 0.25


def test_mlflow_resumed_run_continues_the_same_run(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    overrides = ("logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_store}")
    first = loggers.build(tracking_config(run_dir, *overrides))
    before = tiny_fit(first, epochs=1)
    first[0]._abandon()  # what the exit hook does when a run stops before its end
    client = MlflowClient(mlflow_store)
    (killed,) = client.search_runs([client.get_experiment_by_name("seg-train").experiment_id])
    assert killed.info.status == "KILLED"

    # trainer.resume: a new process, the same run dir, a changed config key.
    second = loggers.build(tracking_config(run_dir, *overrides, "trainer.epochs=2"))
    after = tiny_fit(second, epochs=2, initial_epoch=1)
    write_report_files(run_dir, {"mean_iou": 0.5})
    loggers.finish(second, run_dir)
    (run,) = client.search_runs([killed.info.experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    logged = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in logged] == [0, 1]
    assert logged[0].value == pytest.approx(before.history["loss"][0], rel=1e-6)
    assert logged[1].value == pytest.approx(after.history["loss"][0], rel=1e-6)


def test_csv_logger_writes_history_csv_and_no_tensorboard(tmp_path):
    from seg_train.tasks.instantiate import build_callbacks

    cfg = tracking_config(tmp_path, "logger=csv")
    OmegaConf.set_struct(cfg, False)
    # history.csv's writer, plus TensorBoard's, which logger=csv must leave out.
    cfg.callbacks = {k: cfg.callbacks[k] for k in ("csv_logger", "tensorboard")}
    callbacks = build_callbacks(cfg, None, None)
    assert [type(c).__name__ for c in callbacks] == ["CSVLogger"]
    history = tiny_fit(callbacks, epochs=2)
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for key in ("loss", "val_mae"):
        assert [float(r[key]) for r in rows] == pytest.approx(history.history[key], rel=1e-6)
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize(
    ("overrides", "tensorboard"),
    [([], True), (["logger=[tensorboard,mlflow]"], True), (["logger=csv"], False)],
)
def test_tensorboard_writers_follow_the_selection(tmp_path, overrides, tensorboard):
    cfg = tracking_config(tmp_path, *overrides)
    nodes = dict(loggers.callback_nodes(cfg))
    assert ("tensorboard" in nodes) is tensorboard
    assert ("prediction_images" in nodes) is tensorboard
    assert "csv_logger" in nodes  # history.csv under every selection
    # The data-stall monitor stays (its warning), its TensorBoard scalar only with tensorboard.
    stall_dir = nodes["data_stall"].log_dir
    assert stall_dir == (str(tmp_path / "tensorboard" / "data_stall") if tensorboard else None)
    assert cfg.callbacks.data_stall.log_dir is not None  # the config itself is left as it was


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_missing_package_is_one_line(monkeypatch, tmp_path, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import NAME` now fails as if not installed
    cfg = tracking_config(tmp_path, f"logger=[tensorboard,{name}]")
    expected = f"logger={name} needs the {name} package: pip install 'seg-train[{name}]'"
    with pytest.raises(UserError) as checked:
        check_config(cfg)  # before any data is read
    assert str(checked.value) == expected
    with pytest.raises(UserError) as built:
        loggers.build(cfg)
    assert str(built.value) == expected


class FakeWandbRun:
    def __init__(self):
        self.logged, self.summary, self.saved, self.finished = [], {}, [], False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def save(self, path, base_path, policy):
        self.saved.append(path)

    def finish(self):
        self.finished = True


def test_wandb_is_offline_and_logs_each_epoch(monkeypatch, tmp_path):
    """The calls to wandb's API (a stand-in module: no wandb install, no network needed)."""
    run, calls = FakeWandbRun(), []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")  # the logger goes offline whatever this says
    cfg = tracking_config(tmp_path, "logger=wandb", "logger.wandb.project=p")
    callbacks = loggers.build(cfg)
    history = tiny_fit(callbacks, epochs=2)
    write_report_files(tmp_path, {"mean_iou": 0.75})
    loggers.finish(callbacks, tmp_path)

    (init,) = calls
    assert init["mode"] == "offline" and init["project"] == "p"
    assert init["dir"] == str(tmp_path)
    assert init["config"]["optimizer.learning_rate"] == LEARNING_RATE
    assert os.environ["WANDB_MODE"] == "offline"
    assert [step for step, _ in run.logged] == [0, 1]
    assert [v["loss"] for _, v in run.logged] == pytest.approx(history.history["loss"], rel=1e-6)
    assert run.summary["final/mean_iou"] == 0.75
    assert {p.rsplit("/", 1)[-1] for p in run.saved} >= {"metrics.json", "report.html"}
    assert run.finished


@pytest.mark.slow
def test_cli_training_run_is_logged_to_mlflow(tmp_path, cache_dir, mlflow_store, monkeypatch):
    """`seg-train logger=mlflow` end to end; the default store is mlruns/ of the working dir."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = [
        *TINY_TRAIN,
        "debug=fast",
        "trainer.epochs=1",
        "data.source.num_val=4",
        "logger=mlflow",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # This process's client reads the file store as seg-train wrote it: with MLflow 3's opt-in.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert not (run_dir / "tensorboard").exists()  # logger=mlflow alone: no TensorBoard files
    assert "logger=mlflow: run" in result.stderr + result.stdout
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("seg-train").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["data.name"] == "synthetic"
    assert run.data.params["data.crop_size"] == "[32, 32]"  # TINY_TRAIN's value
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["final/mean_iou"] == pytest.approx(metrics["mean_iou"])
    rows = (run_dir / "history.csv").read_text().splitlines()
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(rows) - 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"metrics.json", "history.csv"}
    if (run_dir / "report.html").exists():  # written by the report module when it is there
        expected.add("report.html")
    assert expected <= artifacts
