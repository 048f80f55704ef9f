"""Small file helpers: atomic writes, and the guard that keeps runs from overwriting each other."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from seg_train.errors import UserError

# Files whose presence marks a run dir as already used by an earlier run.
RUN_OUTPUTS = (
    ".hydra",
    "multirun.yaml",
    "metrics.json",
    "checkpoints",
    "history.csv",
    "predictions",
    "backup",
)


# What a training run killed before its first backup leaves: it may simply be started again.
RESTARTABLE = (".hydra", "history.csv")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes JSON to a temporary name and renames it, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def ensure_fresh_run_dir(run_dir: Path, ignore: tuple[str, ...] = ()) -> None:
    """Refuses to reuse a run dir that already holds an earlier run's outputs.

    Args:
        run_dir: The directory to check.
        ignore: Entries to disregard (e.g. the `.hydra` folder the current job just wrote).
    """
    used = [name for name in RUN_OUTPUTS if name not in ignore and (run_dir / name).exists()]
    if used:
        raise UserError(
            f"run dir {run_dir} already holds an earlier run's outputs ({used[0]}); "
            "pick a new hydra.run.dir instead of overwriting it"
        )
