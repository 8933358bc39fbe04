"""How a TCP reader acknowledges: chunks, watermark ACKs, NACKs, the outbox (see reader.py for the
model). A mixin of reader.Reader: these run on the reader's own thread, on connections it owns.
"""

from __future__ import annotations

import ssl
import time

import numpy as np

import structlog

from eventstream.ingest.connection import Connection, marks_done
from eventstream.protocol.frames import encode_ack

log = structlog.get_logger("eventstream.ingest.tcp")

MAX_OUTBOX_BYTES = 4 << 20  # a client that never reads its ACKs is disconnected past this
# a non-blocking send/recv that cannot proceed now (TLS: a record needs more bytes or room)
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Acknowledger:
    """Reader methods that turn placed records into chunks and send ACKs/NACKs as they complete."""

    def _end_chunk(self, c: Connection) -> None:
        """Everything read so far is placed: it becomes a chunk waiting for its marks."""
        if not c.v2:
            return
        if c.open_marks or c.open_nacks or c.accepted != c.acked:
            c.chunks.append((c.accepted, c.open_marks, c.open_nacks, c.open_ts))
            c.open_marks, c.open_nacks, c.open_ts = [], b"", 0
            self._ack_due(c)

    def _ack_due(self, c: Connection) -> None:
        """Send the NACKs and the cumulative ACK of every leading chunk that is complete."""
        if c.closed:
            self.awaiting.discard(c)
            return
        chunks = c.chunks
        if chunks:
            self.want_nudge = True  # before reading the marks: a release after this point wakes us
        top = -1
        nacks = []
        done = []  # (events, decode ns) of the completed chunks, for the "acked" stage latency
        prev = c.acked
        while chunks:
            count, marks, nk, ts = chunks[0]
            if marks and not marks_done(marks):
                break
            chunks.popleft()
            if nk:
                nacks.append(nk)
            if count > prev and ts:
                done.append((count - prev, ts))
            prev = count
            top = count
        if top >= 0:
            if top != c.acked:
                nacks.append(encode_ack(top))
                c.acked = top
            self._write(c, b"".join(nacks))
            if done and self.on_acked is not None:
                now = time.monotonic_ns()
                if len(done) == 1 and done[0][0] <= 8:  # a few events: a list, no numpy temporaries
                    self.on_acked([now - done[0][1]] * done[0][0])
                else:
                    self.on_acked(np.repeat(np.array([now - ts for _, ts in done], dtype=np.int64),
                                            [k for k, _ in done]))
        if chunks:
            self.awaiting.add(c)
        else:
            self.awaiting.discard(c)
            if c.closing and c.held is None:
                self._flush_blocking(c, 0.5)
                self._close(c, c.closing)

    def _finish(self, c: Connection, why: str) -> None:
        """Stop reading `c`; close it once what it sent is placed and acknowledged."""
        c.closing = why
        self._interest(c, False)
        if c.held is not None:
            return  # closes once the held records went in (_retry_held)
        if not c.v2:
            self._close(c, why)
            return
        if c.held is None:
            self._end_chunk(c)
            self._ack_due(c)

    def _write(self, c: Connection, data: bytes) -> None:
        if c.closed or not data:
            return
        if c.outbox:
            c.outbox += data
        else:
            try:
                sent = c.sock.send(data)
            except WOULD_BLOCK:
                sent = 0
            except OSError:
                self._close(c, "reset")
                return
            if sent < len(data):
                c.outbox += data[sent:]
        if len(c.outbox) > MAX_OUTBOX_BYTES:
            self._close(c, "not_reading_acks", outbox=len(c.outbox))
        elif c.outbox:
            self._interest(c, c.reading)

    def _flush(self, c: Connection) -> None:
        try:
            sent = c.sock.send(c.outbox)
        except WOULD_BLOCK:
            return
        except OSError:
            self._close(c, "reset")
            return
        del c.outbox[:sent]
        if not c.outbox:
            self._interest(c, c.reading)

    def _flush_blocking(self, c: Connection, timeout: float) -> None:
        if c.closed or not c.outbox:
            return
        try:
            c.sock.settimeout(timeout)
            c.sock.sendall(bytes(c.outbox))
            c.outbox.clear()
        except OSError:
            pass
