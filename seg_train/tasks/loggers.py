"""Experiment tracking: the `logger` config group (configs/logger/).

`cfg.logger` holds one entry per selected logger (`logger=mlflow`, `logger=[tensorboard,mlflow]`).
TensorBoard and CSV logging are Keras callbacks of `cfg.callbacks`; `callback_nodes` gives those
the selection keeps. MLflow and Weights & Biases are `Tracker`s built here: Keras
callbacks that open a tracking run before the first epoch, log every epoch's logs, and, in
`finish`, log the numbers of the run's metrics.json and its report files once they are written.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import keras
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seg_train.config_checks import missing_logger_package
from seg_train.errors import UserError

log = logging.getLogger(__name__)

# The `callbacks` entries that write TensorBoard event files only: built only when the logger
# selection includes tensorboard (the default), so `logger=csv` writes history.csv alone...
TENSORBOARD_CALLBACKS = ("tensorboard", "prediction_images")
# ... and those that also write a TensorBoard scalar: then built with log_dir=None (console only).
TENSORBOARD_SCALARS = ("data_stall",)
# Run-dir files logged as artifacts when present. report.html is written by the report module
# at the end of training and eval; runs without it log the rest.
ARTIFACTS = ("metrics.json", "report.html", "per_class.csv", "history.csv", "training_curves.png")
# MLflow refuses a param value longer than this (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH);
# long values (a 255-class palette, say) are cut rather than failing the run.
MAX_PARAM_LENGTH = 6000
# MLflow's log_batch limits: params and metrics per call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# Characters MLflow accepts in param and metric names; others (e.g. in class names) become "_".
_INVALID_NAME = re.compile(r"[^/\w.\- :]")


def selected(cfg: DictConfig) -> list[str]:
    """The selected loggers' names; none for `logger=[]`."""
    node = cfg.get("logger")
    return [str(name) for name in node] if node else []


def callback_nodes(cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """The `cfg.callbacks` entries to build, by name, under the logger selection.

    Null entries (`callbacks.tensorboard=null`) are skipped. Without tensorboard in the
    selection, TensorBoard's own callbacks are skipped too and the data-stall monitor gets
    log_dir=None, so no event files are written; history.csv is written under every selection.
    """
    tensorboard = "tensorboard" in selected(cfg)
    for name, node in cfg.callbacks.items():
        if node is None or (not tensorboard and name in TENSORBOARD_CALLBACKS):
            continue
        if not tensorboard and name in TENSORBOARD_SCALARS:
            node = copy.copy(node)  # keeps its parent: its other interpolations still resolve
            node.log_dir = None
        yield str(name), node


def build(cfg: DictConfig) -> list[Tracker]:
    """One tracker per selected logger that has one (mlflow, wandb), for the run dir
    `cfg.paths.output_dir` (read only then: a config composed outside a Hydra job cannot
    resolve it).

    Raises:
        UserError: A selected logger's package is not installed (one line naming the extra).
    """
    names = [name for name in selected(cfg) if name in TRACKERS]
    run_dir = Path(cfg.paths.output_dir) if names else None
    return [TRACKERS[name](cfg, run_dir) for name in names]


def finish(callbacks: list, run_dir: Path) -> None:
    """Ends the tracking runs among `callbacks` once `run_dir`'s metrics.json is written."""
    for callback in callbacks:
        if isinstance(callback, Tracker):
            callback.finish(Path(run_dir))


def require(name: str):
    """Imports the optional package of logger `name`, or raises a one-line `UserError`."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(missing_logger_package(name, exc)) from exc


def config_tree(cfg: DictConfig) -> dict:
    """The config as plain Python values, without Hydra's own node.

    Interpolations are resolved; where one cannot be (`${hydra:...}` outside a Hydra job, e.g.
    a config composed by a test), the unresolved text is logged instead of failing the run.
    """
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (`optimizer.learning_rate`); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def param_value(value: Any) -> str:
    """A config value as MLflow's string param, in JSON (null, true, [32, 32]) and cut to size."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_LENGTH]


def numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of `values` (nested dicts joined with "/"); None, bools and text skipped.

    Numbers may be NumPy or TensorFlow scalars (Keras logs) or Python numbers (metrics.json).
    """
    found: dict[str, float] = {}
    for key, value in (values or {}).items():
        name = _INVALID_NAME.sub("_", f"{prefix}{key}")
        if isinstance(value, dict):
            found.update(numbers(value, f"{name}/"))
        elif value is None or isinstance(value, (bool, str, list)):
            continue
        else:
            with contextlib.suppress(TypeError, ValueError):
                found[name] = float(value)
    return found


def default_run_name(run_dir: Path) -> str:
    """The run dir relative to the working directory (e.g. outputs/train/DATE/TIME), else whole."""
    with contextlib.suppress(ValueError):
        return str(run_dir.resolve().relative_to(Path.cwd().resolve()))
    return str(run_dir.resolve())


class Tracker(keras.callbacks.Callback):
    """A tracking run opened before the first epoch, fed each epoch's logs, closed by `finish`.

    Subclasses implement `_open`, `_log_epoch` and `_close`. The run opens lazily, at the first
    `fit` call or epoch end (a resumed run finishes an interrupted epoch before `fit`), so a run
    that fails before training leaves no empty tracking run behind; mode=eval opens it in
    `finish`.

    Args:
        cfg: The composed config; its `logger.<name>` entry holds the tracker's settings, and
            all of it is logged as the run's params.
        run_dir: The seg-train run dir (metrics.json and the report land there).
    """

    name = ""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        super().__init__()
        self.module = require(self.name)  # at build time: before any training is done
        self.settings = cfg.logger[self.name]
        self.run_dir = run_dir
        self.config = flatten(config_tree(cfg))
        self.mode = str(OmegaConf.select(cfg, "mode.name", default="train"))
        self.opened = False
        self.closed = False

    def on_train_begin(self, logs=None):
        self._ensure_open()

    def on_epoch_end(self, epoch, logs=None):
        self._ensure_open()
        self._log_epoch(epoch, numbers(logs))

    def finish(self, run_dir: Path) -> None:
        """Logs metrics.json's numbers and the report files of `run_dir`, then ends the run."""
        if self.closed:
            return
        self._ensure_open()
        report = run_dir / "metrics.json"
        final = numbers(json.loads(report.read_text())) if report.is_file() else {}
        files = [run_dir / name for name in ARTIFACTS if (run_dir / name).is_file()]
        self._close(final, files)
        self.closed = True
        log.info("logger=%s: logged the run's final metrics and %d file(s)", self.name, len(files))

    def _ensure_open(self) -> None:
        if not self.opened:
            self._open()
            self.opened = True

    def _open(self) -> None:
        raise NotImplementedError

    def _log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _close(self, final: dict[str, float], files: list[Path]) -> None:
        raise NotImplementedError


class MlflowTracker(Tracker):
    """Logs to MLflow through `MlflowClient` (no global active run, so the jobs of a sweep in one
    process cannot log into each other's runs).

    Tracking URI: `logger.tracking_uri`, else $MLFLOW_TRACKING_URI, else the file store
    `mlruns/` of the working directory. Params: the flattened config. Metrics: each epoch's logs
    at step = epoch (0-based, as history.csv), then metrics.json's numbers as `final/<key>`
    (their own names: a run's `mean_iou` history is the training metric). A resumed run
    (`trainer.resume`) continues the MLflow run tagged with its run dir.
    """

    name = "mlflow"
    RUN_DIR_TAG = "seg_train.run_dir"

    def _open(self) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = (
            self.settings.get("tracking_uri")
            or os.environ.get("MLFLOW_TRACKING_URI")
            or (Path.cwd() / "mlruns").as_uri()
        )
        if urlparse(str(uri)).scheme in ("", "file"):
            # MLflow 3 refuses the file store (in maintenance, not removed) unless this is set;
            # it is the zero-setup local store the logger promises. Set it yourself to "false"
            # to forbid file stores.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=str(uri))
            experiment = self._experiment(str(self.settings.experiment_name))
            self.run_id = self._resumed_run(experiment) or self._new_run(experiment)
        except MlflowException as exc:  # e.g. an unreachable server: one line, exit status 2
            message = str(exc).strip().splitlines() or [type(exc).__name__]
            raise UserError(f"logger=mlflow: tracking URI {uri}: {message[0]}") from exc
        # A run stopped by an error or a signal is marked KILLED, not left RUNNING forever.
        atexit.register(self._abandon)
        log.info("logger=mlflow: run %s in experiment %s at %s", self.run_id, experiment, uri)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # another job of a parallel sweep created it first
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise UserError(
                f"logger=mlflow: experiment '{name}' is deleted; restore it "
                f"(mlflow experiments restore) or pick another logger.mlflow.experiment_name"
            )
        return found.experiment_id

    def _new_run(self, experiment: str) -> str:
        """A new run tagged with the run dir, the flattened config as its params."""
        tags = {self.RUN_DIR_TAG: str(self.run_dir.resolve()), "seg_train.mode": self.mode}
        name = self.settings.get("run_name") or default_run_name(self.run_dir)
        self.run_id = self.client.create_run(experiment, run_name=name, tags=tags).info.run_id
        params = [(_INVALID_NAME.sub("_", k), param_value(v)) for k, v in self.config.items()]
        self._log_batch(params=params)
        return self.run_id

    def _resumed_run(self, experiment: str) -> str | None:
        """The run of an earlier process on this run dir (`trainer.resume`), back to RUNNING."""
        run_dir = str(self.run_dir.resolve())
        if "'" in run_dir:
            return None  # not expressible in MLflow's filter syntax; start a new run
        runs = self.client.search_runs(
            [experiment], filter_string=f"tags.`{self.RUN_DIR_TAG}` = '{run_dir}'", max_results=1
        )
        if not runs:
            return None
        self.client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id  # params logged then; MLflow refuses changing a param

    def _log_batch(self, metrics: dict[str, float] | None = None, step: int = 0, params=()):
        from mlflow.entities import Metric, Param

        stamp = int(time.time() * 1000)
        rows = [Metric(k, v, stamp, step) for k, v in (metrics or {}).items()]
        for start in range(0, len(rows), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[start : start + METRICS_PER_BATCH])
        params = [Param(k, v) for k, v in params]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])

    def _log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self._log_batch(values, step=epoch)

    def _close(self, final: dict[str, float], files: list[Path]) -> None:
        self._log_batch({f"final/{k}": v for k, v in final.items()})
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")
        atexit.unregister(self._abandon)

    def _abandon(self) -> None:
        if not self.closed:
            # At exit the run is over whatever happens here; an unreachable server must not
            # replace the run's own error with a second traceback.
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.run_id, "KILLED")


class WandbTracker(Tracker):
    """Logs to Weights & Biases in offline mode, never over the network: the run is written to
    RUN_DIR/wandb/ for a later `wandb sync`. Config: the flattened config. History: each epoch's
    logs at step = epoch. Summary: metrics.json's numbers as `final/<key>`. Files: the report.
    """

    name = "wandb"

    def _open(self) -> None:
        # Offline whatever the environment says (WANDB_MODE=online included): no network, ever.
        os.environ["WANDB_MODE"] = "offline"
        self.run = self.module.init(
            mode="offline",
            dir=str(self.run_dir),
            project=str(self.settings.project),
            name=self.settings.get("name") or default_run_name(self.run_dir),
            config=self.config,
            # A sweep's jobs share the process: never log into an earlier job's run.
            reinit="finish_previous",
        )

    def _log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self.run.log(values, step=epoch)

    def _close(self, final: dict[str, float], files: list[Path]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"mlflow": MlflowTracker, "wandb": WandbTracker}
