"""SIGTERM / SIGINT outside training batches: stop at once with exit 75 and the resume command.

A training process is preemptible at every phase. During `fit`'s batches and validation,
`resume.BackupCallback` notes the signal and stops after writing a backup; everywhere else
(start-up, between `fit` calls, the final evaluation) there is nothing newer to save than the
last backup, so the handler installed here raises `Preempted` at once, which the CLI prints as
one line with the resume command and exit status 75. (The final evaluation's per-image loop
runs it between two images: `seg_train.tasks.interrupts`.)

No TensorFlow import here: the CLI installs the handler before TensorFlow starts.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from seg_train.errors import Preempted

# What the message names: the run dir (None until it is known) and the process's phase.
_stop: dict = {"run_dir": None, "phase": "start-up"}


def stop_on_signals(run_dir: Path | None = None, phase: str | None = None) -> None:
    """From now on SIGTERM/SIGINT raise `Preempted` at once (the CLI exits 75).

    Call again to name the run dir and the phase in the message. Does nothing outside the main
    thread (Python delivers signals to the main thread only).

    Args:
        run_dir: The training run dir, once known.
        phase: What the process is doing, e.g. "start-up" or "the final evaluation".
    """
    if run_dir is not None:
        _stop["run_dir"] = Path(run_dir)
    if phase is not None:
        _stop["phase"] = phase
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _stop_now)


def _stop_now(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    run_dir = _stop["run_dir"]
    if run_dir is None or not (run_dir / ".hydra" / "overrides.yaml").is_file():
        raise Preempted(
            f"stopped by {name} during {_stop['phase']}, before the run dir was set up; "
            "nothing to resume: run the same command again"
        )
    raise Preempted(f"stopped by {name} during {_stop['phase']}; {resume_hint(run_dir)}")


def resume_hint(run_dir: Path) -> str:
    """Where the newest backup is (if any) and the command that continues the run."""
    backups = [run_dir / name for name in ("backup", "backup.prev")]
    found = next((b for b in backups if (b / "state.json").is_file()), None)
    where = f"backup in {found}" if found else "no backup yet (the resume starts it again)"
    return f"{where}; continue with: seg-train trainer.resume={run_dir}"
