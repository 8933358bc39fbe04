"""Shared by the flow tests: engine configs, reading a topic back from events.bin, bounded waits."""

from __future__ import annotations

import json
import time
from pathlib import Path

from eventstream.config import load_config
from eventstream.storage import EventLogReader

S = 1_000_000_000


def engine_config(data: Path, **overrides):
    base = {"server.tcp.port": 0, "server.udp.port": 0, "server.subscribe.port": 0, "metrics.port": 0,
            "storage.data_dir": str(data),
            "records.payload_bytes": 128, "flows.snapshot_interval_s": 0.0}
    base.update(overrides)
    return load_config(environ={}, overrides=base)


def stored(data: Path, topic: str) -> list[tuple[int, bytes]]:
    """(event id, payload) of every event of `topic` in events.bin, in log order."""
    path = data / "events.bin"
    if not path.exists():
        return []
    b = EventLogReader(path).read(topic=topic)
    return [(int(b.records["event_id"][i]), b.payload(i)) for i in range(len(b))]


def stored_json(data: Path, topic: str) -> list:
    return [json.loads(p) for _, p in stored(data, topic)]


def wait_until(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something truthy (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
