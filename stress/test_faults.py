"""Faults against a running Service: overload by a slow handler, malformed-frame floods, connection
floods past max_connections, clients that disconnect in the middle of a frame.

Each test ends with a draining stop and then checks exact outcomes in events.bin, the DLQ and the
metrics; none of them asserts speed.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib

import numpy as np
import psutil
from stress_helpers import run_threads, scaled, wait_until
from verify import Store, event_id, payload

from eventstream.client import TcpClient
from eventstream.engine.dlq import reason_category
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, V2_HEAD, V2_MAGIC, encode_v1, encode_v2, \
    split_control_frames

JOIN_S = 180.0


def run_named(fns: list, prefix: str) -> None:
    run_threads(fns, [f"{prefix}-{i}" for i in range(len(fns))], JOIN_S)


def read_to_eof(s: socket.socket, timeout: float = 60.0) -> list[tuple[int, int, bytes]]:
    """Control frames the server sent until it closed the connection (reset counts as closed)."""
    s.settimeout(timeout)
    buf = bytearray()
    frames = []
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
            frames += split_control_frames(buf)
    except ConnectionResetError:
        pass
    return frames


def last_ack(frames) -> int | None:
    acks = [v for k, v, _ in frames if k == KIND_ACK]
    return acks[-1] if acks else None


# ------------------------------------------------------------------------------------------ overload
def test_slow_handler_overload_bounded_memory_and_every_drop_accounted(make_service, tally):
    """Realtime handler at ~100 µs per event, senders much faster: the realtime ring fills (its
    overflow policy holds or refuses new events, never evicts accepted ones), the control plane escalates and refuses at the edge. Every drop must have a policy reason, be
    counted in metrics by that reason, and have its DLQ line; RSS stays bounded."""
    def slow(batch):
        time.sleep(len(batch) * 100e-6)

    svc = make_service(handlers={"realtime": slow}, **{"queues.realtime.capacity": 256,
                                                      "backpressure.interval_ms": 20.0,
                                                      "backpressure.min_events_for_evaluation": 100})
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = {"rss": rss0}
    sampling = threading.Event()

    def sample_rss():
        while not sampling.wait(0.02):
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    per, senders = scaled(30_000, 2_500), 2
    results: dict[int, dict] = {}

    def sender(k):
        def run():
            with TcpClient(*svc.tcp.address, version=2, batch_size=256, timeout=60) as c:
                for i in range(per):
                    # mostly HIGH/CRITICAL (realtime), some BATCH (policy: dropped first under pressure)
                    c.send(f"over.{k}", payload(i), priority=(3, 4, 3, 0)[i % 4], event_id=event_id(k, i))
                assert c.wait_acked(90), f"sender {k}: {c.unacknowledged} unacknowledged"
                results[k] = {"nacked": {e for e, _ in c.nacks}, "reasons": [r for _, r in c.nacks]}
        return run

    try:
        run_named([sender(k) for k in range(1, senders + 1)], "overload")
    finally:
        summary = svc.stop()
        sampling.set()
        sampler.join(5)
    store = Store(svc.data_dir)
    allowed = {"overflow", "backpressure", "paused", "timeout"}
    dlq_by_cat: dict[str, int] = {}
    for entries in store.dlq.values():
        for e in entries:
            dlq_by_cat[reason_category(e.reason)] = dlq_by_cat.get(reason_category(e.reason), 0) + 1
    assert set(dlq_by_cat) <= allowed, f"drops for reasons outside the queue policy: {dlq_by_cat}"
    assert summary["dropped_by_reason"] == dlq_by_cat, \
        f"metrics by reason {summary['dropped_by_reason']} != DLQ lines by reason {dlq_by_cat}"
    overflow_prios = {e.priority for ents in store.dlq.values() for e in ents if e.reason.startswith("overflow:realtime")}
    assert overflow_prios <= {3, 4}, f"realtime overflow dropped non-realtime priorities {overflow_prios}"
    lost = 0
    for k, res in results.items():
        topic = f"over.{k}"
        have = set(store.stored_ids(topic).tolist()) | store.dlq_ids(topic)
        sent = {event_id(k, i) for i in range(per)}
        missing = sent - have
        lost += len(missing)
        assert not missing, f"{topic}: {len(missing)} events neither stored nor dead-lettered"
        assert res["nacked"] <= store.dlq_ids(topic), f"{topic}: NACKed events without a DLQ line"
        assert store.duplicates(topic) == 0
    assert store.stored_total + store.dlq_total == senders * per
    grown = peak["rss"] - rss0
    assert grown < 400 << 20, f"RSS grew by {grown >> 20} MiB under overload (bound 400 MiB)"
    tally.add(moved=store.stored_total, lost=lost, dropped=store.dlq_total, rss_growth_mib=grown >> 20)


# ------------------------------------------------------------------------------------------ malformed
def raw_v2(topic: bytes, body: bytes, prio: int, eid: int, *, crc: int | None = None, kind: int = 1) -> bytes:
    good = zlib.crc32(body, zlib.crc32(topic))
    return V2_HEAD.pack(26 + len(topic) + len(body), V2_MAGIC, kind, prio, 0, eid, 0, len(topic),
                        good if crc is None else crc) + topic + body


def test_malformed_frame_floods_nack_each_bad_frame_and_keep_every_good_one(make_service, tally):
    # every bad frame gets its own DLQ line here (the default limit would summarise the rest of each
    # second's rejects in one line: stress/test_abuse.py covers that)
    svc = make_service(**{"server.tcp.max_rejects_per_s": 1_000_000})
    conns, per = 6, scaled(8_000, 600)
    outcome: dict[int, dict] = {}

    def client(c):
        def run():
            rng = np.random.default_rng(c)
            topic = f"bad.{c}".encode()
            kinds = rng.choice(6, size=per, p=[0.6, 0.1, 0.1, 0.1, 0.05, 0.05])
            good, bad, frames = [], [], []
            for i, k in enumerate(kinds.tolist()):
                eid = event_id(c, i)
                if k == 0:
                    frames.append(raw_v2(topic, payload(i), 2 + i % 3, eid)); good.append(eid)
                elif k == 1:
                    frames.append(raw_v2(topic, payload(i), 2, eid, crc=0xDEADBEEF)); bad.append(eid)
                elif k == 2:
                    frames.append(raw_v2(topic, payload(i), 9, eid)); bad.append(eid)
                elif k == 3:  # over the inline capacity: valid, goes through the payload arena
                    frames.append(raw_v2(topic, payload(i, 8) + bytes(600), 2 + i % 3, eid)); good.append(eid)
                elif k == 4:
                    frames.append(raw_v2(topic, payload(i), 2, eid, kind=2)); bad.append(eid)
                else:
                    frames.append(raw_v2(b"\xff\xfe", payload(i), 2, eid)); bad.append(eid)
            s = socket.create_connection(svc.tcp.address, timeout=60)
            try:
                data = b"".join(frames)
                for k in range(0, len(data), 7919):  # odd chunk sizes: frames split across reads
                    s.sendall(data[k:k + 7919])
                fatal = c % 2 == 0
                if fatal:  # then garbage that breaks framing: NACK + close
                    s.sendall(struct.pack(">I", 1 << 30) + b"\xe5garbage")
                s.shutdown(socket.SHUT_WR)
                frames_back = read_to_eof(s)
            finally:
                s.close()
            nacked = [v for k, v, _ in frames_back if k == KIND_NACK]
            ids = [event_id(c, i) for i in range(per)]
            outcome[c] = {"good": good, "bad": bad, "ack": last_ack(frames_back), "fatal": fatal,
                          "nacked_ids": {ids[v - 1] for v in nacked if v <= per}, "nacks": len(nacked)}
        return run

    run_named([client(c) for c in range(1, conns + 1)], "malformed")
    # the service is still healthy: a normal client works
    with TcpClient(*svc.tcp.address, version=2, timeout=30) as ok:
        for i in range(10):
            ok.send("after.flood", payload(i), event_id=event_id(99, i))
        assert ok.wait_acked(30) and not ok.nacks
    summary = svc.stop()
    assert not svc.failures()
    store = Store(svc.data_dir)
    lost = refused_good = cut_off = 0
    # ids are unique across clients; frames with an invalid topic are dead-lettered under that topic
    dlq = {e.id: e.reason for entries in store.dlq.values() for e in entries}
    for c, o in outcome.items():
        topic = f"bad.{c}"
        stored = set(store.stored_ids(topic).tolist())
        good, bad = set(o["good"]), set(o["bad"])
        # a valid frame may be refused under backpressure (NACKed, dead-lettered), never silently lost
        refused = good - stored
        lost_here = refused - set(dlq)
        lost += len(lost_here)
        assert not lost_here, f"{topic}: {len(lost_here)} valid frames neither stored nor in the DLQ"
        wrong = {dlq[e] for e in refused if reason_category(dlq[e]) != "backpressure"}
        assert not wrong, f"{topic}: valid frames refused for {wrong}"
        refused_good += len(refused)
        assert not (bad & stored), f"{topic}: invalid frames were stored"
        assert bad <= set(dlq), f"{topic}: {len(bad - set(dlq))} invalid frames without a DLQ line"
        unresolved = (refused | bad) - o["nacked_ids"]
        if o["fatal"]:
            # after a framing error the server flushes its ACK/NACK backlog for at most 0.5 s and closes;
            # a client that was not reading may miss part of it (it then resends: nothing is lost)
            cut_off += len(unresolved)
            assert o["ack"] is None or o["ack"] <= len(good & stored), f"{topic}: ACK {o['ack']} > stored"
        else:
            assert not unresolved, f"{topic}: {len(unresolved)} refused/invalid frames without a NACK"
            assert o["ack"] == len(good & stored), f"{topic}: final ACK {o['ack']} != {len(good & stored)} stored"
            assert o["nacks"] == len(bad) + len(refused), f"{topic}: NACK count"
    assert len(store.stored_ids("after.flood")) == 10
    bad_total = sum(len(o["bad"]) + o["fatal"] for o in outcome.values())
    assert store.dlq_total == bad_total + refused_good, \
        f"DLQ has {store.dlq_total} lines for {bad_total} bad frames + {refused_good} refused"
    assert summary["dropped"] == store.dlq_total
    if refused_good:
        print(f"malformed flood escalated backpressure: {refused_good} valid frames refused (NACKed, in DLQ)")
    tally.add(moved=store.stored_total, lost=lost, rejected=bad_total, valid_refused_by_backpressure=refused_good,
              nacks_cut_off_at_framing_close=cut_off)


# ------------------------------------------------------------------------------------------ conn flood
def test_connection_flood_past_max_connections(make_service, tally):
    limit = 8
    # evict_idle_s: no connection is ever idle enough to be evicted here, so every connection past the
    # limit is refused (under load a holder, or a churn connection not yet read, can be silent for the
    # default 1 s and be evicted instead: the clients could not tell that from a refusal)
    svc = make_service(**{"server.tcp.max_connections": limit, "server.tcp.evict_idle_s": 3600.0})
    addr = svc.tcp.address
    # phase A: hold the limit, every extra connection is refused and nothing it sent is accepted
    holders = [TcpClient(*addr, version=2, batch_size=1, timeout=30).connect() for _ in range(limit)]
    for k, h in enumerate(holders):
        h.send("flood.hold", payload(k), event_id=event_id(50, k))
        assert h.wait_acked(30), "holder not acknowledged"
    extra_n = scaled(60, 16)
    refused_results = []

    def extra(j):
        def run():
            s = socket.create_connection(addr, timeout=30)
            try:
                try:
                    s.sendall(encode_v2(f"flood.extra.{j}", payload(j), 2, event_id(51, j)))
                except OSError:
                    pass
                refused_results.append(last_ack(read_to_eof(s)))
            finally:
                s.close()
        return run

    run_named([extra(j) for j in range(extra_n)], "extra")
    assert refused_results == [None] * extra_n, "a connection past the limit got an ACK"
    assert svc.tcp.statistics()["connections_refused"] == extra_n
    for h in holders:
        h.close()
    wait_until(lambda: svc.tcp.statistics()["connections_open"] == 0, 30, "holders to close")

    # phase B: churn with twice the limit in parallel; refused attempts retry until ACKed
    workers, rounds = 2 * limit, scaled(40, 6)
    attempts = {"refused": 0}
    lock = threading.Lock()

    def churn(w):
        def run():
            for r in range(rounds):
                deadline = time.monotonic() + 60
                topic = f"flood.churn.{w}"
                while True:
                    s = socket.create_connection(addr, timeout=30)
                    try:
                        try:
                            s.sendall(b"".join(encode_v2(topic, payload(r * 10 + i), 2, event_id(w + 100, r * 10 + i))
                                               for i in range(10)))
                            s.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        ack = last_ack(read_to_eof(s))
                    finally:
                        s.close()
                    if ack == 10:
                        break
                    assert ack is None, f"partial ACK {ack} from a refused connection"
                    with lock:
                        attempts["refused"] += 1
                    assert time.monotonic() < deadline, "never got a connection in 60s"
        return run

    run_named([churn(w) for w in range(workers)], "churn")
    stats = svc.tcp.statistics()
    svc.stop()
    store = Store(svc.data_dir)
    assert stats["connections_refused"] == extra_n + attempts["refused"]
    for j in range(extra_n):
        assert len(store.stored_ids(f"flood.extra.{j}")) == 0, "a refused connection's event was stored"
    lost = 0
    for w in range(workers):
        ids = store.stored_ids(f"flood.churn.{w}")
        expect = {event_id(w + 100, i) for i in range(rounds * 10)}
        lost += len(expect - set(ids.tolist()))
        assert set(ids.tolist()) == expect and len(ids) == len(expect), f"churn {w}: stored {len(ids)} of {len(expect)}"
    tally.add(moved=store.stored_total, lost=lost, refused=stats["connections_refused"])


# ------------------------------------------------------------------------------------------ mid-frame
def test_clients_disconnecting_mid_frame(make_service, tally):
    svc = make_service()
    addr = svc.tcp.address
    clients, rounds = 8, scaled(60, 6)
    expected: dict[str, set] = {}
    lock = threading.Lock()

    def client(c):
        def run():
            rng = np.random.default_rng(c)
            for r in range(rounds):
                topic = f"cut.{c}.{r}"
                n = int(rng.integers(1, 40))
                v2 = bool(r % 2)
                ids = [event_id(c * 1000 + r, i) for i in range(n + 1)]
                frames = [encode_v2(topic, payload(i), i % 5, ids[i]) if v2 else encode_v1(topic, payload(i), i % 5)
                          for i in range(n + 1)]
                whole, last = b"".join(frames[:n]), frames[n]
                cut = int(rng.integers(1, len(last)))  # at least one byte, never the whole frame
                s = socket.create_connection(addr, timeout=30)
                try:
                    mode = r % 3
                    if mode == 2 and v2:
                        # wait for the ACK of the whole frames, then reset the connection mid-frame
                        s.sendall(whole)
                        buf = bytearray()
                        while last_ack(split_control_frames(buf) or []) != n:
                            d = s.recv(4096)
                            assert d, "closed before the ACK"
                            buf += d
                        s.sendall(last[:cut])
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    else:
                        s.sendall(whole + last[:cut])
                        if mode == 1:
                            s.shutdown(socket.SHUT_WR)
                            read_to_eof(s)
                finally:
                    s.close()
                with lock:
                    expected[topic] = set(range(n))
        return run

    run_named([client(c) for c in range(clients)], "cut")
    # graceful closes: the server reads up to EOF; wait until every connection is gone
    wait_until(lambda: svc.tcp.statistics()["connections_open"] == 0, 60, "all cut connections to close")
    svc.stop()
    store = Store(svc.data_dir)
    lost = 0
    for topic, want in expected.items():
        tags = store.stored_tags(topic)
        got = set(tags.tolist())
        assert len(tags) == len(got), f"{topic}: stored twice"
        lost += len(want - got)
        assert got == want, f"{topic}: stored {sorted(got)[:5]}... expected the {len(want)} whole frames only"
    tally.add(moved=store.stored_total, lost=lost, connections=len(expected))
