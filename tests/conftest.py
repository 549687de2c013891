"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Directory of the shared read-only data sets (GSM8K, PubMedQA, ...).

    ``$RLHF_SHARED_DATA`` if set, else ``<repo>/../shared/data``; the test is skipped when the
    directory does not exist.
    """
    env = os.environ.get("RLHF_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set RLHF_SHARED_DATA)")
    return path
