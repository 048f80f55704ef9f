"""The GPU path on a real GPU (`pytest -m gpu`); skipped, with the reason, where none is seen."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from tests.helpers import TINY_TRAIN, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not tf.config.list_physical_devices("GPU"),
        reason="no GPU visible to TensorFlow (CPU-only machine or CUDA libraries missing: "
        "bash scripts/install.sh gpu)",
    ),
]


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_training_runs_on_the_gpu(cache_dir, tmp_path, precision):
    run_dir = tmp_path / "run"
    result = run_cli(
        ["hardware=gpu", f"trainer.precision={precision}", *TINY_TRAIN, f"hydra.run.dir={run_dir}"],
        cache_dir,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((run_dir / "devices.json").read_text())
    assert recorded["gpus"], recorded
    assert json.loads((run_dir / "metrics.json").read_text())["mean_iou"] > 0.0
