"""Fixtures shared by every distribution's tests (pytest finds this file at the root)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "bench"))


@pytest.fixture(scope="session")
def wove2_python() -> Path:
    """Interpreter of a throwaway venv with wove==2.0.3 (the reference peer for interop tests)."""
    from _wove2 import wove2_python as build

    return build()
