"""One TCP connection as its reader thread sees it: socket, decoder, ACK watermarks, held records.

A connection is owned by exactly one reader thread (reader.py) for its whole life, so these fields
need no locks. The only fields other threads read are `partial` and `closed` (PartialBudget.largest in
limits.py picks the connection with the largest partial frame across readers; its owner re-checks).
"""

from __future__ import annotations

import collections
import socket

import numpy as np

from eventstream.protocol.decoder import FrameDecoder


def marks_done(marks) -> bool:
    for ring, end in marks:
        if ring.completed() < end:
            return False
    return True


class Connection:
    __slots__ = ("sock", "conn_id", "peer", "decoder", "v2", "accepted", "acked", "chunks", "held", "held_idx",
                 "open_marks", "open_nacks", "open_ts", "blocked", "outbox", "last_active", "tokens", "resume_at", "reading", "closing",
                 "closed", "partial", "partial_since", "preamble", "handshaking", "meter",
                 "linger_until", "principal", "principal_id")

    def __init__(self, sock: socket.socket, conn_id: int, peer, decoder: FrameDecoder, now: float, burst: float):
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
        self.blocked = ()  # the full rings that held records back (retried once they have room)
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
        self.preamble = None  # preamble.Preamble until the first frame is known (HELLO or not)
        self.handshaking = False  # TLS handshake not finished (tls.py)
        self.meter = None  # limits.RejectMeter: rejected frames per second
        self.linger_until = 0.0  # refused: its reads are discarded until EOF or this time, then closed
        self.principal = None  # auth.Principal once its HELLO was accepted (None: no tokens configured)
        self.principal_id = 0  # its small integer (0: shared token or none; auth.py)

    @property
    def busy(self) -> bool:
        """Something read is not yet acknowledged (held records, chunks in flight, or frames kept
        undecoded while the payload arena is full)."""
        return self.held is not None or bool(self.chunks) or bool(self.decoder.arena_blocked)


def peer_ip(peer) -> str:
    return peer[0] if isinstance(peer, tuple) and peer else str(peer)
