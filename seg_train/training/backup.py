"""Crash-safe training: the backups a run resumes from (their callbacks, BackupCallback,
NaNGuard and AtomicModelCheckpoint, are in `seg_train.training.callbacks`).

A backup is `<run dir>/backup/` holding `state.weights.h5` (model weights and every optimizer
variable, including its step counter, so learning-rate schedules continue where they were) and
`state.json` (epoch, step within the epoch, best monitored value of the checkpoint callback,
whether the run finished). It is written into a temporary folder that then replaces the old
backup by renames, so a kill at any moment leaves a complete backup (`backup/` or, between the
two renames, `backup.prev/`).

A backup never records a position "at the end of an epoch": one written after an epoch's last
batch says "next epoch, batch 0, and the end of the previous epoch (validation, checkpoint,
CSV row) is still to run", with that epoch's training logs, and a resume runs that end first
(`seg_train.training.fit.fit_from`). SIGTERM/SIGINT stop the run with exit status 75 and the
resume command at every phase: between batches and during validation after a backup,
elsewhere at once (`seg_train.training.preemption`).

Keras' own `BackupAndRestore` restores only the epoch, writes in place, and keeps neither the
checkpoint callback's best value nor the step within the epoch, hence this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seg_train.errors import UserError
from seg_train.files import ensure_free_space, no_partial_files

if TYPE_CHECKING:  # keras is imported where used: the CLI reads a run's state before TF loads
    import keras

log = logging.getLogger(__name__)

BACKUP = "backup"
PREVIOUS = "backup.prev"
WEIGHTS = "state.weights.h5"
STATE = "state.json"


@dataclass
class TrainingState:
    """Where a training run is: the next epoch, batches already done in it, and more.

    Attributes:
        epoch: The next epoch to train (0-based).
        step: Batches of it already trained (always fewer than an epoch's batches).
        global_step: The optimizer's step counter.
        best: The checkpoint callback's best monitored value.
        finished: Whether the run completed (final evaluation included).
        pending_epoch_end: The training logs of epoch `epoch - 1` when its batches are all
            done but its end (validation, checkpoint, CSV row) is not; None otherwise.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best: float | None = None
    finished: bool = False
    pending_epoch_end: dict | None = None

    def start_batch(self, steps_per_epoch: int) -> int:
        """Batches of the run trained before this position."""
        return self.epoch * steps_per_epoch + self.step


def normalise(state: TrainingState, steps_per_epoch: int) -> TrainingState:
    """A state never "at the end" of an epoch: (E, N of N) becomes (E + 1, 0) with E's end pending.

    Backups written by older versions at an epoch's last batch say (E, N of N); resuming them
    as such asked Keras for 0 (= endless) or a negative number of steps.
    """
    if state.step < steps_per_epoch:
        return state
    log.info(
        "The backup was written after the last batch of epoch %d; its end is run first",
        state.epoch + 1,
    )
    pending = state.pending_epoch_end if state.pending_epoch_end is not None else {}
    return replace(state, epoch=state.epoch + 1, step=0, pending_epoch_end=pending)


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite."""


def load_state(run_dir: Path) -> tuple[TrainingState, Path] | None:
    """The newest complete backup of a run: (state, weights file), or None if there is none."""
    known = {f.name for f in fields(TrainingState)}
    for name in (BACKUP, PREVIOUS):
        folder = run_dir / name
        if (folder / STATE).is_file() and (folder / WEIGHTS).is_file():
            saved = json.loads((folder / STATE).read_text())
            state = TrainingState(**{k: v for k, v in saved.items() if k in known})
            return state, folder / WEIGHTS
    return None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Removes what killed processes left half-written: backup staging folders, checkpoint and
    state temporaries. Call it only while holding the run dir's lock (`run_lock`), when no
    other process can be writing them.

    Returns:
        The paths removed.
    """
    patterns = (
        f".{BACKUP}.tmp-*",  # write_backup's staging folder
        f"{BACKUP}/.{STATE}.tmp-*",  # mark_finished
        "checkpoints/.tmp-*",  # AtomicModelCheckpoint
        ".*.tmp-*",  # io_utils.write_json_atomic (metrics.json, ...)
    )
    removed = []
    for pattern in patterns:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info(
            "Removed %d temporary file(s) left by an earlier process: %s",
            len(removed),
            ", ".join(str(p.relative_to(run_dir)) for p in removed),
        )
    return removed


def variables_bytes(model: keras.Model, with_optimizer: bool = True) -> int:
    """Bytes of the model's variables (and its optimizer's): what a weights file holds."""
    import keras

    variables = list(model.weights)
    optimizer = getattr(model, "optimizer", None)
    if with_optimizer and optimizer is not None:
        variables += list(optimizer.variables)
    return sum(
        math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in variables
    )


def _expected_backup_bytes(run_dir: Path, model: keras.Model) -> int:
    """The size a new backup will have: the last one's, or the variables' when there is none."""
    sizes = [
        (run_dir / name / WEIGHTS).stat().st_size
        for name in (BACKUP, PREVIOUS)
        if (run_dir / name / WEIGHTS).is_file()
    ]
    return max([variables_bytes(model), *sizes])


def write_backup(run_dir: Path, model: keras.Model, state: TrainingState) -> None:
    """Writes a backup next to the current one, then swaps it into place by renames.

    The free space is checked first against the expected size (the last backup's): h5py,
    out of space mid-write, raises and then crashes the process, so a full disk stops the
    run with `DiskFull` (one line, exit 2) before the write, keeping the last good backup.
    """
    staging = run_dir / f".{BACKUP}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    kept = "the last good backup was kept" if load_state(run_dir) else ""
    target = run_dir / BACKUP  # what the message names (the staging folder is internal)
    ensure_free_space(target, _expected_backup_bytes(run_dir, model), kept)
    with no_partial_files(target, staging, kept=kept):
        staging.mkdir(parents=True)
        model.save_weights(staging / WEIGHTS)
        (staging / STATE).write_text(json.dumps(asdict(state)))
    current, previous = run_dir / BACKUP, run_dir / PREVIOUS
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        current.rename(previous)
    staging.rename(current)
    shutil.rmtree(previous, ignore_errors=True)


def mark_finished(run_dir: Path) -> None:
    """Records in the backup that the run completed, so a resume request ends at once."""
    found = load_state(run_dir)
    if found is None:
        return
    state, _ = found
    state.finished = True
    path = run_dir / BACKUP / STATE
    tmp = path.with_name(f".{STATE}.tmp-{os.getpid()}")
    with no_partial_files(path, tmp):
        tmp.write_text(json.dumps(asdict(state)))
        os.replace(tmp, path)
