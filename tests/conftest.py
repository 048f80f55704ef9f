"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A session-wide dataset cache, so the synthetic set is generated once per test run."""
    return tmp_path_factory.mktemp("seg-train-cache")
