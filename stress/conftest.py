"""Fixtures of the stress suite: work scale, moved/lost accounting, a real Service per test.

Scale: STRESS_SCALE picks how much work each test does. "quick" (what `make test` runs
through tests/test_stress_quick.py) moves a few thousand events per test; "full" (the default, what
`make stress` runs) moves tens of thousands. Tests scale their counts with `scaled(n)`; they never
scale time limits down, only work.

Accounting: every test reports how many events it moved end to end and how many were lost (an
accepted event found neither where it should be nor in the DLQ). When STRESS_RESULTS
names a file, one JSON line per test run is appended there (O_APPEND: lines from concurrent pytest
processes never interleave), so stress/run.py can sum them across processes and repeats.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from eventstream.runtime import gil
from stress_helpers import service_config


def pytest_sessionstart(session):
    import atomics  # noqa: F401 - cffi can re-enable the GIL on import; check after it

    if gil.gil_enabled() and not gil.gil_allowed_by_env():
        pytest.exit("the stress suite needs the GIL off: run with PYTHON_GIL=0 under python3.13t "
                    "(`make stress` does)", returncode=3)


class Tally:
    """moved / lost of one test run; `extra` carries test-specific facts for the results file."""

    def __init__(self, name: str):
        self.name = name
        self.moved = 0
        self.lost = 0
        self.extra: dict = {}

    def add(self, moved: int = 0, lost: int = 0, **extra) -> None:
        self.moved += int(moved)
        self.lost += int(lost)
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0) + v if isinstance(v, int) else v


@pytest.fixture
def tally(request):
    t = Tally(request.node.nodeid)
    t0 = time.monotonic()
    yield t
    path = os.environ.get("STRESS_RESULTS")
    if not path:
        return
    failed = bool(getattr(request.node, "rep_call", None) and request.node.rep_call.failed)
    line = json.dumps({"test": t.name, "moved": t.moved, "lost": t.lost, "failed": failed,
                       "seconds": round(time.monotonic() - t0, 3), "pid": os.getpid(), **t.extra}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def make_service(tmp_path):
    """make_service(handlers=None, **dotted_overrides) -> started Service; stopped at teardown."""
    from eventstream.service import Service

    made = []

    def make(handlers=None, data_dir=None, **overrides):
        d = Path(data_dir) if data_dir else tmp_path / f"data{len(made)}"
        cfg = service_config(d, **{k.replace("__", "."): v for k, v in overrides.items()})
        svc = Service(cfg, handlers=handlers)
        made.append(svc)
        svc.start()
        svc.data_dir = d
        return svc

    yield make
    for svc in made:
        if svc.started:
            svc.stop(drain=False, timeout=10)
