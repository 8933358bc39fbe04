"""server.tcp.readers: 0 = one reader per CPU the readers may run on (at most 4)."""

from __future__ import annotations

import os

import pytest

from eventstream.config import load_config
from eventstream.config.loader import ConfigError
from eventstream.ingest.tcp import AUTO_READERS_MAX, reader_count


def test_a_configured_count_wins():
    assert reader_count(3, [0]) == 3


def test_auto_is_one_per_reader_cpu_capped():
    assert reader_count(0, [0]) == 1
    assert reader_count(0, [0, 1]) == 2
    assert reader_count(0, list(range(64))) == AUTO_READERS_MAX


def test_auto_without_reader_cpus_uses_the_process_cpus():
    assert reader_count(0, []) == max(1, min(AUTO_READERS_MAX, len(os.sched_getaffinity(0))))


def test_a_server_started_with_auto_runs_that_many_reader_threads(tcp_server):
    cpu = sorted(os.sched_getaffinity(0))[0]
    srv = tcp_server(readers=0, reader_cpus=[cpu])
    assert len(srv._readers) == 1
    assert srv.statistics()["frames_accepted"] == 0


def test_negative_readers_is_refused_with_the_key_named():
    with pytest.raises(ConfigError, match="server.tcp.readers"):
        load_config(environ={}, overrides={"server.tcp.readers": -1})
