"""`seg-train benchmark` (mode=benchmark): how fast a composed config trains and evaluates here.

For any config `mode=train` accepts (e.g. `seg-train benchmark experiment=voc_deeplabv2`) it
builds the model, optimizer, compiled train step and tf.data pipeline with the same functions
as `seg_train.tasks.train`, runs `benchmark.warmup_steps` steps (the first holds the tracing, the
next ones fill the shuffle and prefetch buffers), then times `benchmark.steps` steps of the real
input pipeline. It then predicts `benchmark.eval_images` images of `eval.split` through the
evaluation's own `SplitEvaluator` (Predictor, test-time augmentation, CRF) and records:

* training images/s and s/step after the warm-up, and the data-stall share of those steps
  (`DataStallMonitor`, as a training run logs it);
* evaluation images/s after one warm-up image;
* peak host memory (`ru_maxrss`) and, with a GPU, TensorFlow's peak GPU memory, for training
  and for evaluation;
* the environment (`seg_train.training.devices.describe` plus Python, Keras and CPU).

A table goes to stdout and `benchmark.json` into the run dir. Nothing else is written there: no
checkpoints, backups, CSV or TensorBoard logs (their callbacks act at epoch ends, not per step).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from seg_train import runtime
from seg_train.data import pipeline
from seg_train.data.decode import data_errors_as_user_errors
from seg_train.errors import UserError
from seg_train.files import ensure_fresh_run_dir, write_json_atomic
from seg_train.tasks import instantiate
from seg_train.tasks.evaluate import SplitEvaluator, predict_stream
from seg_train.tasks.sources import build_source, pipeline_options
from seg_train.training import devices, distribute, fit
from seg_train.training.callbacks import DataStallMonitor, NaNGuard

log = logging.getLogger(__name__)

REPORT_NAME = "benchmark.json"


class StepClock(keras.callbacks.Callback):
    """Wall-clock time at the end of every training step, keyed by the step's index.

    Defining `on_train_batch_end` also makes Keras run batch callbacks synchronously, so each
    stamp is taken after its step has finished, not when it was dispatched.
    """

    def __init__(self):
        super().__init__()
        self.ends: dict[int, float] = {}

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # With steps_per_execution=k Keras calls this every k steps with the last step's index.
        self.ends[batch] = time.perf_counter()


def training_speed(ends: dict[int, float], warmup_steps: int, batch_size: int) -> dict[str, Any]:
    """Speed over the steps after the warm-up, from the end-of-step stamps of one `fit` call.

    The timed interval runs from the end of the last warm-up step to the end of the last step,
    so it holds exactly the timed steps (data wait included) and no tracing.

    Args:
        ends: Step index (0-based) -> time at the end of that step, as `StepClock` records.
        warmup_steps: How many steps at the start are not timed (at least 1).
        batch_size: Images per step (the global batch).

    Returns:
        steps, images, seconds, seconds_per_step and images_per_s of the timed steps.
    """
    start = ends.get(warmup_steps - 1)
    last = max(ends, default=-1)
    if start is None or last < warmup_steps:
        raise UserError(
            f"training stopped after {last + 1} step(s), before the {warmup_steps} warm-up "
            "step(s) and a timed step were done; nothing to measure"
        )
    steps = last - (warmup_steps - 1)
    seconds = ends[last] - start
    return {
        "steps": steps,
        "images": steps * batch_size,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "images_per_s": steps * batch_size / seconds if seconds > 0 else None,
    }


def peak_host_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _gpu_names() -> list[str]:
    return [device.name for device in tf.config.list_logical_devices("GPU")]


def _reset_gpu_peaks() -> None:
    for name in _gpu_names():
        tf.config.experimental.reset_memory_stats(name)


def peak_gpu_mb() -> float | None:
    """TensorFlow's peak GPU memory since the last reset, in MiB (the largest of the GPUs);
    None without a GPU."""
    names = _gpu_names()
    if not names:
        return None
    return max(tf.config.experimental.get_memory_info(name)["peak"] for name in names) / 2**20


def environment() -> dict[str, Any]:
    """Versions, devices and the CPU settings the figures were measured under."""
    info = devices.describe()
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # platform.processor() is empty or just "x86_64" on Linux
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    info.update(
        python=platform.python_version(),
        keras=keras.__version__,
        platform=platform.platform(),
        cpu=cpu,
        tf_enable_onednn_opts=os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        ld_preload=os.environ.get("LD_PRELOAD") or None,
    )
    return info


def _settings(cfg: DictConfig) -> tuple[int, int, int]:
    """(warmup_steps, steps, eval_images), checked against `trainer.steps_per_execution`."""
    options = cfg.benchmark
    per_call = cfg.trainer.steps_per_execution
    warmup, steps = options.warmup_steps, options.steps
    # Keras reports steps to callbacks once per call of k steps; the warm-up / timed boundary
    # and the end must fall on such a report.
    if warmup % per_call or steps % per_call:
        raise UserError(
            f"benchmark.warmup_steps={warmup} and benchmark.steps={steps} must be multiples of "
            f"trainer.steps_per_execution={per_call}"
        )
    return warmup, steps, options.eval_images


def measure_training(
    cfg: DictConfig, source, warmup_steps: int, steps: int
) -> tuple[keras.Model, dict[str, Any]]:
    """Builds and compiles the model as `mode=train` does and times its steps on real data.

    Args:
        cfg: The composed config.
        source: The dataset (`build_source(cfg.data)`).
        warmup_steps: Untimed steps first.
        steps: Timed steps after them.

    Returns:
        (the single-output model, for evaluation; the training figures).
    """
    strategy = instantiate.distribution_strategy(cfg)
    batch_size = cfg.data.batch_size
    distribute.per_replica_batch(batch_size, strategy)  # refuses a batch that does not split
    # The schedule's length as a training run of this config would set it; it changes the
    # learning rate, not the cost of a step.
    steps_per_epoch, epochs = instantiate.run_length(cfg, source.num_examples("train"))
    view = instantiate.build_and_compile(cfg, strategy, source, steps_per_epoch, epochs)
    model, train_model = view.model, view.train_model
    # The stream train.py fits on (_Datasets.train there): seeded order, augmentation, batching.
    stream = pipeline.train_dataset(source, pipeline_options(cfg), cfg.seed, repeat=True)
    stream = view.wrap_dataset(fit.shard_by_data(stream))
    per_call = cfg.trainer.steps_per_execution
    clock = StepClock()
    # The warm-up's steps are left out of the stall share too (it counts Keras' calls).
    stall = DataStallMonitor(skip_steps=warmup_steps // per_call)
    callbacks = [
        NaNGuard(f"optimizer.learning_rate={cfg.optimizer.learning_rate}"),
        stall,
        clock,
    ]
    log.info(
        "Benchmark: %d warm-up + %d timed steps of %s, batch %d, crop %s",
        warmup_steps,
        steps,
        model.name,
        batch_size,
        list(cfg.data.crop_size),
    )
    _reset_gpu_peaks()
    # Keras warns that fit's default shuffle=True is ignored for datasets; tf.data shuffles.
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    with data_errors_as_user_errors():  # a broken file: one line naming it
        # One fit call: a second would start a new input iterator, whose buffers refill.
        train_model.fit(
            stream,
            epochs=1,
            steps_per_epoch=warmup_steps + steps,
            callbacks=callbacks,
            verbose=0,
        )
    figures = training_speed(clock.ends, warmup_steps, batch_size)
    figures.update(
        warmup_steps=warmup_steps,
        batch_size=batch_size,
        crop_size=list(cfg.data.crop_size),
        data_stall=stall.history[-1] if stall.history else None,
        data_stall_note=(
            f"not measured with {stall.inactive_reason}" if stall.inactive_reason else None
        ),
        replicas=strategy.num_replicas_in_sync,
        strategy=type(strategy).__name__,
        precision=cfg.trainer.precision,
        jit_compile=bool(train_model.jit_compile),
        steps_per_execution=per_call,
        params=model.count_params(),
        peak_host_mb=peak_host_mb(),
        peak_gpu_mb=peak_gpu_mb(),
    )
    return model, figures


def measure_eval(model: keras.Model, cfg: DictConfig, images: int) -> dict[str, Any]:
    """Times `images` images of `eval.split` through the evaluation's own prediction path.

    One image is predicted first, untimed: it traces the Predictor's network (and starts the
    CRF workers when `postprocess` asks for them). Decoding is part of the timed loop, as it is
    part of an evaluation.

    Args:
        model: The single-output model.
        cfg: The composed config (`eval`, `postprocess`, `data`).
        images: How many images to time; 0 skips the evaluation.
    """
    split = cfg.eval.split
    figures: dict[str, Any] = {
        "split": split,
        "mode": cfg.eval.mode,
        "images": 0,
        "seconds": None,
        "images_per_s": None,
    }
    if not images:
        return figures
    _reset_gpu_peaks()
    evaluator = SplitEvaluator(model, cfg, split)
    examples = evaluator.examples.take(images + 1).as_numpy_iterator()
    stream = predict_stream(examples, evaluator.predictor, evaluator.crf)
    count = 0
    with data_errors_as_user_errors():
        if next(stream, None) is not None:  # the warm-up image
            start = time.perf_counter()
            count = sum(1 for _ in stream)
            seconds = time.perf_counter() - start
    if count:
        figures.update(images=count, seconds=seconds, images_per_s=count / seconds)
    else:
        log.warning("Benchmark: eval.split=%s has fewer than 2 images; eval not timed", split)
    if count < images:
        log.warning(
            "Benchmark: eval.split=%s gave %d timed images of benchmark.eval_images=%d",
            split,
            count,
            images,
        )
    figures.update(peak_host_mb=peak_host_mb(), peak_gpu_mb=peak_gpu_mb())
    return figures


def _run_description(cfg: DictConfig) -> dict[str, Any]:
    """The config groups chosen and the command-line overrides, when run by Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"choices": None, "overrides": None}
    hydra_cfg = HydraConfig.get()
    choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
    return {
        "choices": {k: v for k, v in choices.items() if not k.startswith("hydra")},
        "overrides": list(hydra_cfg.overrides.task),
    }


def run(cfg: DictConfig) -> None:
    """Benchmarks `cfg`'s training and evaluation; writes benchmark.json and prints a table."""
    run_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(run_dir, ignore=(".hydra",))
    warmup_steps, steps, eval_images = _settings(cfg)
    keras.backend.clear_session()  # a sweep runs its jobs in one process
    runtime.seed_everything(cfg.seed)
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    distribute.set_precision(cfg.trainer.precision)
    source = build_source(cfg.data)
    model, train = measure_training(cfg, source, warmup_steps, steps)
    evaluation = measure_eval(model, cfg, eval_images)
    report = {
        "model": model.name,
        "data": cfg.data.name,
        **_run_description(cfg),
        "train": train,
        "eval": evaluation,
        "memory": {
            "peak_host_mb": peak_host_mb(),
            "peak_gpu_mb": max(
                (v for v in (train["peak_gpu_mb"], evaluation.get("peak_gpu_mb")) if v),
                default=None,
            ),
        },
        "environment": environment(),
    }
    write_json_atomic(run_dir / REPORT_NAME, report)
    print_table(report, Console())
    log.info("Benchmark report in %s", run_dir / REPORT_NAME)


def _number(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def print_table(report: dict[str, Any], console: Console) -> None:
    """The figures of a benchmark report as one table."""
    train, evaluation, memory = report["train"], report["eval"], report["memory"]
    env = report["environment"]
    gpus = ", ".join(g["model"] for g in env["gpus"]) or f"CPU only ({env['cpu']})"
    table = Table(title=f"seg-train benchmark: {report['model']} on {report['data']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    stall = train["data_stall"]
    rows = [
        ("train images/s", _number(train["images_per_s"])),
        ("train s/step", _number(train["seconds_per_step"], 4)),
        ("timed steps (after warm-up)", f"{train['steps']} (after {train['warmup_steps']})"),
        (
            "batch x crop",
            f"{train['batch_size']} x {train['crop_size'][0]}x{train['crop_size'][1]}",
        ),
        (
            "data stall",
            (train["data_stall_note"] or "n/a") if stall is None else f"{100 * stall:.1f}%",
        ),
        (
            f"eval images/s ({evaluation['split']}, {evaluation['mode']})",
            f"{_number(evaluation['images_per_s'])} over {evaluation['images']} images",
        ),
        ("peak host memory", _number(memory["peak_host_mb"], 0, " MiB")),
        ("peak GPU memory", _number(memory["peak_gpu_mb"], 0, " MiB")),
        ("devices", f"{gpus}; {env['cpu_cores']} cores"),
        (
            "versions",
            f"TensorFlow {env['tensorflow']}, Keras {env['keras']}, Python {env['python']}",
        ),
        ("precision / XLA", f"{train['precision']} / {'on' if train['jit_compile'] else 'off'}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
