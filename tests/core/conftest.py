"""Fixtures for core tests; the helpers live in core_helpers.py."""

from __future__ import annotations

import pytest
from core_helpers import Workers


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.stop.set()
    for t in w.threads:
        t.join(5.0)
