"""Ctrl-C and SIGTERM between images, not inside TensorFlow.

Python runs a signal's handler (for Ctrl-C: raise KeyboardInterrupt) wherever the main thread is
when the signal arrives, in the middle of TensorFlow's Python code too (an eager op's dispatch,
a tf.function call, a tf.data iterator's next). TensorFlow does not expect that: 2 of 132
Ctrl-Cs during `mode=eval` (and one CI run) crashed the process in TensorFlow's calls (SIGSEGV,
or glibc's `free(): invalid next size` / `munmap_chunk(): invalid pointer`) instead of ending
with the one "interrupted" line; 0 of 398 with this module (the same eval, the same signal).
`between_items` notes the signal instead and runs the handler it replaced at the loop's next
safe point, between two images.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def between_items(
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[Callable[[], None]]:
    """Defers `signals` to the safe points of a per-image loop.

    Yields a function to call between items: it runs the handler that was installed before
    (e.g. raise KeyboardInterrupt, or the training run's `Preempted`) for a signal received
    since the last call. A second signal before that runs it at once: a Ctrl-C that is
    repeated should not wait for a slow image. Signals whose handler is not a Python function
    (the default action, ignored) are left alone, as is everything outside the main thread,
    where Python cannot set handlers.

    Example:
        with between_items() as safe_point:
            for image in images:
                predict(image)
                safe_point()
    """
    received: tuple[int, object] | None = None  # (signum, frame) not yet handled
    previous: dict[int, Callable] = {}

    def note(signum: int, frame) -> None:
        nonlocal received
        if received is not None:  # the second signal: run the replaced handler now
            previous[signum](signum, frame)
            return
        received = (signum, frame)

    def safe_point() -> None:
        nonlocal received
        if received is not None:
            signum, frame = received
            received = None
            previous[signum](signum, frame)

    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            handler = signal.getsignal(signum)
            if callable(handler):
                previous[signum] = handler
                signal.signal(signum, note)
    try:
        yield safe_point
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        safe_point()  # a signal noted after the loop's last safe point still counts
