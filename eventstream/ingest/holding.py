"""How a TCP reader holds records the engine cannot take now (see reader.py, "Backpressure"): it stops
reading the connection, offers the held records again when the queues (or the payload arena) have
room, and at a draining stop dead-letters and NACKs what never got in. A mixin of reader.Reader: these
run on the reader's own thread, on connections it owns.
"""

from __future__ import annotations

import time

import numpy as np
import structlog

from eventstream.core.payloads import release_records
from eventstream.ingest.connection import Connection
from eventstream.protocol.frames import encode_nacks

log = structlog.get_logger("eventstream.ingest.tcp")

# records still held when a draining stop ends: dead-lettered and NACKed (metrics category "shutdown")
REASON_HELD_AT_STOP = "shutdown: held (the queues had no room) when the server stopped; not ACKed"


class Holding:
    """Reader methods for held records (pushback)."""

    def _hold(self, c: Connection, held: np.ndarray, held_idx: np.ndarray, blocked=()) -> None:
        c.held, c.held_idx, c.blocked = held, held_idx, blocked
        if c not in self.stalled:
            self.stalled.add(c)
            self._interest(c, False)

    def _retry_held(self, c: Connection) -> None:
        if c.closed:
            self.stalled.discard(c)
            return
        if c.held is not None:
            if not self._may_progress(c):
                return  # cheap checks first: offering a large held batch again costs more
            d = self.delivery.deliver(c.held, c.held_idx, [], c.conn_id, want_nacks=c.v2, retry=True)
            c.accepted += d.accepted
            if c.v2:
                c.open_marks.extend(d.marks)
                c.open_nacks += d.nacks
            if d.held is not None:
                c.held, c.held_idx, c.blocked = d.held, d.held_indices, d.blocked
                return
            c.held = c.held_idx = None
            c.blocked = ()
            self._end_chunk(c)
        need = c.decoder.arena_blocked
        if need:  # frames kept undecoded while the payload arena was full
            if not self.payloads.has_room(need):
                return
            self.stalled.discard(c)
            self._consume(c, b"", time.monotonic())
            if c.closed or c in self.stalled:
                return
        self.stalled.discard(c)
        if c.closing and not c.v2:
            self._close(c, c.closing)
        elif not c.closing and c not in self.throttled:
            c.partial_since = time.monotonic()  # it could not progress while held
            self._interest(c, True)

    def _may_progress(self, c: Connection) -> bool:
        """Whether offering `c`'s held records again can place some: the control plane admits the
        first of them, and every queue that was full has room for a fair share again."""
        lo = self.delivery.admitted_below()
        if lo and int(c.held["priority"][0]) < lo:
            return False
        for ring in c.blocked:
            if ring.capacity - ring.depth < min(len(c.held), ring.capacity // 8):
                return False
        return True

    def _dead_letter_held(self, c: Connection) -> None:
        """Stopping with records still held (the queues never had room within the stop budget): they
        were never ACKed; they go to the dead-letter log (replayable) and a v2 client gets their
        NACKs once everything before them is complete (the protocol's order)."""
        held, idx = c.held, c.held_idx
        c.held = c.held_idx = None
        self.stalled.discard(c)
        log.warning("held_records_dead_lettered_at_stop", conn_id=c.conn_id, records=len(held))
        self.stats.backpressure_drops += len(held)
        self.stats.frames_rejected[REASON_HELD_AT_STOP] += len(held)
        if self.delivery.on_reject is not None:
            try:
                self.delivery.on_reject(held, REASON_HELD_AT_STOP, [])
            except Exception as exc:
                log.error("on_reject_failed", error=repr(exc))
        release_records(held)  # dead-lettered with their payloads: the arena slots go back
        if c.v2 and not c.closed:  # they end the open chunk: sent once everything in it is complete
            c.open_nacks += encode_nacks(idx, REASON_HELD_AT_STOP)
            self._end_chunk(c)
