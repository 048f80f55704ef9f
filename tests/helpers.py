"""Helpers for tests: composing the real configs and running the real `seg-train` CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from seg_train.data.options import PipelineOptions

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"
# Flags that make a training run take seconds: tiny data, tiny U-Net, one short epoch.
TINY_TRAIN = [
    "data.source.num_train=24",
    "data.source.num_val=8",
    "data.source.image_size=32",
    "data.crop_size=[32,32]",
    "data.batch_size=8",
    "model.base_filters=4",
    "model.depth=3",
    "trainer.epochs=2",
    "eval.num_samples=2",
]

# Flags for a seconds-long training run on a dataset's own (tiny, generated) files.
TINY_DATASET_RUN = [
    "debug=fast",
    "model.base_filters=4",
    "model.depth=3",
    "data.crop_size=[32,32]",
    "data.batch_size=2",
]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Composes configs/config.yaml the way the CLI does (without running a job)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def cli_env(cache: Path, env: dict | None = None) -> dict:
    """The environment for a CLI subprocess: ours, minus HYDRA_FULL_ERROR, plus the cache dir."""
    inherited = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**inherited, "SEG_TRAIN_CACHE_DIR": str(cache), **(env or {})}


def cli_command(args: Sequence[str]) -> list[str]:
    """`python -m seg_train ARGS` with this interpreter."""
    return [sys.executable, "-m", "seg_train", *args]


def run_cli(
    args: Sequence[str], cache: Path, cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Runs `python -m seg_train ARGS` as a user would, capturing its output."""
    return subprocess.run(
        cli_command(args),
        cwd=cwd,
        env=cli_env(cache, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_through_cli(args: Sequence[str], run_dir: Path, cache: Path, cwd: Path) -> dict:
    """Trains with `args` + `TINY_DATASET_RUN` in `run_dir`; asserts success, returns metrics."""
    result = run_cli([*args, *TINY_DATASET_RUN, f"hydra.run.dir={run_dir}"], cache, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr lines that are not TensorFlow's C++ start-up logging."""
    noise = ("WARNING: All log messages before absl", "I0000 ", "W0000 ", "E0000 ")
    return [
        line for line in result.stderr.splitlines() if line.strip() and not line.startswith(noise)
    ]


def trainable_count(model) -> int:
    """Trainable parameters of a Keras model (its `count_params()` counts all of them)."""
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)


def small_pipeline_options(**overrides) -> PipelineOptions:
    """Input-pipeline options for tiny folder datasets: 24x24 crops, scale 0.5..2, flips."""
    base = dict(
        crop_size=[24, 24],
        scale_range=[0.5, 2.0],
        hflip=True,
        ignore_label=255,
        batch_size=4,
        cache=False,
        shuffle_buffer=16,
        num_parallel_calls=None,
    )
    return PipelineOptions.from_mapping({**base, **overrides})
