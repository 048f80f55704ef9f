"""The `seg-train` command: the only `@hydra.main`, dispatching to train / eval / infer.

TensorFlow is imported only by the task modules, after `runtime.prepare_environment` has set
the environment variables that TensorFlow reads at import time, so `seg-train --help` stays fast.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from seg_train.errors import UserError
from seg_train.io_utils import ensure_fresh_run_dir

# The configs live beside the package in a source checkout (the README installs it editable);
# SEG_TRAIN_CONFIG_DIR points elsewhere, e.g. for a copy of the configs you edit.
CONFIG_DIR = Path(
    os.environ.get("SEG_TRAIN_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs")
)
EXIT_USER_ERROR = 2
log = logging.getLogger("seg_train")
# Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1); set by main().
_show_tracebacks = False


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _run_task(cfg: DictConfig) -> float | None:
    """Checks the composed config, prepares the process, and runs `cfg.mode.task`."""
    from seg_train import runtime
    from seg_train.config_checks import check_config

    try:
        check_config(cfg)
        runtime.prepare_environment(cfg)
        runtime.print_and_save_config(cfg, Path(cfg.paths.output_dir))
        task = hydra.utils.get_method(cfg.mode.task)
        return task(cfg)
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Let Hydra mark this job failed and run the others; main() reports it at the end.
            log.error("seg-train: error: %s", describe_error(exc))
            raise
        # Reported here rather than in main(): Hydra adds its own lines to errors leaving a job.
        _exit_with_one_line(exc)


def main() -> None:
    """Console-script entrypoint: runs Hydra and turns user errors into one-line messages."""
    # Hydra prints multi-line reports of its own unless this is set; with it set, Hydra re-raises
    # and we print exactly one line for errors the user can fix.
    global _show_tracebacks
    _show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _refuse_used_output_dirs(sys.argv[1:])
        _run_task()
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        _exit_with_one_line(exc)


def _refuse_used_output_dirs(args: list[str]) -> None:
    """Stops before Hydra writes `.hydra/` into a run dir named on the command line that an
    earlier run already used, so that run's saved config and outputs stay intact."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and value:
            ensure_fresh_run_dir(Path(value).expanduser())


def _exit_with_one_line(exc: BaseException) -> None:
    """Prints `seg-train: error: ...` and exits 2, or re-raises if the user wants tracebacks."""
    if _show_tracebacks:
        raise exc
    print(f"seg-train: error: {describe_error(exc)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def describe_error(exc: BaseException) -> str:
    """Returns a one-line explanation of a user error, naming the config key and the fix."""
    cause = exc.__cause__ if isinstance(exc.__cause__, (OmegaConfBaseException, UserError)) else exc
    if isinstance(cause, UserError):  # e.g. raised by a builder inside hydra.utils.instantiate
        return str(cause)
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in struct" in first_line:
        return _describe_unknown_key(cause)
    missing = re.search(r"Missing mandatory value: ([\w.]+)", str(cause))
    if isinstance(cause, MissingMandatoryValue) or missing:
        key = missing.group(1) if missing else getattr(cause, "full_key", "?")
        return f"config key '{key}' is required but has no value; set it, e.g. {key}=..."
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        available = ", ".join(exc.options or []) or "none"
        return (
            f"config group '{group}' has no option '{option}' (available: {available}); "
            "see seg-train --help"
        )
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"config key '{cause.full_key}': {first_line}"
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _describe_unknown_key(error: OmegaConfBaseException) -> str:
    parent = getattr(error, "parent_node", None)
    section, _, _ = error.full_key.rpartition(".")
    known = ""
    if OmegaConf.is_dict(parent):
        where = f" under '{section}'" if section else ""
        known = f" (known keys{where}: " + ", ".join(sorted(str(k) for k in parent)) + ")"
    return (
        f"unknown config key '{error.full_key}'{known}; fix the spelling, "
        f"or add a new key on purpose with +{error.full_key}=..."
    )


if __name__ == "__main__":
    main()
