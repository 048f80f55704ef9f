"""The devices a run uses: a loud refusal when asked-for GPUs are missing, and a record of them.

A GPU user whose TensorFlow cannot reach CUDA would otherwise train on the CPU without a word
(plain `tensorflow` on Linux brings no CUDA libraries; `seg-train[gpu]` does). So when the
`hardware` config asks for GPUs (`hardware.require_gpu`, set by `hardware=gpu|multi_gpu`), the
run stops before anything is built, naming what TensorFlow sees and the likely cause.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seg_train.errors import UserError

log = logging.getLogger(__name__)

DEVICES_FILE = "devices.json"


def prepare(hardware: Mapping[str, Any]) -> None:
    """Turns on GPU memory growth and refuses to run without the GPUs `hardware` asks for.

    Must run before TensorFlow initialises its devices (memory growth cannot be set later).

    Raises:
        UserError: if `hardware.require_gpu` is set and TensorFlow sees no GPU, or fewer GPUs
            than `hardware.devices` names.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if hardware.get("memory_growth", True):
        # Allocate GPU memory as needed instead of all of it up front, so several jobs (a
        # joblib sweep, a colleague's run) can share one box.
        for gpu in gpus:
            # RuntimeError: already initialised (the second job of an in-process sweep).
            with contextlib.suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
    if not hardware.get("require_gpu"):
        return
    wanted = len(hardware["devices"]) if hardware.get("devices") else 1
    if len(gpus) >= wanted:
        return
    raise UserError(missing_gpu_message(hardware.get("name", "gpu"), wanted, len(gpus)))


def missing_gpu_message(option: str, wanted: int, found: int) -> str:
    """One line: what TensorFlow sees, the likely causes and the fix."""
    return (
        f"hardware={option} needs {wanted} GPU{'s' if wanted > 1 else ''} but TensorFlow sees "
        f"{found}: {missing_gpu_causes()}; or train on the CPU with hardware=cpu"
    )


def missing_gpu_causes() -> str:
    """Why TensorFlow may see fewer GPUs than expected, most likely first, `;`-separated."""
    import tensorflow as tf

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    causes = []
    if not tf.test.is_built_with_cuda():
        causes.append("this TensorFlow build has no CUDA support")
    if visible is not None and not visible.strip(" ,"):
        causes.append("CUDA_VISIBLE_DEVICES is empty (unset it or list GPU ids)")
    if not _loadable("libcuda.so.1"):
        causes.append("no NVIDIA driver (libcuda.so.1 not found; nvidia-smi should list the GPUs)")
    if not _cuda_runtime_installed():
        causes.append(
            "TensorFlow's CUDA libraries are not installed (plain `tensorflow` brings none on "
            "Linux): bash scripts/install.sh gpu, i.e. pip install -e '.[gpu]'"
        )
    if not causes:
        causes.append(
            f"CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'} may hide "
            "them; compare with nvidia-smi"
        )
    return "; ".join(causes)


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _cuda_runtime_installed() -> bool:
    """Whether the CUDA runtime this TensorFlow was built against can be found: pip's
    nvidia-* wheels (what `tensorflow[and-cuda]` installs) or a system libcudart of the same
    major version (another version, e.g. a newer system CUDA, does not serve)."""
    import tensorflow as tf

    if importlib.util.find_spec("nvidia") is not None and (
        importlib.util.find_spec("nvidia.cuda_runtime") is not None
    ):
        return True
    major = str(tf.sysconfig.get_build_info().get("cuda_version", "")).split(".")[0]
    return bool(major) and _loadable(f"libcudart.so.{major}")


def describe() -> dict:
    """The devices TensorFlow will use and the CUDA / cuDNN versions it was built with."""
    import tensorflow as tf

    build = tf.sysconfig.get_build_info()
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(
            {
                "name": device.name,
                "model": details.get("device_name", "unknown"),
                "compute_capability": ".".join(map(str, capability)) if capability else None,
                "memory_gb": _gpu_memory_gb(device.name),
            }
        )
    return {
        "tensorflow": tf.__version__,
        "built_with_cuda": tf.test.is_built_with_cuda(),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": gpus,
        "cpu_cores": os.cpu_count(),
    }


def _gpu_memory_gb(name: str) -> float | None:
    """A GPU's total memory from nvidia-smi (TensorFlow does not report it), if available."""
    index = int(name.rsplit(":", 1)[-1])
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=memory.total",
                "--format=csv,noheader,nounits",
                "-i",
                physical,
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return round(float(out.strip().splitlines()[0]) / 1024, 1)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def record(run_dir: Path) -> dict:
    """Logs the devices this run trains on and writes them to `run_dir/devices.json`."""
    info = describe()
    if info["gpus"]:
        for gpu in info["gpus"]:
            log.info(
                "Device %s: %s, compute capability %s, %s GB; TensorFlow %s built with CUDA %s, "
                "cuDNN %s",
                gpu["name"],
                gpu["model"],
                gpu["compute_capability"],
                gpu["memory_gb"] if gpu["memory_gb"] is not None else "?",
                info["tensorflow"],
                info["cuda_version"],
                info["cudnn_version"],
            )
    else:
        log.info(
            "Device: CPU only (%d cores; TensorFlow %s, CUDA build: %s)",
            info["cpu_cores"] or 1,
            info["tensorflow"],
            "yes" if info["built_with_cuda"] else "no",
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DEVICES_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info
