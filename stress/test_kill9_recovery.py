"""kill -9 of `eventstream serve` mid-stream, restart on the same data dir, verify the store.

Phases, against a real `eventstream serve` process:
1. send N events, wait for every ACK, wait until all N are readable in events.bin (durable point);
2. keep streaming and SIGKILL the server while frames are in flight (no drain, no flush);
3. restart on the same data dir: recovery must cut any torn tail and keep every whole entry; send
   more events to the new process and stop it with SIGTERM (drain, exit 0).
Checks: every phase-1 event that was in events.bin (or the DLQ) before the kill is still there, once; phase-2 events in the store were sent,
intact (payload tag matches the id) and not duplicated; every phase-3 event is stored or dead-lettered; the log reads
to its end without a problem after the clean stop.

What the engine promises on a crash: with the default `server.ack: stored` an ACK leaves only once
the event is in events.bin or the DLQ (written to the OS), so no ACKed event may be missing after a
SIGKILL: the test asserts that too (`acked_in_flight_lost` must be 0). test_kill9_acked.py kills
repeatedly under load.
"""

from __future__ import annotations

from pathlib import Path

from stress_helpers import Server, scaled, wait_until
from verify import Store, event_id, payload

from eventstream.client import ClientError, TcpClient

TOPIC = "crash.stream"


def stored_and_dead_lettered(data_dir: Path) -> tuple[set[int], set[int]]:
    """Ids in events.bin and ids in the DLQ (an ACKed event may still be shed later by policy, e.g.
    BATCH priority at the CRITICAL backpressure level: then it is in the DLQ, not the store)."""
    store = Store(data_dir)
    return set(store.stored_ids(TOPIC).tolist()), store.dlq_ids(TOPIC)


def test_kill9_mid_stream_then_restart_keeps_every_stored_event(tmp_path, tally):
    data = tmp_path / "data"
    log_path = tmp_path / "serve.log"
    n1, n2, n3 = scaled(20_000, 1_000), scaled(40_000, 2_000), scaled(10_000, 500)
    srv = Server(data, log_path)
    try:
        # phase 1: durable point
        with TcpClient(*srv.address, version=2, batch_size=128, timeout=60) as c:
            for i in range(n1):
                c.send(TOPIC, payload(i), priority=(2, 3, 0)[i % 3], event_id=event_id(1, i))
            assert c.wait_acked(60), f"phase 1: {c.unacknowledged} events unacknowledged"
            nacked1 = {eid for eid, _ in c.nacks}  # refused under backpressure on a loaded machine
        phase1 = {event_id(1, i) for i in range(n1)}
        wait_until(lambda: phase1 <= set().union(*stored_and_dead_lettered(data)), 120,
                   "phase-1 events to reach events.bin or the DLQ")
        durable_stored, durable_dlq = stored_and_dead_lettered(data)

        # phase 2: kill -9 while frames are in flight
        c2 = TcpClient(*srv.address, version=2, batch_size=256, timeout=10, reconnect=False).connect()
        sent2 = []
        try:
            for i in range(n2):
                sent2.append(c2.send(TOPIC, payload(n1 + i), priority=(2, 3, 0)[i % 3], event_id=event_id(2, i)))
                if i == n2 // 2:
                    wait_until(lambda: c2.acked > 0, 30, "some phase-2 ACKs before the kill")
                    srv.kill9()
                    break
            c2.flush()
        except (ClientError, OSError):
            pass  # the server is gone: expected
        finally:
            try:
                c2.close()  # the server is gone: the ACK reader sees EOF or a reset at once
            except OSError:
                pass
        # the client resolves frames in order: the first acked + nacked sent events are resolved
        nacked2 = {eid for eid, _ in c2.nacks}
        acked2 = set(sent2[:c2.acked + len(c2.nacks)]) - nacked2
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.wait(30)

    # phase 3: restart on the same data dir (recovery), keep working, clean stop
    srv2 = Server(data, log_path)
    try:
        with TcpClient(*srv2.address, version=2, batch_size=128, timeout=60) as c3:
            for i in range(n3):
                c3.send(TOPIC, payload(n1 + n2 + i), priority=(2, 3, 0)[i % 3], event_id=event_id(3, i))
            assert c3.wait_acked(60), f"phase 3: {c3.unacknowledged} events unacknowledged"
            nacked3 = {eid for eid, _ in c3.nacks}
    finally:
        rc = srv2.terminate()
    assert rc == 0, f"serve exited {rc} after SIGTERM; log: {log_path}"

    store = Store(data)
    assert store.scan is not None and store.scan.problem is None, f"log does not read to its end: {store.scan}"
    ids = store.stored_ids(TOPIC)
    tags = store.stored_tags(TOPIC)
    assert len(ids) == len(set(ids.tolist())), f"{len(ids) - len(set(ids.tolist()))} events stored twice"
    have = set(ids.tolist())
    missing1 = (durable_stored - have) | (durable_dlq - store.dlq_ids(TOPIC))
    phase3 = {event_id(3, i) for i in range(n3)}
    missing3 = phase3 - have - store.dlq_ids(TOPIC)
    assert (nacked1 | nacked3) <= store.dlq_ids(TOPIC), "NACKed events without a DLQ line"
    assert not ((nacked1 | nacked3) & have), "NACKed events were stored"
    assert not missing1, f"{len(missing1)} events that were in events.bin or the DLQ before the kill are gone"
    assert not (have & store.dlq_ids(TOPIC)), "events both stored and dead-lettered"
    assert not missing3, f"{len(missing3)} events ACKed by the restarted server are neither stored nor in the DLQ"
    # every record is intact: the id encodes the tag it was sent with
    stream, idx = ids >> 40, (ids & ((1 << 40) - 1)) - 1
    expect = idx + (stream >= 2) * n1 + (stream >= 3) * n2
    assert (tags == expect).all(), "a stored record's payload does not match its event id"
    unknown = have - phase1 - phase3 - set(sent2)
    assert not unknown, f"{len(unknown)} stored ids were never sent"
    acked_lost = len(acked2 - have - store.dlq_ids(TOPIC))
    tally.add(moved=len(have), lost=len(missing1) + len(missing3) + acked_lost, acked_in_flight_lost=acked_lost,
              phase2_stored=len(have & set(sent2)), phase2_acked=len(acked2))
    assert not acked_lost, f"{acked_lost} of {len(acked2)} phase-2 events ACKed before the kill are gone"
