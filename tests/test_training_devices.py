"""GPU requests on a machine without (visible) GPUs are refused loudly; devices are recorded."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from seg_train.errors import UserError
from seg_train.training import devices
from tests.helpers import REPO, TINY_TRAIN, error_lines, run_cli

# Hiding every GPU makes the refusal testable on any machine.
HIDDEN = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_hardware_gpu_without_a_gpu_exits_2_with_one_line_before_training(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        ["hardware=gpu", *TINY_TRAIN, f"hydra.run.dir={run_dir}"], cache_dir, tmp_path, HIDDEN
    )
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("seg-train: error: hardware=gpu needs 1 GPU but TensorFlow sees 0")
    assert "CUDA_VISIBLE_DEVICES is empty" in lines[0]
    assert "hardware=cpu" in lines[0]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "devices.json").exists()


def test_gpu_check_script_exits_2_with_one_line_without_a_gpu():
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--quick"],
        cwd=REPO,
        env={**os.environ, **HIDDEN},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("gpu_check: TensorFlow sees no GPU: "), lines


def test_require_gpu_counts_the_listed_devices(monkeypatch):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    one = OmegaConf.create(
        {"name": "gpu", "devices": [0], "require_gpu": True, "memory_growth": False}
    )
    devices.prepare(one)  # one GPU seen, one asked for: fine
    two = OmegaConf.create(
        {"name": "multi_gpu", "devices": [0, 1], "require_gpu": True, "memory_growth": False}
    )
    with pytest.raises(UserError, match=r"hardware=multi_gpu needs 2 GPUs but TensorFlow sees 1"):
        devices.prepare(two)
    cpu = OmegaConf.create({"name": "cpu", "devices": [], "require_gpu": False})
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    devices.prepare(cpu)  # nothing asked for, nothing refused


def test_an_empty_cuda_visible_devices_is_named_as_a_cause(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES is empty" in devices.missing_gpu_causes()


def test_record_writes_what_tensorflow_sees(tmp_path):
    info = devices.record(tmp_path)
    saved = json.loads((tmp_path / "devices.json").read_text())
    assert saved == info
    assert len(saved["gpus"]) == len(tf.config.list_physical_devices("GPU"))
    assert saved["cpu_cores"] == os.cpu_count()
    assert saved["tensorflow"] == tf.__version__
