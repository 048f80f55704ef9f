"""Process set-up that must happen before TensorFlow is imported, and the config printout."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from seg_train.errors import UserError

RESOLVED_CONFIG_NAME = "config_resolved.yaml"
# The configs live beside the package in a source checkout (the README installs it editable);
# SEG_TRAIN_CONFIG_DIR points elsewhere, e.g. for a copy of the configs you edit.
CONFIG_DIR = Path(
    os.environ.get("SEG_TRAIN_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs")
)


def prepare_environment(cfg: DictConfig) -> None:
    """Sets the environment variables TensorFlow reads at import time.

    Has no effect on a TensorFlow that is already imported (e.g. the second job of a sweep).
    """
    devices = job_devices(cfg.hardware, HydraConfig.get().job.get("num") or 0)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    # TensorFlow leaves oneDNN off on some CPUs; measured 1.25-1.7x faster training here.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    # Hide TensorFlow's C++ start-up chatter (CUDA stubs, CPU feature notes); errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's Python logger reports every cross-device reduction at INFO under Hydra's
    # logging set-up; its warnings are what matters.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # Threads stay at TensorFlow's defaults (intra-op and inter-op pools = all cores): one
    # intra-op thread nearly halves training speed here, one inter-op thread is neutral
    # (DESIGN.md section 6). An allocator preload (tcmalloc / jemalloc) is the user's choice;
    # it is reported so benchmark figures can be compared (benchmarks/run_all.py).
    logging.getLogger(__name__).info(
        "CPU settings: TF_ENABLE_ONEDNN_OPTS=%s, threads = TensorFlow defaults (%d cores), "
        "LD_PRELOAD=%s",
        os.environ["TF_ENABLE_ONEDNN_OPTS"],
        os.cpu_count() or 1,
        os.environ.get("LD_PRELOAD") or "none",
    )


def job_devices(hardware: DictConfig, job_num: int) -> list[int] | None:
    """The GPU ids this job may use.

    With `hardware.gpus_per_job=K`, job n of a sweep gets the n-th group of K ids (from
    `hardware.devices` if given, else 0, 1, 2, ...), so parallel jobs never share a GPU.
    """
    per_job = hardware.get("gpus_per_job")
    if not per_job:
        return None if hardware.devices is None else list(hardware.devices)
    pool = list(hardware.devices) if hardware.devices else None
    start = job_num * per_job
    if pool is not None and start + per_job > len(pool):
        raise UserError(
            f"job {job_num} needs GPUs {start}..{start + per_job - 1} of hardware.devices={pool}; "
            "list more devices, lower hardware.gpus_per_job or run fewer jobs in parallel"
        )
    return (
        pool[start : start + per_job] if pool is not None else list(range(start, start + per_job))
    )


def print_and_save_config(cfg: DictConfig, run_dir: Path) -> None:
    """Prints the resolved config as a tree of sections and saves it as YAML in the run dir."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tree = Tree("[bold]config[/bold]")
    for section, value in resolved.items():
        branch = tree.add(f"[bold cyan]{section}[/bold cyan]")
        text = OmegaConf.to_yaml(value) if isinstance(value, (dict, list)) else f"{value}\n"
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    Console().print(tree)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESOLVED_CONFIG_NAME).write_text(OmegaConf.to_yaml(resolved))


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and TensorFlow (imports Keras, so call it after the set-up above)."""
    import keras

    keras.utils.set_random_seed(seed)
