"""Crash-safe training: backups to resume from, preemption by signal, and a NaN guard.

A backup is `<run dir>/backup/` holding `state.weights.h5` (model weights and every optimizer
variable, including its step counter, so learning-rate schedules continue where they were) and
`state.json` (epoch, step within the epoch, best monitored value of the checkpoint callback,
whether the run finished). It is written into a temporary folder that then replaces the old
backup by renames, so a kill at any moment leaves a complete backup (`backup/` or, between the
two renames, `backup.prev/`).

A backup never records a position "at the end of an epoch": one written after an epoch's last
batch says "next epoch, batch 0, and the end of the previous epoch (validation, checkpoint,
CSV row) is still to run", with that epoch's training logs, and a resume runs that end first
(`training.fit_from`). SIGTERM/SIGINT stop the run with exit status 75 and the resume command
at every phase: between batches and during validation after a backup, elsewhere at once
(`seg_train.training.preemption`).

Keras' own `BackupAndRestore` restores only the epoch, writes in place, and keeps neither the
checkpoint callback's best value nor the step within the epoch, hence this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import keras
import numpy as np

from seg_train.errors import Preempted, UserError
from seg_train.files import ensure_free_space, no_partial_files
from seg_train.training.preemption import resume_hint

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


class BackupCallback(keras.callbacks.Callback):
    """Backs up every `every_steps` batches and at each epoch end; stops on SIGTERM/SIGINT.

    A signal during training stops the run after the current batch, during validation at
    once, each after writing a backup; during the epoch end (checkpoint, CSV row) after the
    epoch-end backup. Exit status 75 and the resume command follow (`Preempted`).

    Args:
        run_dir: The run dir (the backup goes to `run_dir/backup`).
        every_steps: Batches between backups; 0 = only at epoch ends.
        checkpoint: The best-model checkpoint callback whose `best` value is saved, or None.
        state: The state the run (re)starts from.
        steps_per_epoch: Batches per epoch (a backup after an epoch's last batch records the
            next epoch with this one's end pending); None = the steps of the `fit` call.
    """

    def __init__(
        self,
        run_dir: Path,
        every_steps: int,
        checkpoint,
        state: TrainingState,
        steps_per_epoch: int | None = None,
    ):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.every_steps = every_steps
        self.checkpoint = checkpoint
        self.steps_per_epoch = steps_per_epoch
        self.state = TrainingState(state.epoch, state.step, state.global_step, state.best)
        self.signal_received: str | None = None
        self._previous_handlers: dict = {}
        # The epoch's training logs once its last batch is done, until its end has run.
        self._epoch_logs: dict | None = None

    # Signals are only noted here; the backup happens at the next batch end, between steps.
    def _on_signal(self, signum, frame) -> None:
        if self.signal_received:  # a second Ctrl-C: stop now, without a backup
            raise KeyboardInterrupt
        self.signal_received = signal.Signals(signum).name
        log.warning(
            "%s received: stopping after this batch to write a backup", self.signal_received
        )

    def on_train_begin(self, logs=None) -> None:
        if self.steps_per_epoch is None:
            self.steps_per_epoch = self.params.get("steps") or 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, logs=None) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if epoch != self.state.epoch:
            self.state.epoch, self.state.step = epoch, 0
        # A resumed half-done epoch is fitted from its batch `step`, numbered from 0 by Keras.
        self._first_step = self.state.step
        self._epoch_logs = None

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        # `batch` is the last step of the call (several with steps_per_execution > 1).
        self.state.step = self._first_step + batch + 1
        if self._at_epoch_end():
            self._epoch_logs = _plain_logs(logs)
        if self.signal_received:
            self._save()
            self.model.stop_training = True
            self._stop(f"at epoch {self.state.epoch + 1}, batch {self.state.step}")
        iterations = int(self.model.optimizer.iterations.numpy())
        if self.every_steps and iterations // self.every_steps > (
            self.state.global_step // self.every_steps
        ):
            self._save()

    def on_test_batch_end(self, batch: int, logs=None) -> None:
        # Validation inside fit, after the epoch's last batch: the weights are final.
        if self.signal_received and self._epoch_logs is not None:
            self._save()
            self._stop(f"during the validation of epoch {self.state.epoch + 1}")

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.state.epoch, self.state.step = epoch + 1, 0
        self._epoch_logs = None
        self._save()
        if self.signal_received:
            self._stop(f"at the end of epoch {epoch + 1}")

    def _at_epoch_end(self) -> bool:
        """Whether every batch of the current epoch is done (its end not yet run)."""
        return bool(self.steps_per_epoch) and self.state.step >= self.steps_per_epoch

    def _stop(self, where: str) -> None:
        raise Preempted(f"stopped by {self.signal_received} {where}; {resume_hint(self.run_dir)}")

    def _save(self) -> None:
        """Writes a backup of the current position (never "at the end" of an epoch)."""
        self.state.global_step = int(self.model.optimizer.iterations.numpy())
        if self.checkpoint is not None and self.checkpoint.best is not None:
            best = float(self.checkpoint.best)
            self.state.best = best if math.isfinite(best) else None
        position = self.state
        if self._at_epoch_end():
            position = replace(
                self.state,
                epoch=self.state.epoch + 1,
                step=0,
                pending_epoch_end=self._epoch_logs or {},
            )
        write_backup(self.run_dir, self.model, position)


def _plain_logs(logs: dict | None) -> dict:
    """Keras logs as JSON-ready floats."""
    return {str(k): float(v) for k, v in (logs or {}).items()}


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss with the step and the likely causes.

    Raises from the batch end, before any later callback (backup, checkpoint) can save the
    broken weights, so the last good checkpoint and backup stay as they were.

    Args:
        hints: Config facts to quote in the message (learning rate, precision).
    """

    def __init__(self, hints: str = ""):
        super().__init__()
        self.hints = hints
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(self.model.optimizer.iterations.numpy())
            raise NonFiniteLoss(
                f"training loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1} "
                f"(step {step}); likely causes: a learning rate too high, float16 overflow, or "
                f"labels outside 0..num_classes-1 that are not 255 ({self.hints}); "
                "the last good checkpoint and backup were kept"
            )


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that writes to a temporary name and renames it.

    A kill or an error during the save leaves the previous checkpoint in place, whole.
    Set `model_to_save` to save another model than the one being fitted (e.g. an uncompiled
    twin sharing its weights, or the single-output model behind a multi-output training view).
    """

    model_to_save: keras.Model | None = None

    def __init__(self, *args, verbose: int = 0, **kwargs):
        # Keras' own messages name the temporary file being written; `_should_save_model`
        # says the same with the checkpoint's own name.
        super().__init__(*args, verbose=0, **kwargs)
        self.report = verbose

    def _should_save_model(self, epoch, batch, logs, filepath):
        # Keras saves whenever the monitored value is missing, e.g. after an epoch that was not
        # validated (trainer.validation_freq > 1): that would replace the best checkpoint with
        # unvalidated weights. Keep the best one instead.
        if self.save_best_only and (logs or {}).get(self.monitor) is None:
            return False
        previous = self.best
        save = super()._should_save_model(epoch, batch, logs, filepath)
        if self.report > 0:
            final = Path(filepath)  # the temporary name `_save_model` writes to first
            final = final.with_name(final.name.removeprefix(f".tmp-{os.getpid()}-"))
            log.info("Epoch %d: %s", epoch + 1, self._describe(previous, logs, save, final))
        return save

    def _describe(self, previous, logs, save: bool, final: Path) -> str:
        """What the checkpoint did this epoch, naming the file as it will be found."""
        if not self.save_best_only:
            return f"saving {final}"
        was = "none" if previous is None or not math.isfinite(previous) else f"{previous:.5f}"
        if save:
            now = float(logs[self.monitor])
            return f"{self.monitor} improved from {was} to {now:.5f}; saving {final}"
        return f"{self.monitor} did not improve from {was}; {final.name} kept"

    def _save_model(self, epoch, batch, logs):
        final = Path(self._get_file_path(epoch, batch, logs))
        temporary = final.with_name(f".tmp-{os.getpid()}-{final.name}")
        template, self.filepath = self.filepath, str(temporary)
        fitted = self._model
        if self.model_to_save is not None:
            self._model = self.model_to_save  # Keras' _save_model saves self.model
        kept = "the previous checkpoint was kept" if final.exists() else ""
        try:
            # h5py crashes the process after an out-of-space error: check before writing.
            ensure_free_space(final, self._expected_bytes(final), kept)
            with no_partial_files(final, temporary, kept=kept):
                super()._save_model(epoch, batch, logs)
        finally:
            self.filepath = template
            self._model = fitted
        if temporary.exists():
            os.replace(temporary, final)

    def _expected_bytes(self, final: Path) -> int:
        """The checkpoint's expected size: the previous one's, or the variables' bytes."""
        estimate = variables_bytes(self.model, with_optimizer=not self.save_weights_only)
        return max(estimate, final.stat().st_size if final.is_file() else 0)
