"""OS scheduling per thread role (runtime/scheduling.py): the policy a thread ends up with, the config
keys and their errors, and a refusal that is logged, not fatal."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eventstream.config import ConfigError, load_config
from eventstream.runtime import scheduling
from eventstream.service import Service


def in_thread(fn):
    out = {}

    def body():
        try:
            out["result"] = fn()
            out["policy"] = scheduling.current_thread_policy()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return out


def test_parse_accepts_each_kind_and_prints_it_back():
    for text in ("normal", "normal:5", "normal:-3", "batch", "batch:10", "idle", "fifo:10", "rr:99", " BATCH:0 "):
        assert str(scheduling.parse(text)) == text.strip().lower()
    assert scheduling.parse("normal").is_default and not scheduling.parse("normal:0").is_default


@pytest.mark.parametrize("text", ["", "fast", "batch:", "batch:-1", "batch:20", "normal:-21", "idle:3", "fifo",
                                  "fifo:0", "rr:100", "fifo:x", "normal:1.5"])
def test_parse_refuses_with_what_is_allowed(text):
    with pytest.raises(ValueError, match=r"is not allowed; allowed: 'normal', 'normal:N'"):
        scheduling.parse(text)


def test_lowering_a_thread_changes_only_that_thread():
    before = scheduling.current_thread_policy()
    got = in_thread(lambda: scheduling.apply_current_thread("batch:7", "test"))
    assert got["result"] is True
    assert got["policy"] == (os.SCHED_BATCH, 0, 7)
    assert scheduling.current_thread_policy() == before  # the caller's thread is untouched
    got = in_thread(lambda: scheduling.apply_current_thread("idle", "test"))
    assert got["result"] is True and got["policy"][0] == os.SCHED_IDLE
    got = in_thread(lambda: scheduling.apply_current_thread("normal", "test"))  # nothing asked
    assert got["result"] is True and got["policy"] == before


def test_a_refused_policy_is_logged_and_the_thread_runs_on():
    """Raising a thread needs CAP_SYS_NICE: without it (an unprivileged user; root drops to nobody
    first) the call returns False, logs scheduling_refused, and the thread keeps its policy."""
    code = (
        "import os, structlog, logging\n"
        "from eventstream.runtime import scheduling\n"
        "structlog.configure(logger_factory=structlog.PrintLoggerFactory())\n"
        "if os.geteuid() == 0:\n"
        "    os.setgid(65534); os.setuid(65534)\n"
        "ok = scheduling.apply_current_thread('fifo:10', 'es-tcp-reader-0')\n"
        "print('RESULT', ok, scheduling.current_thread_policy()[0] == os.SCHED_OTHER)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHON_GIL": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "RESULT False True" in proc.stdout
    assert "scheduling_refused" in proc.stdout and "fifo:10" in proc.stdout and "es-tcp-reader-0" in proc.stdout


def test_config_keys_default_and_refuse_with_the_key_path():
    cfg = load_config(environ={})
    s = cfg.scheduling
    assert (s.ingest, s.realtime, s.transactional, s.batch) == ("normal", "normal", "batch:10", "batch:10")
    cfg = load_config(environ={}, overrides={"scheduling.ingest": "FIFO:20", "scheduling.batch": "idle"})
    assert (cfg.scheduling.ingest, cfg.scheduling.batch) == ("fifo:20", "idle")
    with pytest.raises(ConfigError, match=r"scheduling\.transactional: 'nice:5' is not allowed; allowed: 'normal'"):
        load_config(environ={}, overrides={"scheduling.transactional": "nice:5"})


def test_a_service_schedules_each_thread_role_as_configured(tmp_path):
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.enabled": False, "metrics.enabled": False, "server.subscribe.port": 0,
        "storage.data_dir": str(tmp_path / "data"), "scheduling.ingest": "normal:2", "scheduling.realtime": "batch:1",
    })
    want = {"es-tcp-reader-0": (os.SCHED_OTHER, 2), "es-realtime-0": (os.SCHED_BATCH, 1),
            "es-transactional-0": (os.SCHED_BATCH, 10), "es-batch-0": (os.SCHED_BATCH, 10)}  # bulk: the default

    def roles() -> dict:
        out = {}
        for t in threading.enumerate():
            if t.name in want and t.native_id is not None:
                out[t.name] = (os.sched_getscheduler(t.native_id), os.getpriority(os.PRIO_PROCESS, t.native_id))
        return out

    svc = Service(cfg).start()
    try:
        deadline = time.monotonic() + 10  # each thread sets its own policy first thing in run()
        while roles() != want and time.monotonic() < deadline:
            time.sleep(0.01)
        assert roles() == want
    finally:
        svc.stop()
