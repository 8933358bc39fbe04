"""Fixtures for engine tests (helpers live in engine_fixtures.py)."""

from __future__ import annotations

import pytest
from engine_fixtures import PAYLOAD, Collected

from eventstream.config import load_config
from eventstream.core.topics import TopicTable


@pytest.fixture
def topics():
    return TopicTable()


@pytest.fixture
def collected(topics):
    return Collected(topics)


@pytest.fixture
def small_cfg(tmp_path):
    return load_config(environ={}, overrides={
        "records.payload_bytes": PAYLOAD,
        "queues.realtime.capacity": 1024,
        "queues.transactional.capacity": 1024,
        "queues.batch.capacity": 1024,
        "processors.transactional.retry_backoff_ms": 1.0,
        "storage.data_dir": str(tmp_path / "data"),
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
    })


