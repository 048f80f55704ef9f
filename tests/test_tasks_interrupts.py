"""Ctrl-C / SIGTERM in a per-image loop land between two images (`tasks.interrupts`).

The signals are real: this process sends them to itself in the middle of an "image" (a short
sleep, which a signal interrupts), and the expected order of events is worked out by hand.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from seg_train.tasks.interrupts import between_items


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Python's own Ctrl-C handler, whatever the test runner's worker process installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _image(index: int, done: list[int], signals: dict[int, list[int]]) -> None:
    """One image's work: sends this process the signals planned for it, then finishes."""
    for signum in signals.get(index, []):
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the signal arrives here, in the middle of the image
    done.append(index)


def _loop(signals: dict[int, list[int]], count: int = 5) -> list[int]:
    done: list[int] = []
    with between_items() as safe_point:
        for index in range(count):
            _image(index, done, signals)
            safe_point()
    return done


def test_ctrl_c_in_an_image_stops_after_that_image():
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt), between_items() as safe_point:
        for index in range(5):
            _image(index, done, {2: [signal.SIGINT]})
            safe_point()
    assert done == [0, 1, 2]  # image 2 was finished, 3 never started
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_the_deferral_the_same_ctrl_c_cuts_the_image():
    """The control: Python's own handler raises inside image 2."""
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        for index in range(5):
            _image(index, done, {2: [signal.SIGINT]})
    assert done == [0, 1]


def test_a_second_ctrl_c_stops_at_once():
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt), between_items() as safe_point:
        for index in range(5):
            _image(index, done, {1: [signal.SIGINT, signal.SIGINT]})
            safe_point()
    assert done == [0]  # image 1 was cut short by the second signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_that_only_takes_note_runs_between_images_and_the_loop_goes_on():
    """As training's backup callback does with a first SIGTERM during validation."""
    seen: list[tuple[str, int]] = []
    done: list[int] = []

    def take_note(signum, frame):
        seen.append((signal.Signals(signum).name, len(done)))

    previous = signal.signal(signal.SIGTERM, take_note)
    try:
        with between_items() as safe_point:
            for index in range(4):
                _image(index, done, {1: [signal.SIGTERM]})
                assert seen == ([] if index <= 1 else [("SIGTERM", 2)])
                safe_point()
        assert done == [0, 1, 2, 3]
        # called once, between images 1 and 2 (two images done), not during image 1
        assert seen == [("SIGTERM", 2)]
        assert signal.getsignal(signal.SIGTERM) is take_note
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_after_the_last_safe_point_is_delivered_on_leaving():
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        with between_items():
            _image(0, done, {0: [signal.SIGINT]})
        done.append(99)  # never reached
    assert done == [0]


def test_default_actions_are_left_alone():
    """SIGTERM's default action (end the process) is not a Python handler: not deferred."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with between_items():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_loop_without_signals_runs_to_the_end():
    assert _loop({}) == [0, 1, 2, 3, 4]
