"""Fixtures of the browser tests: the real processes (one stack for the whole session) and the
screenshot folder (``test-artifacts/browser/``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from browser.servers import start_stack


@pytest.fixture(scope="session")
def stack(tiny_checkpoints):
    yield from start_stack(tiny_checkpoints)


@pytest.fixture
def shots(artifacts_dir) -> Path:
    folder = artifacts_dir / "browser"
    folder.mkdir(exist_ok=True)
    return folder
