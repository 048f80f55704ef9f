"""`seg-train` (mode=train): fit a model, then evaluate its best checkpoint at full resolution.

Training is crash-safe: backups every `trainer.backup_every_steps` batches and at epoch ends,
`trainer.resume=RUN_DIR` continues from the newest one, SIGTERM/SIGINT write a backup and stop,
and a non-finite loss stops the run before anything is saved (see seg_train/training/backup.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from pathlib import Path

import keras
import tensorflow as tf
from omegaconf import DictConfig

from seg_train import runtime
from seg_train.config_checks import is_matting_data
from seg_train.data import pipeline
from seg_train.data.decode import data_errors_as_user_errors
from seg_train.errors import UserError
from seg_train.files import RESTARTABLE, ensure_fresh_run_dir
from seg_train.tasks import checkpoint, instantiate, loggers, run_lock
from seg_train.tasks.evaluate import (
    SplitEvaluator,
    evaluate_model,
    optimized_value,
)
from seg_train.tasks.report import write_report
from seg_train.tasks.sources import build_source, pipeline_options
from seg_train.training import backup, devices, distribute, fit, optim, preemption
from seg_train.training.callbacks import BackupCallback, NaNGuard, OriginalResolutionValidation
from seg_train.viz import plot_history

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Trains `cfg.model` on `cfg.data`; returns the best checkpoint's `optimized_metric`."""
    run_dir = Path(cfg.paths.output_dir)
    preemption.stop_on_signals(run_dir, "start-up")  # SIGTERM/SIGINT: exit 75, resume command
    # One process per run dir (a second one exits 2 naming us), except the workers of one
    # multi-worker job, which share it by design.
    shared = cfg.hardware.get("strategy") == "multi_worker"
    with contextlib.nullcontext() if shared else run_lock.hold(run_dir):
        if not shared:
            backup.remove_stale_temporaries(run_dir)
        return _train(cfg, run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> float | None:
    saved = _backup_to_resume(cfg, run_dir)
    state = saved[0] if saved else backup.TrainingState()
    if state.finished:
        log.info("Run %s is complete (%d epochs); nothing to resume", run_dir, state.epoch)
        return optimized_value(
            json.loads((run_dir / "metrics.json").read_text()), cfg.optimized_metric
        )
    keras.backend.clear_session()  # a sweep runs its jobs in one process
    runtime.seed_everything(cfg.seed)
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    distribute.set_precision(cfg.trainer.precision)
    strategy = instantiate.distribution_strategy(cfg)
    devices.record(run_dir)
    chief = distribute.is_chief(strategy)
    batch_per_replica = _log_strategy(cfg, strategy)

    source = build_source(cfg.data)
    steps_per_epoch, epochs = _run_length(cfg, source)
    # Never "at the end" of an epoch: a backup from after an epoch's last batch runs its end.
    state = backup.normalise(state, steps_per_epoch)
    data = _Datasets(cfg, source)
    protocol = instantiate.val_protocol(cfg)
    log.info(
        "Validation (selects best.keras): trainer.val_protocol=%s, %s",
        protocol,
        instantiate.describe_protocol(cfg, protocol),
    )

    view = instantiate.build_and_compile(cfg, strategy, source, steps_per_epoch, epochs)
    model = view.model
    log.info("Model %s: %s parameters", model.name, f"{model.count_params():,}")
    if chief:
        optim.print_param_groups(view.train_model.optimizer, view.train_model.trainable_variables)
    distribute.warn_small_bn_batches(model, batch_per_replica)

    # Keras warns that fit's default shuffle=True is ignored for datasets; we shuffle in tf.data.
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    with data_errors_as_user_errors():  # a broken file: one line naming it
        if not is_matting_data(cfg.data):  # alpha mattes: 0 and 255 are values, not labels
            fit.check_label_sample(
                pipeline.decoded_dataset(source, "train"),
                cfg.data.ignore_label,
                cfg.data.get("root"),
            )
        callbacks = _callbacks(cfg, view, source, data, protocol, chief)
        if chief and cfg.trainer.backups:
            callbacks.append(
                BackupCallback(
                    run_dir,
                    cfg.trainer.backup_every_steps,
                    _checkpoint_callback(callbacks),
                    state,
                    steps_per_epoch,
                )
            )
        if saved:
            fit.restore(view.train_model, saved[1], state, callbacks)
        preemption.stop_on_signals(phase="training")
        fit.fit_from(
            view.train_model,
            lambda start: view.wrap_dataset(data.train(start)),
            # Under the original protocol a callback validates; fit's own validation is not run.
            view.wrap_dataset(data.val) if protocol == "resized" else None,
            state,
            steps_per_epoch,
            epochs,
            callbacks,
            validation_freq=cfg.trainer.validation_freq,
            verbose=cfg.trainer.verbose,
        )
    if not chief:
        log.info("Worker done; the chief writes checkpoints and the report")
        return None
    if cfg.trainer.overfit_batches:
        fit.check_overfit(view.train_model, view.wrap_dataset(data.val))
    preemption.stop_on_signals(phase="the final evaluation")
    validation = next((c for c in callbacks if isinstance(c, OriginalResolutionValidation)), None)
    value = _report_best(
        model,
        cfg,
        run_dir,
        _selection(cfg, protocol, _checkpoint_callback(callbacks)),
        validation.evaluator if validation is not None else None,
    )
    write_report(run_dir, cfg)  # report.html from metrics.json, history, log (never raises)
    backup.mark_finished(run_dir)
    loggers.finish(callbacks, run_dir)  # metrics.json, report.html: to MLflow / W&B
    return value


def _log_strategy(cfg: DictConfig, strategy: tf.distribute.Strategy) -> int:
    """Logs the replicas and batch split; returns the images per replica."""
    batch_per_replica = distribute.per_replica_batch(cfg.data.batch_size, strategy)
    log.info(
        "Strategy %s: %d replica(s), %d images per replica, global batch %d, precision %s",
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
        batch_per_replica,
        cfg.data.batch_size,
        cfg.trainer.precision,
    )
    return batch_per_replica


def _run_length(cfg: DictConfig, source) -> tuple[int, int]:
    """(steps per epoch, epochs): `trainer.total_steps`, when set, decides the epochs."""
    num_train = source.num_examples("train")
    steps_per_epoch, epochs = instantiate.run_length(cfg, num_train)
    if cfg.trainer.total_steps:
        log.info(
            "trainer.total_steps=%d: %d epochs of %d steps",
            cfg.trainer.total_steps,
            epochs,
            steps_per_epoch,
        )
    log.info(
        "Data %s: %d train / %d val images, crop %s, %d steps per epoch",
        cfg.data.name,
        num_train,
        source.num_examples("val"),
        list(cfg.data.crop_size),
        steps_per_epoch,
    )
    return steps_per_epoch, epochs


class _Datasets:
    """The run's training stream (from any batch on) and its resized validation batches."""

    def __init__(self, cfg: DictConfig, source):
        self.cfg = cfg
        self.source = source
        # Resized val batches: fit's validation under trainer.val_protocol=resized, and the
        # TensorBoard prediction images under either protocol.
        self.val = fit.shard_by_data(
            pipeline.val_dataset(source, pipeline_options(cfg), max_images=cfg.eval.max_images)
        )
        if cfg.trainer.overfit_batches:  # validated on the batches it trains on
            self.val = self.train(0).take(cfg.trainer.overfit_batches)

    def train(self, start_batch: int) -> tf.data.Dataset:
        """The run's batches from `start_batch` on: the data order depends on the seed and the
        position only, so a resumed run sees what the uninterrupted one saw."""
        overfit = self.cfg.trainer.overfit_batches
        if overfit:  # the same few batches over and over (debug=overfit)
            start_batch = 0
        stream = pipeline.train_dataset(
            self.source,
            pipeline_options(self.cfg),
            self.cfg.seed,
            repeat=True,
            start_batch=start_batch,
        )
        stream = fit.shard_by_data(stream)
        if overfit:
            stream = stream.take(overfit).cache().repeat()
        return stream


def _checkpoint_callback(callbacks: list) -> keras.callbacks.ModelCheckpoint | None:
    return next((c for c in callbacks if isinstance(c, keras.callbacks.ModelCheckpoint)), None)


def _callbacks(cfg, view, source, data, protocol, chief) -> list:
    """The NaN guard; on the chief also the validation and the configured callbacks."""
    callbacks = [
        NaNGuard(
            f"optimizer.learning_rate={cfg.optimizer.learning_rate}, "
            f"trainer.precision={cfg.trainer.precision}"
        )
    ]
    if not chief:  # only the chief writes checkpoints, backups, logs and summaries
        return callbacks
    if protocol == "original":  # first: the checkpoint and loggers read its val_* logs
        callbacks.append(original_resolution_validation(cfg, view.model, source))
    val_batch = next(data.val.as_numpy_iterator())
    return callbacks + instantiate.build_callbacks(cfg, val_batch, view, protocol)


def _backup_to_resume(cfg: DictConfig, run_dir: Path) -> tuple | None:
    """The backup to continue from (`trainer.resume`), or None for a new run in a fresh dir."""
    if not cfg.trainer.resume:
        ensure_fresh_run_dir(run_dir, ignore=RESTARTABLE)
        return None
    if Path(cfg.trainer.resume).expanduser().resolve() != run_dir.resolve():
        raise UserError(
            f"trainer.resume={cfg.trainer.resume} but the run dir is {run_dir}; "
            "resume with: seg-train trainer.resume=RUN_DIR (nothing else needed)"
        )
    saved = backup.load_state(run_dir)
    if saved is None:
        # Stopped before its first backup: start it again here, so that a requeue script can
        # always run the same command. Refused if it finished (trainer.backups=false).
        ensure_fresh_run_dir(run_dir, ignore=(*RESTARTABLE, "checkpoints"))
        log.info("Run %s has no backup yet: starting it from the beginning", run_dir)
    return saved


def _selection(cfg: DictConfig, protocol: str, checkpoint) -> dict:
    """How best.keras was chosen, for metrics.json: protocol, monitored metric and its value."""
    selection = {
        "protocol": protocol,
        "description": instantiate.describe_protocol(cfg, protocol),
        "metric": None,
        "value": None,
    }
    if checkpoint is not None:
        best = checkpoint.best
        selection.update(
            metric=checkpoint.monitor,
            value=float(best) if best is not None and math.isfinite(best) else None,
        )
    return selection


def _report_best(
    model: keras.Model,
    cfg: DictConfig,
    run_dir: Path,
    selection: dict,
    evaluator: SplitEvaluator | None = None,
) -> float | None:
    """Evaluates the best checkpoint at original resolution, then plots the curves.

    `selection` (how the checkpoint was chosen) goes into metrics.json. `evaluator` is the
    in-training validation's (trainer.val_protocol=original): the best weights are loaded into
    `model` behind it, whose predictor is traced and val split decoded already. Rebuilding the
    model from the file, tracing and decoding anew took most of the pause between the last
    epoch and the report.
    """
    best = run_dir / checkpoint.BEST_CHECKPOINT
    if not best.is_file():
        log.warning("No %s (is callbacks.model_checkpoint off?); evaluating the last weights", best)
        best = run_dir / "checkpoints" / "last.keras"
        best.parent.mkdir(parents=True, exist_ok=True)
        model.save(best)
        selection = {**selection, "metric": None, "value": None, "note": "last weights"}
    if evaluator is not None:
        with warnings.catch_warnings():
            # best.keras holds the model without its optimizer, which evaluation does not use.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(best)  # the checkpoint's weights, into the validated model
        evaluator.predictor.sync_weights()
        log.info("Loaded the weights of %s", best)
        best_model = model
    else:
        best_model = checkpoint.load_model(best, checkpoint.output_channels(cfg))
    report = evaluate_model(
        best_model, cfg, "val", run_dir, best, {"selection": selection}, evaluator=evaluator
    )
    history_csv = run_dir / "history.csv"
    if history_csv.is_file():  # after the report, which is what the user waits for
        plot_history(history_csv, run_dir / "training_curves.png")
    log.info(
        "Best checkpoint %s (selected on %s under trainer.val_protocol=%s: %s): val mIoU %.4f",
        best,
        selection["metric"],
        selection["protocol"],
        "n/a" if selection["value"] is None else f"{selection['value']:.4f}",
        report["mean_iou"] or 0.0,
    )
    return optimized_value(report, cfg.optimized_metric)


def original_resolution_validation(cfg: DictConfig, model: keras.Model, source):
    """The callback that validates `model` (the saved single-output model) as the final report
    evaluates it, every `trainer.validation_freq` epochs (`trainer.val_protocol=original`)."""
    from seg_train.data.pipeline import should_cache
    from seg_train.tasks.evaluate import SplitEvaluator
    from seg_train.training.callbacks import OriginalResolutionValidation

    cache = should_cache(source, "val", cfg.data.cache)
    if is_matting_data(cfg.data):  # SAD, MSE, Grad, Conn and the thresholded IoU
        from seg_train.tasks.matting import MattingEvaluator, MattingValidation

        evaluator = MattingEvaluator(model, cfg, "val", cache=cache)
        return MattingValidation(evaluator, cfg.data.class_names, cfg.trainer.validation_freq)
    evaluator = SplitEvaluator(model, cfg, "val", cache=cache)
    return OriginalResolutionValidation(
        evaluator, cfg.data.class_names, cfg.trainer.validation_freq
    )
