"""Small file helpers: atomic writes, and the guard that keeps runs from overwriting each other."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seg_train.errors import UserError, is_no_space

# Files whose presence marks a run dir as already used by an earlier run.
RUN_OUTPUTS = (
    ".hydra",
    "multirun.yaml",
    "metrics.json",
    "checkpoints",
    "history.csv",
    "predictions",
    "backup",
    "benchmark.json",
)


# What a training run killed before its first backup leaves: it may simply be started again.
RESTARTABLE = (".hydra", "history.csv")


# Head room kept on top of a write's expected size (file-system metadata, logs).
SPACE_MARGIN = 1 << 20


class DiskFull(UserError):
    """A write failed (or would fail) for lack of disk space; partial files were removed."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    return shutil.disk_usage(existing).free


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"  # pragma: no cover


def disk_full(path: Path, reason: str, needed: int | None = None, kept: str = "") -> DiskFull:
    """The one-line error for a write that failed or would fail for lack of space."""
    free = human_bytes(free_bytes(path))
    need = f", about {human_bytes(needed)} needed" if needed else ""
    keep = f"; {kept}" if kept else ""
    return DiskFull(
        f"cannot write {path}: {reason} ({free} free there{need}); nothing partial was left "
        f"behind{keep}; free some space or choose another location, then run again"
    )


def ensure_free_space(path: Path, needed: int, kept: str = "") -> None:
    """Refuses a write of about `needed` bytes to `path` before it starts.

    For writers that cannot fail cleanly: h5py, out of space, raises and then crashes the
    process while freeing its handles, so the weights files are checked beforehand.
    """
    if free_bytes(path) < needed + SPACE_MARGIN:
        # The figure quoted includes the head room, so "free" is always below "needed".
        raise disk_full(path, "not enough free disk space", needed + SPACE_MARGIN, kept)


@contextmanager
def no_partial_files(path: Path, *partial: Path, kept: str = "") -> Iterator[None]:
    """On any error removes `partial` (files or folders); a full disk becomes `DiskFull`.

    Args:
        path: The file being written, named in the message.
        partial: What the write may have left half-done.
        kept: What was kept, for the message (e.g. "the last good backup was kept").
    """
    try:
        yield
    except BaseException as exc:
        for item in partial:
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        if is_no_space(exc):
            raise disk_full(path, os.strerror(exc.errno), kept=kept) from exc
        raise


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(temporary)` and renames the temporary to `path`.

    The temporary (`.tmp-PID-NAME`, same suffix, so writers that go by the suffix work) is
    removed on any error, so a kill, Ctrl-C or full disk never leaves a partial file under
    `path`; a full disk is reported as `DiskFull`.
    """
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with no_partial_files(path, tmp):
        write(tmp)
        os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes JSON to a temporary name and renames it, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with no_partial_files(path, tmp):
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
