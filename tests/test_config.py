"""Configuration: defaults, file, env, --set precedence, and every class of error."""

from __future__ import annotations

import os

import pytest

from eventstream import config as c
from eventstream.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    p = tmp_path / "es.yaml"
    p.write_text(text)
    return p


def test_defaults_need_no_file():
    cfg = load_config(environ={})
    assert cfg.server.tcp.port == 9000 and cfg.server.udp.port == 9001
    assert cfg.queues.realtime.capacity == 16384 and cfg.queues.realtime.overflow == "BLOCK_PRODUCER"
    assert cfg.queues.transactional.overflow == "BLOCK_PRODUCER"
    assert cfg.queues.batch.overflow == "BLOCK_PRODUCER"
    assert cfg.server.ack == "stored"
    assert cfg.backpressure.max_queue_depth == 65536 and cfg.backpressure.recovery_factor == 0.8
    assert cfg.storage.fsync == "interval" and cfg.metrics.port == 9100


def test_shipped_yaml_matches_the_embedded_defaults():
    shipped = load_config(os.path.join(ROOT, "config", "eventstream.yaml"), environ={})
    assert shipped.to_dict() == c.Config().to_dict()


def test_precedence_defaults_file_env_flags(tmp_path):
    p = write(tmp_path, "server:\n  tcp:\n    port: 9100\n    readers: 3\nmetrics:\n  port: 9200\n")
    env = {"EVENTSTREAM_SERVER__TCP__PORT": "9300", "EVENTSTREAM_STORAGE__FSYNC": "always"}
    cfg = load_config(p, environ=env, overrides=["server.tcp.port=9400"])
    assert cfg.server.tcp.port == 9400  # flag beats env beats file
    assert cfg.server.tcp.readers == 3  # file beats default
    assert cfg.storage.fsync == "always"  # env beats default
    cfg = load_config(p, environ=env)
    assert cfg.server.tcp.port == 9300


def test_config_path_from_env(tmp_path):
    p = write(tmp_path, "records:\n  payload_bytes: 64\n")
    assert load_config(environ={"EVENTSTREAM_CONFIG": str(p)}).records.payload_bytes == 64


@pytest.mark.parametrize(
    "text, path, allowed",
    [
        ("server:\n  tcp:\n    prot: 1\n", "server.tcp.prot", "unknown key"),
        ("server:\n  tcp:\n    port: 70000\n", "server.tcp.port", "0..65535"),
        ("server:\n  tcp:\n    port: -1\n", "server.tcp.port", "0..65535"),
        ("server:\n  tcp:\n    port: nine\n", "server.tcp.port", "an integer"),
        ("server:\n  tcp:\n    enabled: 1\n", "server.tcp.enabled", "true or false"),
        ("queues:\n  batch:\n    capacity: 1000\n", "queues.batch.capacity", "power of two"),
        ("queues:\n  batch:\n    overflow: DROP_ALL\n", "queues.batch.overflow", "'DROP_NEW'"),
        ("queues:\n  realtime:\n    overflow: DROP_OLD\n", "queues.realtime.overflow", "'BLOCK_PRODUCER'"),
        ("server:\n  ack: maybe\n", "server.ack", "'stored'"),
        ("storage:\n  fsync: sometimes\n", "storage.fsync", "'interval'"),
        ("affinity:\n  realtime: [4096]\n", "affinity.realtime", "CPUs this process may run on"),
        ("affinity:\n  realtime: \"0-x\"\n", "affinity.realtime", "a list of CPU ids"),
        ("processors:\n  transactional:\n    handler: nocolon\n", "processors.transactional.handler", "module:function"),
        ("processors:\n  batch:\n    workers: 3\n    max_workers: 2\n", "processors.batch.max_workers", ">="),
        ("backpressure:\n  degraded:\n    depth: 0.1\n", "backpressure.degraded.depth", ">="),
        ("server: [1, 2]\n", "server", "a mapping"),
        ("logging:\n  level: loud\n", "logging.level", "'debug'"),
        ("processors:\n  batch:\n    nice: 5\n", "processors.batch.nice", "scheduling.batch: 'batch:N'"),
    ],
)
def test_errors_name_file_key_value_and_allowed(tmp_path, text, path, allowed):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    msg = str(info.value)
    assert str(p) in msg or "config" in msg
    assert path in msg
    assert "allowed:" in msg and allowed in msg


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "server:\n  tcp: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    assert "line" in str(info.value) and str(p) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="existing YAML file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_env_error_names_the_variable():
    with pytest.raises(ConfigError, match="EVENTSTREAM_SERVER__UDP__PORT.*server.udp.port.*0..65535"):
        load_config(environ={"EVENTSTREAM_SERVER__UDP__PORT": "123456"})


def test_env_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="EVENTSTREAM_SERVR__PORT.*unknown key"):
        load_config(environ={"EVENTSTREAM_SERVR__PORT": "1"})


def test_non_config_env_vars_are_ignored():
    cfg = load_config(environ={"EVENTSTREAM_PYTHON": "/x", "EVENTSTREAM_ALLOW_GIL": "1"})
    assert cfg.server.tcp.port == 9000


def test_set_flag_needs_key_value():
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(environ={}, overrides=["server.tcp.port"])


def test_cpu_lists_accept_ranges_and_ints():
    have = sorted(os.sched_getaffinity(0))
    spec = f"{have[0]}-{have[-1]}"
    cfg = load_config(environ={}, overrides=[f"affinity.realtime={spec}", f"affinity.batch={have[0]}"])
    assert cfg.affinity.realtime == have and cfg.affinity.batch == [have[0]]


def test_overflow_names_are_case_insensitive():
    cfg = load_config(environ={}, overrides=["queues.batch.overflow=drop_new"])
    assert cfg.queues.batch.overflow == "DROP_NEW"


def test_dump_yaml_round_trips(tmp_path):
    cfg = load_config(environ={}, overrides=["server.tcp.port=9123"])
    p = write(tmp_path, c.dump_yaml(cfg))
    assert load_config(p, environ={}).to_dict() == cfg.to_dict()
