"""The GPU-box shell scripts: shellcheck-clean, dry paths run, and early clear failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPTS = sorted((REPO / "scripts").glob("*.sh")) + [REPO / ".ci" / "run"]


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DRY_RUN": "1", **(env or {})}
    return subprocess.run(
        ["bash", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60
    )


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_train_dry_run_prints_the_command():
    result = run_script("scripts/train.sh", "synthetic_unet_classic", "cpu", "trainer.epochs=1")
    assert result.returncode == 0, result.stderr
    assert "experiment=synthetic_unet_classic hardware=cpu trainer.epochs=1" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_experiment", "cpu"], "no experiment 'no_such_experiment'"),
        (["synthetic_unet_classic", "zero"], "GPUS must look like"),
        (["synthetic_unet_classic"], "usage"),
    ],
)
def test_train_fails_early_with_a_clear_message(args, message):
    result = run_script("scripts/train.sh", *args)
    assert result.returncode == 2 and message in result.stderr


def test_train_on_gpus_without_a_driver_says_so(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    result = run_script("scripts/train.sh", "synthetic_unet_classic", "0,1")
    assert result.returncode == 2 and "nvidia-smi not found" in result.stderr


def test_sweep_dry_run_uses_the_joblib_launcher():
    result = run_script("scripts/sweep.sh", "2", "0", "seed=1,2")
    assert result.returncode == 0, result.stderr
    assert "-m hydra/launcher=joblib hydra.launcher.n_jobs=2 hardware=cpu seed=1,2" in result.stdout


@pytest.mark.parametrize("dataset", ["voc", "voc_aug", "pets", "cihp", "portrait"])
def test_prepare_data_dry_runs(dataset, tmp_path):
    result = run_script("scripts/prepare_data.sh", dataset, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Train with: seg-train data=" in result.stdout


def test_prepare_data_checks_layouts_it_cannot_download(tmp_path):
    result = run_script("scripts/prepare_data.sh", "cihp", str(tmp_path), env={"DRY_RUN": "0"})
    assert result.returncode == 2 and "instance-level_human_parsing" in result.stderr
    result = run_script("scripts/prepare_data.sh", "mnist", str(tmp_path))
    assert result.returncode == 2 and "unknown dataset" in result.stderr
