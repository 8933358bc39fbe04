"""The whole service under mixed load: TCP v2 (ACKed), TCP v1, UDP v2, every priority at once.

After a draining stop, every event ingest accepted must be in events.bin or the DLQ, exactly once:
* TCP v2: every ACKed event id is stored or dead-lettered; stored + DLQ == sent (all resolved).
* TCP v1: the client half-closes and reads to EOF, so the server read every byte; stored + DLQ == sent.
* UDP: the kernel may drop datagrams before the server sees them (that is UDP); what the server
  counted as accepted or rejected must be stored or dead-lettered.
And the metrics agree: received == frames ingest accepted, dropped == DLQ lines.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
from stress_helpers import scaled, wait_until
from verify import Store, event_id, payload

from eventstream.client import TcpClient, UdpSender
from eventstream.protocol.frames import encode_v1

JOIN_S = 180.0


def send_v2(address, stream: int, n: int, out: dict) -> None:
    topic = f"mix.v2.{stream}"
    with TcpClient(*address, version=2, batch_size=64, timeout=60.0) as c:
        for i in range(n):
            c.send(topic, payload(i), priority=i % 5, event_id=event_id(stream, i))
        assert c.wait_acked(60.0), f"{topic}: {c.unacknowledged} events never acknowledged"
        out[topic] = {"sent": n, "nacked": {eid for eid, _ in c.nacks}, "reconnects": c.reconnects}


def send_v1(address, stream: int, n: int, out: dict) -> None:
    topic = f"mix.v1.{stream}"
    s = socket.create_connection(address, timeout=60)
    try:
        for k in range(0, n, 200):
            s.sendall(b"".join(encode_v1(topic, payload(i), i % 5) for i in range(k, min(n, k + 200))))
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass  # v1 gets no ACKs; EOF means the server read everything and closed
    finally:
        s.close()
    out[topic] = {"sent": n}


def send_udp(address, stream: int, n: int, out: dict) -> None:
    topic = f"mix.udp.{stream}"
    with UdpSender(*address, version=2, max_datagram_bytes=1400) as u:
        for i in range(n):
            u.queue(topic, payload(i), priority=i % 5, event_id=event_id(stream, i))
            if i % 400 == 399:
                u.flush()
                time.sleep(0.001)  # pacing: a loopback socket buffer overflows, that is UDP, not the engine
    out[topic] = {"sent": n}


def test_mixed_load_every_accepted_event_is_stored_or_dead_lettered(make_service, tally):
    svc = make_service()
    per = scaled(25_000, 1_500)
    out: dict = {}
    errors: list[BaseException] = []

    def guard(fn, *args):
        def run():
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return threading.Thread(target=run, daemon=True, name=f"{fn.__name__}-{args[1]}")

    threads = [guard(send_v2, svc.tcp.address, 1, per, out), guard(send_v2, svc.tcp.address, 2, per, out),
               guard(send_v1, svc.tcp.address, 3, per, out), guard(send_udp, svc.udp.address, 4, per, out)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not [t.name for t in threads if t.is_alive()], "senders did not finish in time"
    assert not errors, errors

    # UDP: wait until the server has taken in what the kernel delivered (stops growing)
    seen = {"n": -1, "t": time.monotonic()}

    def udp_settled():
        n = svc.udp.statistics()["datagrams_received"]
        if n != seen["n"]:
            seen.update(n=n, t=time.monotonic())
        return time.monotonic() - seen["t"] > 0.5

    wait_until(udp_settled, 30, "UDP reader to settle")
    summary = svc.stop()  # the UDP reader decodes what it already received before it exits
    tcp_stats, udp_stats = svc.tcp.statistics(), svc.udp.statistics()
    assert not svc.failures(), svc.failures()

    store = Store(svc.data_dir)
    lost = 0
    for topic, facts in out.items():
        tags, dlq_n, dups = store.stored_tags(topic), len(store.dlq.get(topic, [])), store.duplicates(topic)
        assert dups == 0, f"{topic}: {dups} events stored twice"
        if ".v2." in topic:
            stored_ids = set(store.stored_ids(topic).tolist())
            dlq_ids = store.dlq_ids(topic)
            acked = {event_id(int(topic.rsplit('.', 1)[1]), i) for i in range(facts["sent"])} - facts["nacked"]
            missing = acked - stored_ids - dlq_ids
            lost += len(missing)
            assert not missing, f"{topic}: {len(missing)} ACKed events neither stored nor in the DLQ"
            assert facts["nacked"] <= dlq_ids, f"{topic}: NACKed events missing from the DLQ"
        if ".udp." not in topic:
            assert len(tags) + dlq_n == facts["sent"], \
                f"{topic}: stored {len(tags)} + DLQ {dlq_n} != sent {facts['sent']}"
            assert set(tags.tolist()) <= set(range(facts["sent"])), f"{topic}: stored tags that were never sent"
    udp_topic = "mix.udp.4"
    udp_taken = udp_stats["frames_accepted"] + sum(udp_stats["frames_rejected"].values())
    udp_have = len(store.stored_tags(udp_topic)) + len(store.dlq.get(udp_topic, []))
    lost += max(0, udp_taken - udp_have)
    assert udp_have == udp_taken, f"UDP: server took {udp_taken} frames, stored+DLQ hold {udp_have}"
    accepted = tcp_stats["frames_accepted"] + udp_stats["frames_accepted"]
    assert summary["received"] == accepted, f"metrics received {summary['received']} != ingest accepted {accepted}"
    assert summary["dropped"] == store.dlq_total, f"metrics dropped {summary['dropped']} != DLQ lines {store.dlq_total}"
    assert store.stored_total + store.dlq_total == accepted + sum(tcp_stats["frames_rejected"].values()) \
        + sum(udp_stats["frames_rejected"].values()) - summary["dedup_hits"]
    prios = np.unique(np.concatenate([store.stored_tags(t) % 5 for t in out])) if out else []
    assert len(prios) == 5, "every priority (so every queue) carried events"
    tally.add(moved=store.stored_total, lost=lost, dlq=store.dlq_total, dlq_by_reason=summary["dropped_by_reason"],
              udp_kernel_drops=per - udp_taken)
