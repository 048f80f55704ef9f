"""One process per run dir: `RUN_DIR/run.lock`, naming its holder (PID, host, start time).

Two trainings started into the same `hydra.run.dir` would overwrite each other's history,
checkpoints and backups. The lock is an exclusive `flock` on the file, held for as long as the
process uses the run dir; the kernel drops it when the process dies, so a lock file left by a
killed process is simply taken over. Where `flock` is not supported, the file's PID decides: a
holder on this host whose PID is gone is taken over.

No TensorFlow import here: the CLI takes the lock before Hydra writes anything into the run dir.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from seg_train.errors import UserError

LOCK_NAME = "run.lock"
# Run dirs this process holds: resolved path -> (lock file descriptor, dir created by us).
_held: dict[Path, tuple[int, bool]] = {}


class RunDirInUse(UserError):
    """Another live process holds the run dir."""


def acquire(run_dir: Path) -> bool:
    """Takes the run dir's lock for this process.

    Args:
        run_dir: The run dir (created if missing).

    Returns:
        True if taken now, False if this process already held it.

    Raises:
        RunDirInUse: another live process holds it (the message names its PID and host).
    """
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        return False
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_or_check(fd, path, run_dir)
        except BaseException:
            os.close(fd)
            raise
        # The previous holder may have removed the file between our open and our lock.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[key] = (fd, created)
    return True


def _lock_or_check(fd: int, path: Path, run_dir: Path) -> None:
    """flock the file, or where flock is unsupported, check the recorded holder is gone."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirInUse(_busy_message(run_dir, path, _read(fd))) from None
    # No flock on this file system: trust the PID file.
    holder = _read(fd)
    if holder and _alive(holder):
        raise RunDirInUse(_busy_message(run_dir, path, holder))


def release(run_dir: Path) -> None:
    """Gives the run dir's lock back (removes the lock file, and the dir if we made it empty)."""
    key = Path(run_dir).resolve()
    entry = _held.pop(key, None)
    if entry is None:
        return
    fd, created = entry
    path = key / LOCK_NAME
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()  # still locked: a waiting process re-checks the inode
    os.close(fd)
    if created:
        with contextlib.suppress(OSError):
            key.rmdir()  # only if empty: a command that failed before writing anything


def release_all() -> None:
    """Gives back every run dir this process holds."""
    for key in list(_held):
        release(key)


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Holds the run dir's lock for the block (unless this process held it already)."""
    taken = acquire(run_dir)
    try:
        yield
    finally:
        if taken:
            release(run_dir)


def _read(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _alive(record: dict) -> bool:
    """Whether a recorded holder may still run (one on another host cannot be checked)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _busy_message(run_dir: Path, path: Path, record: dict | None) -> str:
    who = (
        f"seg-train PID {record.get('pid')} on {record.get('host')} (since {record.get('since')})"
        if record
        else "another process"
    )
    return (
        f"run dir {run_dir} is in use by {who}; wait for it to end or stop it, or choose "
        f"another hydra.run.dir (lock file {path})"
    )
