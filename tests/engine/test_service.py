"""The whole service end to end: real sockets, threads, files, and `eventstream serve` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from eventstream.client import TcpClient, UdpSender
from eventstream.config import load_config
from eventstream.engine.dlq_reader import read_dlq
from eventstream.service import Service
from eventstream.storage import EventLogReader


def service_cfg(data: Path, **extra):
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
            "records.payload_bytes": 64, "processors.transactional.retry_backoff_ms": 1.0}
    over.update(extra)
    return load_config(environ={}, overrides=over)


def stored(data: Path) -> np.ndarray:
    return EventLogReader(data / "events.bin").read().records


def payload_tokens(recs: np.ndarray) -> list[bytes]:
    return [recs["payload"][i, : recs["payload_len"][i]].tobytes() for i in range(len(recs))]


def test_mixed_load_every_event_is_stored_or_dead_lettered(tmp_path):
    data = tmp_path / "data"
    per_client, v2_clients = 25_000, 3  # + 25k v1 + 1k UDP: 101k events
    rng = np.random.default_rng(7)
    with Service(service_cfg(data)) as svc:
        port, uport = svc.tcp.address[1], svc.udp.address[1]
        sent_ids: list[list[int]] = [[] for _ in range(v2_clients)]
        nacked: list[list[int]] = [[] for _ in range(v2_clients)]
        errors: list[BaseException] = []

        def v2_client(k):
            try:
                prios = rng.integers(0, 5, per_client).tolist()
                with TcpClient("127.0.0.1", port, version=2, timeout=60) as c:
                    for i in range(per_client):
                        sent_ids[k].append(c.send(f"orders.{k}", b"v2-%d-%d" % (k, i), priority=prios[i]))
                    assert c.wait_acked(60)
                    assert c.acked + c.nacked == per_client
                    nacked[k] = [eid for eid, _ in c.nacks]
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        def v1_client():
            try:
                with TcpClient("127.0.0.1", port, version=1, timeout=60) as c:
                    for i in range(per_client):
                        c.send("legacy", b"v1-%d" % i, priority=i % 5)
                    c.flush()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=v2_client, args=(k,)) for k in range(v2_clients)]
        threads.append(threading.Thread(target=v1_client))
        for t in threads:
            t.start()
        with UdpSender("127.0.0.1", uport, version=2) as u:
            for i in range(1000):
                u.queue("udp", b"udp-%d" % i, priority=i % 5)
                if i % 50 == 49:
                    u.flush()
            u.flush()
        for t in threads:
            t.join(120)
            assert not t.is_alive()
        assert errors == []
        total = per_client * (v2_clients + 1) + 1000
        # v1 has no ACKs and UDP none at all: wait (bounded) until ingest has seen every frame
        deadline = time.monotonic() + 60
        while svc.metrics.received_total() + svc.metrics.dropped_total() < total and time.monotonic() < deadline:
            time.sleep(0.05)
    summary = svc.summary()
    recs = stored(data)
    dlq = list(read_dlq(data / "dlq_log.txt"))
    assert len(recs) + len(dlq) == total
    assert summary["processed"] == len(recs) and summary["dropped"] == len(dlq)
    # the realtime SLA is reported (never enforced)
    assert summary["realtime_sla_us"] == 100.0 and summary["realtime_p99_recent_us"] > 0
    assert isinstance(summary["realtime_sla_met"], bool)
    # under this load the control plane may shed BATCH-priority events (policy): each is NACKed (v2)
    # and dead-lettered with its reason, never silently lost ...
    assert summary["received"] <= total
    # ... or a full queue under its overflow policy (DROP_NEW: "overflow"; BLOCK_PRODUCER holds the
    # source instead); nothing else may fail
    assert {e.reason.split(":")[0] for e in dlq} <= {"backpressure", "paused", "overflow"}
    tokens = payload_tokens(recs)
    assert len(set(tokens)) == len(tokens)  # nothing stored twice
    ids = set(recs["event_id"].tolist()) | {e.id for e in dlq}
    stored_ids = set(recs["event_id"].tolist())
    dlq_ids = {e.id for e in dlq}
    for k in range(v2_clients):
        assert set(sent_ids[k]) <= ids
        assert set(nacked[k]) <= dlq_ids and not set(nacked[k]) & stored_ids
    for e in dlq:
        assert e.reason  # every dead letter says why


def test_dedup_across_reconnects_with_the_same_ids(tmp_path):
    data = tmp_path / "data"
    with Service(service_cfg(data)) as svc:
        port = svc.tcp.address[1]
        with TcpClient("127.0.0.1", port, version=2) as c:
            for i in range(1, 101):
                c.send("pay", b"a", priority=2, event_id=i)
            assert c.wait_acked(30)
        with TcpClient("127.0.0.1", port, version=2) as c:
            for i in range(50, 151):
                c.send("pay", b"b", priority=2, event_id=i)
            assert c.wait_acked(30)
    recs = stored(data)
    assert sorted(recs["event_id"].tolist()) == list(range(1, 151))
    assert svc.summary()["dedup_hits"] == 51


def _old_key(event_id: int, topic: str) -> int:
    """The dedup key before keys were exact: id * golden ^ blake2b-64(topic)."""
    import hashlib
    h = int.from_bytes(hashlib.blake2b(topic.encode(), digest_size=8).digest(), "little") or 1
    return ((event_id * 0x9E3779B97F4A7C15) & (2**64 - 1)) ^ h


@pytest.mark.parametrize("priority", [3, 2, 0])  # realtime, transactional, batch tiers
def test_ids_forged_on_another_topic_do_not_suppress_a_victims_events(tmp_path, priority):
    """An attacker computes, for each of a victim's (topic, id), an id on its own topic that had the
    same dedup key, and sends those first. Every victim event must still be stored: one partition per
    tier here, so attacker and victim share one dedup table."""
    data = tmp_path / "data"
    inv = pow(0x9E3779B97F4A7C15, -1, 2**64)
    victim_ids = list(range(1, 21))
    forged = [((_old_key(v, "victim") ^ _old_key(0, "attacker")) * inv) & (2**64 - 1) for v in victim_ids]
    assert [_old_key(f, "attacker") for f in forged] == [_old_key(v, "victim") for v in victim_ids]
    cfg = service_cfg(data, **{"processors.transactional.max_workers": 1, "processors.batch.max_workers": 1})
    with Service(cfg) as svc:
        port = svc.tcp.address[1]
        with TcpClient("127.0.0.1", port, version=2) as attacker:
            for f in forged:
                attacker.send("attacker", b"forged", priority=priority, event_id=f)
            assert attacker.wait_acked(30) and attacker.nacked == 0
        with TcpClient("127.0.0.1", port, version=2) as victim:
            for v in victim_ids:
                victim.send("victim", b"mine", priority=priority, event_id=v)
            assert victim.wait_acked(30) and victim.acked == 20 and victim.nacked == 0
        assert svc.summary()["dedup_hits"] == 0
    recs = stored(data)
    got = sorted(recs["event_id"].tolist())
    assert got == sorted(victim_ids + forged), f"{40 - len(got)} ACKed events were not stored"


def test_handler_from_yaml_failing_goes_to_dlq_after_retries(tmp_path, monkeypatch):
    mod = tmp_path / "es_test_handlers.py"
    mod.write_text(
        "def picky(batch):\n"
        "    for t in batch.topic_names():\n"
        "        if t == 'bad':\n"
        "            raise RuntimeError('refused topic bad')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "data"
    cfg = service_cfg(data, **{"processors.transactional.handler": "es_test_handlers:picky",
                               "processors.transactional.max_retries": 2})
    with Service(cfg) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=2) as c:
            for i in range(1, 21):
                c.send("bad" if i % 5 == 0 else "good", b"x", priority=2, event_id=i)
            assert c.wait_acked(30)
    assert sorted(stored(data)["event_id"].tolist()) == [i for i in range(1, 21) if i % 5]
    dlq = list(read_dlq(data / "dlq_log.txt"))
    assert sorted(e.id for e in dlq) == [5, 10, 15, 20]
    assert all(e.reason == "retries_exhausted: RuntimeError: refused topic bad" and e.topic == "bad" for e in dlq)


# ------------------------------------------------------------------------------------ serve processes
_SERVES: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftover_serves():
    """A failing test must not leave an `eventstream serve` running."""
    yield
    while _SERVES:
        proc = _SERVES.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def start_serve(tmp_path: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, list[int]]:
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHON_GIL="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0", "--metrics-port", "0", "--subscribe-port", "0",
         "--data-dir", str(data), "--ready-file", str(ready), "--set", "records.payload_bytes=64", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _SERVES.append(proc)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("serve did not become ready within 60 s")
        time.sleep(0.02)
    return proc, [int(x) for x in ready.read_text().split()]


def test_sigterm_mid_stream_loses_nothing_that_was_acked(tmp_path):
    data = tmp_path / "data"
    proc, (port, *_) = start_serve(tmp_path, data)
    sent: list[int] = []
    client = TcpClient("127.0.0.1", port, version=2, timeout=5, reconnect=False, batch_size=64)
    client.connect()
    stop_at = 30_000
    try:
        for i in range(1, stop_at + 1):
            sent.append(client.send("stream", b"p%d" % i, priority=i % 5, event_id=i))
            if i == 5_000:
                client.flush()
                deadline = time.monotonic() + 30
                while client.acked == 0 and time.monotonic() < deadline:
                    time.sleep(0.001)  # until the first ACK is back, so the stop is really mid-stream
                proc.send_signal(signal.SIGTERM)
    except (OSError, ConnectionError):
        pass
    try:
        client.wait_acked(5)
    except (OSError, ConnectionError):
        pass
    acked = sent[: client.acked]  # ACKs are cumulative and in order (no NACKs on this stream)
    assert client.nacked == 0
    try:
        client.close()
    except OSError:
        pass
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(acked) >= 1
    ids = set(stored(data)["event_id"].tolist()) | {e.id for e in read_dlq(data / "dlq_log.txt")}
    missing = [i for i in acked if i not in ids]
    assert missing == []
    assert "service_stopped" in err


def test_restart_after_sigkill_recovers_the_log(tmp_path):
    data = tmp_path / "data"
    proc, (port, *_) = start_serve(tmp_path, data)
    try:
        with TcpClient("127.0.0.1", port, version=2) as c:
            for i in range(1, 1001):
                c.send("k", b"before", priority=2, event_id=i)
            assert c.wait_acked(30)
        deadline = time.monotonic() + 30  # stored within flush_interval_ms; wait for it, bounded
        while time.monotonic() < deadline:
            if (data / "events.bin").exists() and EventLogReader(data / "events.bin").count() == 1000:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    with open(data / "events.bin", "ab") as f:
        f.write(b"\xee" * 77)  # a torn tail, as a crash mid-write leaves
    proc, (port, *_) = start_serve(tmp_path, data)
    with TcpClient("127.0.0.1", port, version=2) as c:
        for i in range(1001, 1501):
            c.send("k", b"after", priority=2, event_id=i)
        assert c.wait_acked(30)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "77" in err  # recovery reported the dropped bytes
    r = subprocess.run([sys.executable, "-m", "eventstream", "dump", str(data / "events.bin"), "--count"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON_GIL="0"))
    assert r.stdout.strip() == "1500", r.stderr
    assert sorted(stored(data)["event_id"].tolist()) == list(range(1, 1501))


def test_acked_large_payloads_survive_sigkill_whole(tmp_path):
    """ACK mode stored (the default) for payloads in the payload arena: the ACK leaves only after the
    entry carrying the whole payload was written, so a kill -9 right after it loses none."""
    data = tmp_path / "data"
    proc, (port, *_) = start_serve(tmp_path, data)
    sizes = [65, 4096, 70_000, 500_000, 65, 1_000_000]
    pays = {i + 1: bytes([i + 1]) * n for i, n in enumerate(sizes)}
    try:
        with TcpClient("127.0.0.1", port, version=2, timeout=30) as c:
            for eid, p in pays.items():
                c.send("big", p, priority=eid % 5, event_id=eid)
            assert c.wait_acked(30) and c.unacknowledged == 0
    finally:
        proc.kill()  # no drain, no flush: only what the ACKs promised
        proc.communicate(timeout=30)
    got = EventLogReader(data / "events.bin").read()
    assert dict(zip(got.records["event_id"].tolist(), got.payloads())) == pays


def test_startup_errors_exit_2_with_a_clear_message(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    env = dict(os.environ, PYTHON_GIL="0")
    try:
        r = subprocess.run([sys.executable, "-m", "eventstream", "serve", "--port", str(port), "--udp-port", "0",
                            "--metrics-port", "0", "--subscribe-port", "0", "--data-dir", str(tmp_path / "d")],
                           capture_output=True, text=True, timeout=60, env=env)
    finally:
        busy.close()
    assert r.returncode == 2
    assert f"server.tcp.port: cannot bind 127.0.0.1:{port}" in r.stderr
    r = subprocess.run([sys.executable, "-m", "eventstream", "serve", "--set", "affinity.realtime=[4096]"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "affinity.realtime" in r.stderr and "allowed" in r.stderr
    r = subprocess.run([sys.executable, "-m", "eventstream", "serve", "--data-dir", str(tmp_path / "e"),
                        "--port", "0", "--udp-port", "0", "--metrics-port", "0", "--subscribe-port", "0",
                        "--set", "processors.realtime.handler=no_such_module:f"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "cannot import module 'no_such_module'" in r.stderr


def test_second_signal_during_drain_exits_at_once_with_130(tmp_path):
    (tmp_path / "es_slow_handlers.py").write_text(
        "import time\n\ndef slow(batch):\n    time.sleep(0.5)\n")
    data = tmp_path / "data"
    os.environ["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    try:
        proc, (port, *_) = start_serve(tmp_path, data, "--set", "processors.realtime.handler=es_slow_handlers:slow",
                                         "--set", "queues.max_batch=1")
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    with TcpClient("127.0.0.1", port, version=2) as c:
        for i in range(1, 41):
            c.send("slow", b"x", priority=4, event_id=i)
        assert c.wait_acked(30)  # accepted; the realtime tier needs ~20 s to handle them
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    err = ""
    while "signal_received" not in err and time.monotonic() < deadline:
        line = proc.stderr.readline()
        err += line
    proc.send_signal(signal.SIGTERM)
    try:
        out, rest = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # stacks of every thread, for the failure message
        time.sleep(1)
        proc.kill()
        out, rest = proc.communicate(timeout=30)
        raise AssertionError("serve did not exit on the second signal:\n" + err + rest) from None
    assert proc.returncode == 130, err + rest
    assert "second_signal_exit_now" in rest


def test_stop_without_drain_dead_letters_what_is_still_queued(tmp_path):
    import threading as th

    gate = th.Event()

    def blocked(batch):
        gate.wait(30)

    data = tmp_path / "data"
    # ACK mode `accepted`: the events are ACKed while the handler still blocks them in the queue
    svc = Service(service_cfg(data, **{"queues.max_batch": 10, "server.ack": "accepted"}),
                  handlers={"transactional": blocked}).start()
    try:
        with TcpClient("127.0.0.1", svc.tcp.address[1]) as c:
            for i in range(1, 501):
                c.send("t", b"x", priority=2, event_id=i)
            assert c.wait_acked(30)
        out = {}
        stopper = th.Thread(target=lambda: out.update(summary=svc.stop(drain=False)))
        stopper.start()
        workers = svc.engine.manager.workers["transactional"]
        deadline = time.monotonic() + 30
        while not all(w._abandon for w in workers) and time.monotonic() < deadline:
            time.sleep(0.001)  # until stop() has told the workers to abandon; then unblock the handler
        assert all(w._abandon for w in workers)
    finally:
        gate.set()
    stopper.join(60)
    assert not stopper.is_alive()
    summary = out["summary"]
    stored_ids = set(stored(data)["event_id"].tolist())
    dlq = list(read_dlq(data / "dlq_log.txt"))
    assert len(stored_ids) + len(dlq) == 500
    assert {e.reason for e in dlq} == {"shutdown: stopped without draining"}
    assert summary["processed"] == len(stored_ids) and len(dlq) >= 1
