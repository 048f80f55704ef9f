"""Crash-safe training: backups to resume from, preemption by signal, and a NaN guard.

A backup is `<run dir>/backup/` holding `state.weights.h5` (model weights and every optimizer
variable, including its step counter, so learning-rate schedules continue where they were) and
`state.json` (epoch, step within the epoch, best monitored value of the checkpoint callback,
whether the run finished). It is written into a temporary folder that then replaces the old
backup by renames, so a kill at any moment leaves a complete backup (`backup/` or, between the
two renames, `backup.prev/`).

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
from dataclasses import asdict, dataclass
from pathlib import Path

import keras

from seg_train.errors import Preempted, UserError

log = logging.getLogger(__name__)

BACKUP = "backup"
PREVIOUS = "backup.prev"
WEIGHTS = "state.weights.h5"
STATE = "state.json"


@dataclass
class TrainingState:
    """Where a training run is: the next epoch, batches already done in it, and more."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best: float | None = None
    finished: bool = False


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite."""


def load_state(run_dir: Path) -> tuple[TrainingState, Path] | None:
    """The newest complete backup of a run: (state, weights file), or None if there is none."""
    for name in (BACKUP, PREVIOUS):
        folder = run_dir / name
        if (folder / STATE).is_file() and (folder / WEIGHTS).is_file():
            return TrainingState(**json.loads((folder / STATE).read_text())), folder / WEIGHTS
    return None


def write_backup(run_dir: Path, model: keras.Model, state: TrainingState) -> None:
    """Writes a backup next to the current one, then swaps it into place by renames."""
    staging = run_dir / f".{BACKUP}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
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
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, path)


class BackupCallback(keras.callbacks.Callback):
    """Backs up every `every_steps` batches and at each epoch end; stops on SIGTERM/SIGINT.

    Args:
        run_dir: The run dir (the backup goes to `run_dir/backup`).
        every_steps: Batches between backups; 0 = only at epoch ends.
        checkpoint: The best-model checkpoint callback whose `best` value is saved, or None.
        state: The state the run (re)starts from.
    """

    def __init__(self, run_dir: Path, every_steps: int, checkpoint, state: TrainingState):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.every_steps = every_steps
        self.checkpoint = checkpoint
        self.state = TrainingState(state.epoch, state.step, state.global_step, state.best)
        self.signal_received: str | None = None
        self._previous_handlers: dict = {}

    # Signals are only noted here; the backup happens at the next batch end, between steps.
    def _on_signal(self, signum, frame) -> None:
        if self.signal_received:  # a second Ctrl-C: stop now, without a backup
            raise KeyboardInterrupt
        self.signal_received = signal.Signals(signum).name
        log.warning(
            "%s received: stopping after this batch to write a backup", self.signal_received
        )

    def on_train_begin(self, logs=None) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, logs=None) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if epoch != self.state.epoch:
            self.state.epoch, self.state.step = epoch, 0

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        self.state.step += 1
        if self.signal_received:
            self._save()
            self.model.stop_training = True
            raise Preempted(
                f"stopped by {self.signal_received} at epoch {self.state.epoch + 1}, batch "
                f"{self.state.step}; backup in {self.run_dir / BACKUP}; continue with: "
                f"seg-train trainer.resume={self.run_dir}"
            )
        if (
            self.every_steps
            and int(self.model.optimizer.iterations.numpy()) % self.every_steps == 0
        ):
            self._save()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.state.epoch, self.state.step = epoch + 1, 0
        self._save()

    def _save(self) -> None:
        self.state.global_step = int(self.model.optimizer.iterations.numpy())
        if self.checkpoint is not None and self.checkpoint.best is not None:
            best = float(self.checkpoint.best)
            self.state.best = best if math.isfinite(best) else None
        write_backup(self.run_dir, self.model, self.state)


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

    def _save_model(self, epoch, batch, logs):
        final = Path(self._get_file_path(epoch, batch, logs))
        temporary = final.with_name(f".tmp-{os.getpid()}-{final.name}")
        template, self.filepath = self.filepath, str(temporary)
        fitted = self._model
        if self.model_to_save is not None:
            self._model = self.model_to_save  # Keras' _save_model saves self.model
        try:
            super()._save_model(epoch, batch, logs)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        finally:
            self.filepath = template
            self._model = fitted
        if temporary.exists():
            os.replace(temporary, final)
