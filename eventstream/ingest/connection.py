"""One TCP connection's protocol state, without its socket (h11 style): bytes in -> records offered
to the engine, and the ACK/NACK bytes that are due out.

    step = c.receive(data, now)     # the HELLO preamble (auth, tenant), decode, offer, hold, NACKs
    data, done = c.take_due()       # the NACKs and the cumulative ACK whose records are stored
    c.retry_held()                  # offer the held records again (the queues had no room)

`receive` takes the first bytes through the connection's Preamble (preamble.py: the optional HELLO;
a refusal comes back as `step.refusal` with its NACK(0) bytes), then the frame decoder (frames are
counted by the decoder: a BATCH frame's events each have their own index) and offers the records
through the reader's Delivery (delivery.py: `Engine.offer`). Rejected frames are NACKed by index;
records the engine cannot take now are held (`held`), and the socket loop stops reading until
`retry_held` placed them. ACKs are watermarks: each read becomes a chunk (the accepted count after
it, the completion marks of its records, its NACKs); chunks complete in order, and `take_due` gives
the bytes of the complete leading chunks. Everything here runs without a socket
(tests/ingest/test_connection.py, test_ack_state.py); reader.py is the socket loop that feeds it and
writes what it returns, and owns the limits across connections (partial bytes, timeouts, rates).

A connection is owned by exactly one reader thread for its whole life, so these fields need no locks.
The only fields other threads read are `partial` and `closed` (PartialBudget.largest in limits.py
picks the connection with the largest partial frame across readers; its owner re-checks).
"""

from __future__ import annotations

import collections
import socket
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from eventstream.core.payloads import release_records
from eventstream.core.records import ACK_ACCEPTED, FLAG_ACK_MASK, FLAG_ACK_SHIFT, SMALL_BATCH
from eventstream.ingest.limits import REASON_AUTH, REASON_TENANT
from eventstream.ingest.tenants import admit
from eventstream.protocol.decoder import FrameDecoder, FrameError
from eventstream.protocol.frames import LENGTH_BYTES, V2_HEAD, encode_ack, encode_nack, encode_nacks

if TYPE_CHECKING:
    from eventstream.ingest.delivery import Delivered, Delivery
    from eventstream.ingest.limits import RejectMeter
    from eventstream.ingest.preamble import Preamble
    from eventstream.ingest.tenants import Tenants

log = structlog.get_logger("eventstream.ingest.tcp")

# records still held when a draining stop ends: dead-lettered and NACKed (metrics category "shutdown")
REASON_HELD_AT_STOP = "shutdown: held (the queues had no room) when the server stopped; not ACKed"
_STRONGER_THAN_ACCEPTED = ACK_ACCEPTED << FLAG_ACK_SHIFT


def marks_done(marks) -> bool:
    return all(ring.completed() >= end for ring, end in marks)


def wants_completion(flags: np.ndarray) -> bool:
    """Does any record ask for more than `accepted` (stored or synced)?"""
    if len(flags) <= SMALL_BATCH:  # the common small read: plain ints beat numpy temporaries
        return any((f & FLAG_ACK_MASK) > _STRONGER_THAN_ACCEPTED for f in flags.tolist())
    return bool(((flags & FLAG_ACK_MASK) > _STRONGER_THAN_ACCEPTED).any())


class Step:
    """What one `receive` asks of the socket loop."""

    __slots__ = ("pending", "refusal", "counted", "send", "records", "errors", "fatal", "garbage", "chunk_ended")

    def __init__(self) -> None:
        self.pending = False  # the preamble needs more bytes: nothing was decoded
        self.refusal = ""  # refuse the connection (its NACK(0) is in `send`): half-close, linger
        self.counted = ""  # the limit a refusal is counted as (limits.REASON_AUTH / REASON_TENANT)
        self.send = b""  # bytes to write now (a refusal's NACK; ACKs come from take_due)
        self.records = 0  # events decoded in this read
        self.errors = 0  # frames rejected in this read
        self.fatal: FrameError | None = None  # a framing error: stop reading, close once ACKed
        self.garbage = False  # over max_rejects_per_s without one good frame: close once ACKed
        self.chunk_ended = False  # everything read is placed: a chunk was added (ACKs may be due)


class Connection:
    __slots__ = (
        "sock",
        "conn_id",
        "peer",
        "decoder",
        "v2",
        "accepted",
        "acked",
        "chunks",
        "held",
        "held_idx",
        "open_marks",
        "open_nacks",
        "open_ts",
        "blocked",
        "outbox",
        "last_active",
        "tokens",
        "resume_at",
        "reading",
        "closing",
        "closed",
        "partial",
        "partial_since",
        "preamble",
        "handshaking",
        "meter",
        "linger_until",
        "principal",
        "principal_id",
        "tenant",
        "window_bytes",
        "window_start",
        "delivery",
        "tenant_set",
        "urgent_part",
    )

    def __init__(
        self,
        sock: socket.socket | ssl.SSLSocket,
        conn_id: int,
        peer,
        decoder: FrameDecoder,
        now: float,
        burst: float,
        *,
        delivery: Delivery | None = None,
        preamble: Preamble | None = None,
        meter: RejectMeter | None = None,
        tenants: Tenants | None = None,
    ):
        """`sock`: the socket loop's (never used here: tests drive a connection with None);
        `delivery`: the reader thread's way into the engine; `preamble`: the HELLO check (None: none,
        the first bytes are frames); `meter`: rejected frames per second; `tenants`: admitted once
        the preamble is over."""
        self.sock = sock
        self.delivery = delivery
        self.tenant_set = tenants
        self.conn_id = conn_id
        self.peer = peer
        self.decoder = decoder
        self.v2 = False
        self.accepted = 0  # records placed in the engine (v1 and v2)
        self.acked = 0  # the last ACK sent
        self.chunks: collections.deque = collections.deque()  # (count after, marks, nack bytes, ingest ns)
        self.held: np.ndarray | None = None  # records not placed yet (the connection stops reading)
        self.held_idx: np.ndarray | None = None
        self.blocked: Sequence[Any] = ()  # the full rings that held records back (retried once they have room)
        self.open_marks: list = []  # marks and NACKs of the chunk whose records are partly held
        self.open_nacks = b""
        self.open_ts = 0  # decode time of the chunk's first records (all records of a read share it)
        self.outbox = bytearray()
        self.last_active = now
        self.tokens = burst
        self.resume_at = 0.0
        self.reading = True
        self.closing = ""  # why it closes once its chunks are complete ("" = open)
        self.closed = False
        self.partial = 0  # bytes of an incomplete frame in the decoder (accounted in Reader.partial_bytes)
        self.partial_since = 0.0  # when the current partial frame started (or reading last resumed)
        self.preamble: Preamble | None = preamble  # until the first frame is known (HELLO or not)
        self.handshaking = False  # TLS handshake not finished (tls.py)
        self.meter: RejectMeter | None = meter  # rejected frames per second (the reader gives each one)
        self.linger_until = 0.0  # refused: its reads are discarded until EOF or this time, then closed
        self.principal = None  # auth.Principal once its HELLO was accepted (None: no tokens configured)
        self.principal_id = 0  # its small integer (0: shared token or none; auth.py)
        self.tenant = None  # tenants.Tenant once admitted (its connection is counted there)
        self.window_bytes = 0  # bytes read since window_start (server.tcp.min_bytes_per_s)
        self.window_start = now
        self.urgent_part: tuple[Delivered, int] | None = None  # _offer_urgent: (what it did, events)

    # ------------------------------------------------------------ bytes in: preamble, decode, offer, hold
    def receive(self, data, now: float) -> Step:
        """Bytes read from the client (b"": decode what the decoder kept while the payload arena was
        full). The preamble first, then decode and offer; see Step for what the caller does next."""
        step = Step()
        if self.preamble is not None:
            rest, refusal = self.preamble.feed(data)
            if isinstance(data, memoryview):
                data.release()
            if not refusal and rest is not None:
                ip = self.peer[0] if isinstance(self.peer, tuple) and self.peer else str(self.peer)
                tenants = self.tenant_set
                if tenants is not None:
                    refusal = admit(self, self.preamble.principal, ip, tenants)
                    if refusal:
                        step.counted = REASON_TENANT
            if refusal:
                step.refusal, step.counted = refusal, step.counted or REASON_AUTH
                step.send = encode_nack(0, refusal)
                self.preamble = None
                return step
            if rest is None:
                step.pending = True
                return step
            self.preamble = None
            self.partial_since = now  # the first frame starts now (the preamble was timed until here)
            data = memoryview(rest)
        self._decode_offer(data, now, step)
        return step

    def _decode_offer(self, data, now: float, step: Step) -> None:
        delivery, meter = self.delivery, self.meter
        assert delivery is not None and meter is not None  # given to every connection that reads
        # the realtime priorities: their frames are offered before the rest of the read is decoded, unless
        # the control plane holds some priorities now (then a read is held from its first frame not admitted)
        urgent = delivery.urgent if delivery.urgent is not None and not delivery.admitted_below() else None
        records, indices, errors = self.decoder.feed_indexed(data, urgent, self._offer_urgent if urgent else None)
        if isinstance(data, memoryview):
            data.release()
        early, self.urgent_part = self.urgent_part, None
        # a v2 frame in this read, accepted or rejected, makes it a v2 connection before the NACKs of
        # this read are built (a v1 record next to a rejected v2 frame must not hide its NACK)
        if not self.v2 and ((len(records) and records["flags"].any()) or any(e.version == 2 for e in errors)):
            self.v2 = True
        fatal = errors[-1] if errors and errors[-1].fatal else None
        if fatal is not None and fatal.version == 2:
            self.v2 = True
        good = len(records) + (early[1] if early is not None else 0)
        report = None
        if errors:
            report, ended = meter.admit(len(errors), good, now)
            if ended:
                delivery.report_suppressed(self.conn_id, ended, "server.tcp.max_rejects_per_s", meter.limit)
        elif good:
            meter.good += good
        d = delivery.deliver(records, indices, errors, self.conn_id, want_nacks=self.v2, report_errors=report)
        if d.marks and self.v2 and not wants_completion(records["flags"]):
            d.marks = []  # every frame asked for `accepted` (or is v1): complete once placed
        if early is not None:
            _join(early[0], d)
            step.records = early[1]  # the events decoded first count with this read's
        self.accepted += d.accepted
        if self.v2:
            self.open_marks.extend(d.marks)
            self.open_nacks += d.nacks
            if not self.open_ts and len(records):
                self.open_ts = int(records["ingest_ts"][0])
        if d.held is not None:
            self.held, self.held_idx, self.blocked = d.held, d.held_indices, d.blocked
        else:
            step.chunk_ended = self.end_chunk()
        step.records, step.errors, step.fatal = step.records + len(records), len(errors), fatal
        step.garbage = bool(errors) and meter.garbage_only

    def _offer_urgent(self, records: np.ndarray, indices: np.ndarray) -> None:
        """The decoder's handover of a read's realtime frames (v2 EVENT frames, decoded before the
        rest of the read): offered at once; _decode_offer joins what happened to them with the rest
        (their NACKs in frame order, records held with the rest's, one chunk for the read)."""
        assert self.delivery is not None  # called from _decode_offer
        self.v2 = True
        d = self.delivery.deliver(records, indices, [], self.conn_id, want_nacks=True)
        if d.marks and not wants_completion(records["flags"]):
            d.marks = []
        if not self.open_ts:
            self.open_ts = int(records["ingest_ts"][0])
        self.urgent_part = (d, len(records))

    def may_progress(self) -> bool:
        """Whether offering the held records again can place some: the control plane admits the
        first of them, and every queue that was full has room for a fair share again."""
        held = self.held
        assert held is not None and self.delivery is not None  # asked only while holding records
        lo = self.delivery.admitted_below()
        if lo and int(held["priority"][0]) < lo:
            return False
        return all(ring.capacity - ring.depth >= min(len(held), ring.capacity // 8) for ring in self.blocked)

    def retry_held(self) -> bool:
        """Offer the held records again (when they may progress). True once none are held (then their
        chunk ended: ACKs may be due)."""
        if self.held is None:
            return True
        assert self.held_idx is not None and self.delivery is not None  # held with their frame indices
        if not self.may_progress():
            return False  # cheap checks first: offering a large held batch again costs more
        d = self.delivery.deliver(self.held, self.held_idx, [], self.conn_id, want_nacks=self.v2, retry=True)
        self.accepted += d.accepted
        if self.v2:
            self.open_marks.extend(d.marks)
            self.open_nacks += d.nacks
        if d.held is not None:
            self.held, self.held_idx, self.blocked = d.held, d.held_indices, d.blocked
            return False
        self.held = self.held_idx = None
        self.blocked = ()
        self.end_chunk()
        return True

    def dead_letter_held(self) -> None:
        """Stopping with records still held (the queues never had room): they were never ACKed; they
        go to the dead-letter log (replayable) and a v2 client gets their NACKs once everything before
        them is complete (the protocol's order: they end the open chunk)."""
        held, idx, delivery = self.held, self.held_idx, self.delivery
        assert held is not None and idx is not None and delivery is not None  # holding records
        self.held = self.held_idx = None
        log.warning("held_records_dead_lettered_at_stop", conn_id=self.conn_id, records=len(held))
        delivery.stats.backpressure_drops += len(held)
        delivery.stats.frames_rejected[REASON_HELD_AT_STOP] += len(held)
        if delivery.on_reject is not None:
            try:
                delivery.on_reject(held, REASON_HELD_AT_STOP, [])
            except Exception as exc:  # noqa: BLE001 - the engine's callback: log, keep stopping
                log.error("on_reject_failed", error=repr(exc))
        release_records(held)  # dead-lettered with their payloads: the arena slots go back
        if self.v2 and not self.closed:
            self.open_nacks += encode_nacks(idx, REASON_HELD_AT_STOP)
            self.end_chunk()

    def release(self) -> None:
        """The connection is closed: held records give their payload slots back (never placed nor
        ACKed), suppressed rejects get their summary."""
        if self.held is not None:
            release_records(self.held)
            self.held = self.held_idx = None
        meter, delivery = self.meter, self.delivery
        if meter is not None and meter.suppressed and delivery is not None:
            n = meter.take_suppressed()
            delivery.report_suppressed(self.conn_id, n, "server.tcp.max_rejects_per_s", meter.limit)

    # ------------------------------------------------------------ ACK bookkeeping (no socket: testable alone)
    def end_chunk(self) -> bool:
        """Everything read so far is placed: it becomes a chunk waiting for its marks (v2 only).
        Returns whether a chunk was added (then ACKs may be due)."""
        if not self.v2:
            return False
        if self.open_marks or self.open_nacks or self.accepted != self.acked:
            self.chunks.append((self.accepted, self.open_marks, self.open_nacks, self.open_ts))
            self.open_marks, self.open_nacks, self.open_ts = [], b"", 0
            return True
        return False

    def take_due(self) -> tuple[bytes, list[tuple[int, int]]]:
        """Pop the leading chunks whose completion marks are all passed (chunks complete in order).
        Returns the bytes to send for them (their NACKs in order, then one cumulative ACK if it moved)
        and (events, decode ns) of each completed chunk that accepted events."""
        chunks = self.chunks
        top = -1
        out: list[bytes] = []
        done: list[tuple[int, int]] = []
        prev = self.acked
        while chunks:
            count, marks, nk, ts = chunks[0]
            if marks and not marks_done(marks):
                break
            chunks.popleft()
            if nk:
                out.append(nk)
            if count > prev and ts:
                done.append((count - prev, ts))
            prev = count
            top = count
        if top >= 0 and top != self.acked:
            out.append(encode_ack(top))
            self.acked = top
        return b"".join(out), done

    @property
    def busy(self) -> bool:
        """Something read is not yet acknowledged (held records, chunks in flight, or frames kept
        undecoded while the payload arena is full)."""
        return self.held is not None or bool(self.chunks) or bool(self.decoder.arena_blocked)


def _join(early: Delivered, d: Delivered) -> None:
    """Fold what happened to a read's realtime frames (offered first) into the delivery of the rest:
    counts, marks, NACKs in frame-index order, held records (in frame order) and their full rings."""
    d.accepted += early.accepted
    d.marks = early.marks + d.marks
    if early.nacks:
        d.nacks = _by_index(early.nacks + d.nacks) if d.nacks else early.nacks
    if early.held is not None:
        if d.held is None:
            d.held, d.held_indices = early.held, early.held_indices
        else:
            idx = np.concatenate((early.held_indices, d.held_indices))
            order = np.argsort(idx, kind="stable")
            d.held, d.held_indices = np.concatenate((early.held, d.held))[order], idx[order]
        d.blocked = [*early.blocked, *d.blocked]


def _by_index(nacks: bytes) -> bytes:
    """NACK frames sorted by the frame index they name (stable)."""
    frames = []
    pos = 0
    while pos < len(nacks):
        length, _m, _k, _p, _f, index, *_rest = V2_HEAD.unpack_from(nacks, pos)
        end = pos + LENGTH_BYTES + length
        frames.append((index, nacks[pos:end]))
        pos = end
    frames.sort(key=lambda t: t[0])
    return b"".join(f for _i, f in frames)


def peer_ip(peer) -> str:
    return peer[0] if isinstance(peer, tuple) and peer else str(peer)
