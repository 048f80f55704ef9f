"""Output fit for a log file: one line per epoch off a terminal, no temporary file names."""

from __future__ import annotations

import io
import re
import sys

import pytest

from seg_train.training.fit import progress_verbosity
from tests.helpers import TINY_TRAIN, run_cli


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("setting", "tty", "expected"),
    [("auto", True, 1), ("auto", False, 2), (0, False, 0), (1, False, 1), (2, True, 2)],
)
def test_auto_verbosity_follows_the_terminal(monkeypatch, setting, tty, expected):
    # Keras: 1 = progress bar (carriage-return updates), 2 = one line per epoch.
    monkeypatch.setattr(sys, "stdout", _Stream(tty))
    assert progress_verbosity(setting) == expected


@pytest.mark.slow
def test_non_tty_run_log_has_no_carriage_returns_or_temporary_names(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    # run_cli captures stdout and stderr through pipes: the run is not on a terminal.
    result = run_cli([*TINY_TRAIN, f"hydra.run.dir={run_dir}"], cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "\r" not in output
    assert ".tmp-" not in output  # the checkpoint is named as it will be found
    for epoch in (1, 2):
        assert output.count(f"Epoch {epoch}/2\n") == 1
    # Keras' one-line epoch summary: "2/2 - 3s - 1s/step - loss: ... - mean_iou: ..."
    summaries = re.findall(r"^\d+/\d+ - \S+ - .*loss: .*$", output, re.MULTILINE)
    assert len(summaries) == 2, summaries
    best = run_dir / "checkpoints" / "best.keras"
    assert "Epoch 1: val_mean_iou improved from none to " in output
    assert f"; saving {best}\n" in output and best.is_file()
