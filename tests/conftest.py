"""Session-wide checks and fixtures shared by every test package."""

from __future__ import annotations

import os
import sys

import pytest

from eventstream.runtime import gil


def pytest_sessionstart(session):
    # Import what the engine imports (atomics pulls in cffi, which can re-enable the GIL), then check.
    import atomics  # noqa: F401
    import numpy  # noqa: F401

    if gil.gil_enabled() and not gil.gil_allowed_by_env():
        pytest.exit(
            "the GIL is enabled in the test session (interpreter "
            f"{sys.executable}, free-threaded build: {gil.is_free_threaded_build()}). Run the tests with "
            "PYTHON_GIL=0 under python3.13t (`make test` does), or set EVENTSTREAM_ALLOW_GIL=1 to run "
            "them with the GIL on deliberately.",
            returncode=3,
        )


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def cpus():
    return sorted(os.sched_getaffinity(0))
