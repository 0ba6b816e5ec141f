"""The recipe tests run their tiny models on one thread (``one_thread`` of ``tests/conftest.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _recipes_one_thread(one_thread):
    """Every test of this folder uses the shared ``one_thread`` fixture (restored after each module)."""
    yield
