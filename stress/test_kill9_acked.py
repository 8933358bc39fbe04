"""kill -9 of `eventstream serve` again and again under load with `server.ack: stored`.

Several client threads stream events of every priority, each with a unique id, to a real `serve`
process; the server is SIGKILLed while they send, restarted on the same data dir, and the clients
resend what was not ACKed (same ids), as a client of an at-least-once engine does. After the last
round a clean stop. Checks, event by event (ids encode the sender and the payload tag):
* every event ACKed before any kill is in events.bin (the `stored` promise survives kill -9);
* nothing is stored twice: a resend of an event that was stored but not yet ACKed when the server
  died is recognised after the restart (dedup tables rebuilt from events.bin);
* nothing invalid is stored: every stored id was sent, with its own payload.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

from stress_helpers import Server, scaled, wait_until
from verify import Store, event_id, payload

from eventstream.client import ClientError, TcpClient

SENDERS = 4
TOPICS = [f"kill.t{k}" for k in range(SENDERS)]


class Sender:
    """One sender: a queue of events to (re)send, and what the server ACKed of them."""

    def __init__(self, k: int):
        self.k = k
        self.next_i = 0
        self.todo: list[int] = []  # indexes to resend first (not ACKed when the server died)
        self.acked: set[int] = set()
        self.sent: set[int] = set()
        self.client: TcpClient | None = None

    def run(self, address, stop: threading.Event, per_round: int) -> None:
        """Send until `stop` or the server dies; record what was ACKed."""
        queue = self.todo + list(range(self.next_i, self.next_i + per_round))
        self.next_i += per_round
        n = 0  # queue[:n] were handed to the client
        try:
            c = self.client = TcpClient(*address, version=2, batch_size=64, timeout=10, reconnect=False).connect()
        except (ClientError, OSError):
            self.todo = queue
            return
        try:
            while n < len(queue) and not stop.is_set():
                i = queue[n]
                n += 1
                self.sent.add(i)
                c.send(TOPICS[self.k], payload(self.tag(i)), priority=i % 5, event_id=event_id(self.k + 1, i))
            if n == len(queue):
                c.wait_acked(10)
        except (ClientError, OSError):
            pass  # the server was killed: expected
        finally:
            try:
                c.close()
            except OSError:
                pass
        resolved = c.acked + len(c.nacks)  # frames resolve in order (docs/protocol.md, client rule)
        nacked = {eid for eid, _ in c.nacks}
        for i in queue[:min(resolved, n)]:
            if event_id(self.k + 1, i) not in nacked:
                self.acked.add(i)
        self.todo = [i for i in queue[:n] if i not in self.acked] + queue[n:]

    def tag(self, i: int) -> int:
        return (self.k << 32) | i


def test_repeated_kill9_under_load_loses_no_acked_event_and_stores_each_once(tmp_path, tally):
    data = tmp_path / "data"
    log_path = tmp_path / "serve.log"
    rounds, per_round = scaled(10, 3), scaled(20_000, 2_000)
    rng = random.Random(9)
    senders = [Sender(k) for k in range(SENDERS)]
    acked_before_kill: set[tuple[int, int]] = set()
    for _ in range(rounds):
        srv = Server(data, log_path, "server.ack=stored")
        stop = threading.Event()
        for s in senders:
            s.client = None
        threads = [threading.Thread(target=s.run, args=(srv.address, stop, per_round)) for s in senders]
        try:
            for t in threads:
                t.start()
            # kill while events are in flight: once some ACKs came back, after a random extra moment
            wait_until(lambda: all(s.client is not None and s.client.acked > 0 for s in senders), 60,
                       "the first ACKs of every sender")
            threading.Event().wait(rng.uniform(0.05, 0.4))  # a random point of the stream, not a sync
            srv.kill9()
            stop.set()
        finally:
            if srv.proc.poll() is None:
                srv.proc.kill()
                srv.wait(30)
            for t in threads:
                t.join(60)
        assert not any(t.is_alive() for t in threads), "a sender did not finish after the kill"
        acked_before_kill |= {(s.k, i) for s in senders for i in s.acked}
        # the promise: what was ACKed before this kill is in events.bin now (read it cold)
        store = Store(data)
        have = {(k, t & 0xFFFFFFFF) for k, topic in enumerate(TOPICS) if topic in store.tags
                for t in store.stored_tags(topic).tolist()}
        missing = acked_before_kill - have
        assert not missing, f"{len(missing)} ACKed events are not in events.bin after kill -9"

    # last round: resend everything not ACKed, then a clean stop
    srv = Server(data, log_path, "server.ack=stored")
    try:
        for s in senders:
            c = TcpClient(*srv.address, version=2, batch_size=64, timeout=60).connect()
            for i in s.todo:
                s.sent.add(i)
                c.send(TOPICS[s.k], payload(s.tag(i)), priority=i % 5, event_id=event_id(s.k + 1, i))
            assert c.wait_acked(60), f"sender {s.k}: {c.unacknowledged} resent events unacknowledged"
            s.acked |= set(s.todo) - {(eid & ((1 << 40) - 1)) - 1 for eid, _ in c.nacks}
            c.close()
    finally:
        rc = srv.terminate()
    assert rc == 0, f"serve exited {rc} after SIGTERM; log: {log_path}"

    store = Store(data)
    assert store.scan is not None and store.scan.problem is None, f"log does not read to its end: {store.scan}"
    stored_total = dup_total = lost = 0
    for s in senders:
        ids = store.stored_ids(TOPICS[s.k])
        tags = store.stored_tags(TOPICS[s.k])
        idx = (ids & ((1 << 40) - 1)) - 1
        assert ((ids >> 40) == s.k + 1).all(), "an event from another sender is stored under this topic"
        assert (tags == ((s.k << 32) | idx)).all(), "a stored record's payload does not match its event id"
        stored = idx.tolist()
        dup_total += len(stored) - len(set(stored))
        assert set(stored) <= s.sent, "stored ids that were never sent"
        lost += len(s.acked - set(stored))
        stored_total += len(stored)
    tally.add(moved=stored_total, lost=lost, duplicates=dup_total, rounds=rounds)
    assert dup_total == 0, f"{dup_total} events stored twice"
    assert lost == 0, f"{lost} ACKed events are not stored"
