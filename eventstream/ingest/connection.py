"""One TCP connection as its reader thread sees it: socket, decoder, ACK watermarks, held records.

A connection is owned by exactly one reader thread (reader.py) for its whole life, so these fields
need no locks. The only fields other threads read are `partial` and `closed` (PartialBudget.largest in
limits.py picks the connection with the largest partial frame across readers; its owner re-checks).

The ACK bookkeeping is here and touches no socket (`end_chunk`, `take_due`: records placed -> chunks
with completion marks -> the NACK and ACK bytes that are due), so it is tested without sockets
(tests/ingest/test_ack_state.py); reader.py writes the bytes.
"""

from __future__ import annotations

import collections
import socket
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import encode_ack

if TYPE_CHECKING:
    from eventstream.ingest.limits import RejectMeter
    from eventstream.ingest.preamble import Preamble


def marks_done(marks) -> bool:
    return all(ring.completed() >= end for ring, end in marks)


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
    )

    def __init__(
        self, sock: socket.socket | ssl.SSLSocket, conn_id: int, peer, decoder: FrameDecoder, now: float, burst: float
    ):
        self.sock = sock
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
        self.preamble: Preamble | None = None  # until the first frame is known (HELLO or not)
        self.handshaking = False  # TLS handshake not finished (tls.py)
        self.meter: RejectMeter | None = None  # rejected frames per second (the reader gives each one)
        self.linger_until = 0.0  # refused: its reads are discarded until EOF or this time, then closed
        self.principal = None  # auth.Principal once its HELLO was accepted (None: no tokens configured)
        self.principal_id = 0  # its small integer (0: shared token or none; auth.py)
        self.tenant = None  # tenants.Tenant once admitted (its connection is counted there)
        self.window_bytes = 0  # bytes read since window_start (server.tcp.min_bytes_per_s)
        self.window_start = now

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


def peer_ip(peer) -> str:
    return peer[0] if isinstance(peer, tuple) and peer else str(peer)
