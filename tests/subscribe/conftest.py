"""Subscribe fixtures: a real Service (TCP ingest + subscribe listener on ephemeral ports) on a tmp data dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from subscribe_helpers import sub_cfg

from eventstream.service import Service


@pytest.fixture
def service(tmp_path):
    """make(**overrides) -> a started Service; every one made is stopped at teardown."""
    made: list[Service] = []

    def make(data: Path | None = None, **extra) -> Service:
        svc = Service(sub_cfg(data or tmp_path / "data", **extra)).start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        if svc.started:
            svc.stop()

