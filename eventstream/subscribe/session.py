"""One subscriber connection: handshake, then a sender loop and a reader thread.

The session's own thread does the handshake (an optional HELLO, then SUBSCRIBE) and then sends: it
takes up to `credit` events from its source (subscribe/groups.py: a storage.tail.TailBatch, columns)
and sends them as DELIVER_BATCH frames built from the columns (or one DELIVER frame per event);
with no credit, or at the end of the log, it waits on its own Event. That Event is set by the reader
thread (CREDIT arrived, the connection closed), by the log's Progress (an append; registered only while
the session waits at the end of the log) and by its group (a member left, handing events back). The
wait has a bound (WAIT_S) as a safety net only.

The reader thread reads CREDIT and COMMIT frames. A protocol error gets a SUB_ERROR frame naming the
field and what is allowed; the server then closes the connection.

The handshake (TLS when `server.tls` is configured, the optional HELLO, SUBSCRIBE) has one total
deadline, `server.subscribe.handshake_timeout_s`: a client trickling bytes does not extend it. With TLS
the socket is non-blocking and every read or write holds `io_lock` for one call (an SSL object must
not be used by two threads at once: the reader thread reads while the session thread sends); the
waits happen outside the lock. A plain-text client on a TLS port gets a clear-text SUB_ERROR saying so.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import select
import socket
import ssl
import threading
import time

import numpy as np
import structlog

from eventstream.ingest.tls import PLAIN_TEXT_REASON, TLS_RECORD_HANDSHAKE
from eventstream.protocol import subscribe as sp
from eventstream.protocol.frames import parse_hello
from eventstream.storage.tail import TailBatch
from eventstream.subscribe.groups import GroupError, GroupSource, SoloSource, open_tail

log = structlog.get_logger("eventstream.subscribe")

WAIT_S = 1.0
IOV_MAX = 1024  # buffers per sendmsg (Linux)
MAX_SEND_EVENTS = 65536  # events per write (at most what one read of the log returns)


def deliver_batch_frames(batch: TailBatch) -> list[bytes]:
    """deliver_batch_buffers, one bytes object per frame."""
    bufs = deliver_batch_buffers(batch)
    return [b"".join(f) for f in bufs]


def deliver_batch_buffers(batch: TailBatch) -> list[list]:
    """DELIVER_BATCH frames (docs/protocol.md kind 12) for the events of `batch`, from its columns with a
    constant number of numpy operations, each as the buffers to write in order (header, topic table,
    record table, payloads: nothing copied; a plain socket takes them with one sendmsg): the record
    table of every frame is a slice of one structured array, each frame carries the batch's topic table
    (the distinct topics), the payloads are slices of the bytes the log tail read."""
    r = batch.rows
    n = len(r)
    tids = r["topic"]
    first = int(tids[0])
    inverse: np.ndarray
    if bool((tids == first).all()):  # one topic (the common case): no sort
        ids, inverse = [first], np.zeros(n, dtype=np.uint16)
    else:
        uniq, inverse = np.unique(tids, return_inverse=True)
        ids = uniq.tolist()
    if len(ids) > sp.MAX_FRAME_TOPICS:  # more topics than a frame's table holds: a table per frame
        return [f for a, b in sp.deliver_cuts(r["payload_len"]) for f in deliver_batch_buffers(batch[a:b])]
    table = sp.topic_table([batch.topics.get(t, f"#{t}").encode("utf-8") for t in ids])
    wire = sp.deliver_rows(
        offset=r["offset"],
        event_id=r["event_id"],
        producer_ts=r["producer_ts"],
        stored_ns=r["stored_ns"],
        priority=r["priority"],
        topic=inverse,
        payload_len=r["payload_len"],
    )
    cuts = sp.deliver_cuts(r["payload_len"])
    return [
        sp.frame_buffers(sp.KIND_DELIVER_BATCH, [table, wire[a:b].view(np.uint8), *parts], event_id=b - a)
        for (a, b), parts in zip(cuts, batch.payload_parts_by(cuts), strict=True)
    ]


class SessionClosed(Exception):
    pass


class HandshakeTimeout(Exception):
    pass


def refuse(sock: socket.socket, reason: str, linger_s: float = 1.0) -> None:
    """Send SUB_ERROR(reason), half-close, read (and drop) what the client still sends for a moment
    (so the kernel does not reset the connection before the client reads the reason), close."""
    try:
        sock.settimeout(linger_s)
        sock.sendall(sp.encode_sub_error(reason))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


class Refuser:
    """Refuses connections the server will not serve (full, over a tenant bound) on ONE thread, started
    on first use: SUB_ERROR, half-close, a short linger so the reason is read (refuse()). At most
    MAX_QUEUED wait; past that a refused connection is closed at once without a reason. So refusals
    never cost a thread each, however many arrive."""

    MAX_QUEUED = 256
    LINGER_S = 0.25

    def __init__(self):
        self._q: queue.Queue[tuple[socket.socket, str] | None] = queue.Queue(self.MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0  # closed without a reason (queue full)

    def refuse(self, sock: socket.socket, reason: str) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="es-sub-refuser", daemon=True)
                self._thread.start()
        try:
            self._q.put_nowait((sock, reason))
        except queue.Full:
            self.dropped += 1
            try:
                sock.close()
            except OSError:
                pass

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            sock, reason = item
            refuse(sock, reason, linger_s=self.LINGER_S)

    def stop(self) -> None:
        with self._lock:
            if self._thread is None:
                return
        while True:  # whatever still waits is closed without its reason
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                try:
                    item[0].close()
                except OSError:
                    pass
        self._q.put(None)
        self._thread.join(2.0)


def shutdown_raw(sock: socket.socket) -> None:
    """shutdown(SHUT_RDWR) of the TCP connection under `sock` (also under a TLS socket another thread
    may be reading: SSLSocket.shutdown would drop the SSL object under that thread)."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return
        raw = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        raw.close()


class Channel:
    """The session's socket: plain (blocking) or TLS (non-blocking, one SSL call at a time)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.io_lock = threading.Lock()
        if self.tls:
            sock.setblocking(False)

    def recv(self, deadline: float | None = None) -> bytes:
        """Some bytes (b"" at EOF); HandshakeTimeout when `deadline` (time.monotonic) passes first."""
        if not self.tls:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HandshakeTimeout()
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                return self.sock.recv(65536)
            except TimeoutError:
                raise HandshakeTimeout() from None
        while True:
            with self.io_lock:
                try:
                    return self.sock.recv(65536)
                except ssl.SSLWantReadError:
                    want_write = False
                except ssl.SSLWantWriteError:
                    want_write = True
                except ssl.SSLZeroReturnError:
                    return b""
            self._wait(want_write, deadline)

    def sendall(self, data: bytes) -> None:
        if not self.tls:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            with self.io_lock:
                try:
                    n = self.sock.send(view)
                    view = view[n:]
                    continue
                except ssl.SSLWantWriteError:
                    want_write = True
                except ssl.SSLWantReadError:
                    want_write = False
            self._wait(want_write, None)

    def send_buffers(self, bufs: list) -> None:
        """Write the buffers in order: with sendmsg on a plain socket (the kernel gathers them: no copy
        into one bytes object), joined for TLS."""
        if self.tls:
            self.sendall(b"".join(bufs))
            return
        views = [memoryview(b).cast("B") for b in bufs]
        i = 0
        while i < len(views):
            sent = self.sock.sendmsg(views[i : i + IOV_MAX])
            while sent:
                k = views[i].nbytes
                if sent >= k:
                    sent -= k
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
            while i < len(views) and not views[i].nbytes:
                i += 1

    def _wait(self, write: bool, deadline: float | None) -> None:
        left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if left <= 0:
            raise HandshakeTimeout()
        if self.sock.fileno() < 0:
            raise OSError("socket closed")
        r, w, _ = select.select([] if write else [self.sock], [self.sock] if write else [], [], left)
        del r, w

    def refuse(self, reason: str, linger_s: float = 1.0) -> None:
        """SUB_ERROR(reason), then close (see refuse())."""
        if not self.tls:
            refuse(self.sock, reason, linger_s)
            return
        try:
            self.sendall(sp.encode_sub_error(reason))
            end = time.monotonic() + linger_s
            while self.recv(end):
                pass
        except (OSError, HandshakeTimeout):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass


class Session:
    def __init__(self, server, sock: socket.socket, addr, sid: int):
        self.server = server
        self.tenant = None  # tenants.Tenant (named principal, else address) once the handshake is done
        self.opened = time.monotonic()
        self.sock = sock
        self.chan: Channel | None = None  # set by the handshake (after TLS, if any)
        self.addr = addr
        self.sid = sid
        self.wake = threading.Event()
        self.credit = 0
        self.credit_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.closed = False
        self.error: str | None = None
        self.source: SoloSource | GroupSource | None = None  # set by the handshake, with sub
        self.sub: sp.Subscribe | None = None
        self.principal = None  # ingest.auth.Principal of the HELLO's token (None: no tokens configured)
        self.sent = 0
        self.thread = threading.Thread(target=self._run, name=f"es-sub-{sid}", daemon=True)
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        self.thread.start()

    # ------------------------------------------------------------------------------------ handshake
    def _recv_frames(self, dec: sp.SubscribeDecoder, deadline: float | None = None) -> list[sp.Frame]:
        assert self.chan is not None  # made first in the handshake
        data = self.chan.recv(deadline)
        if not data:
            raise SessionClosed()
        return dec.feed(data)

    def _start_tls(self, ctx: ssl.SSLContext, deadline: float | None) -> bool:
        """TLS handshake within the deadline; False (after telling the client, in clear text, that this
        port needs TLS) when the client speaks plain text."""
        sock = self.sock
        sock.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            raise HandshakeTimeout() from None
        if not first:
            raise SessionClosed()
        if first[0] != TLS_RECORD_HANDSHAKE:
            self.error = PLAIN_TEXT_REASON
            log.info("subscriber_refused", sid=self.sid, peer=str(self.addr), reason=PLAIN_TEXT_REASON)
            self.server.errors(1)
            self.closed = True
            refuse(sock, PLAIN_TEXT_REASON)
            return False
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        tls.setblocking(False)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                want = False
            except ssl.SSLWantWriteError:
                want = True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise HandshakeTimeout()
            select.select([] if want else [tls], [tls] if want else [], [], 1.0 if left is None else min(left, 1.0))
        return True

    def _handshake(self) -> sp.Subscribe | None:
        cfg = self.server.config
        deadline = time.monotonic() + cfg.handshake_timeout_s if cfg.handshake_timeout_s else None
        if self.server.tls is not None and not self._start_tls(self.server.tls, deadline):
            return None
        self.chan = Channel(self.sock)
        dec = sp.SubscribeDecoder(sp.CLIENT_KINDS, sp.MAX_CONTROL_FRAME + 1024)  # + a HELLO's token
        tokens = self.server.tokens
        frames: list[sp.Frame] = []
        while not frames:
            frames = self._recv_frames(dec, deadline)
        f = frames.pop(0)
        if f.kind == sp.KIND_HELLO:
            raw = sp._frame(sp.KIND_HELLO, topic=f.topic, payload=f.payload)
            status, _, token = parse_hello(raw)
            if status != "ok":
                raise sp.SubscribeProtocolError(status)
            if tokens is not None:
                self.principal = tokens.identify(token)
                if self.principal is None:
                    raise sp.SubscribeProtocolError(
                        "auth: token not accepted; allowed: one of server.auth.tokens "
                        "or a principal's (server.auth.principals)"
                    )
            while not frames:
                frames = self._recv_frames(dec, deadline)
            f = frames.pop(0)
        elif tokens is not None:
            raise sp.SubscribeProtocolError(
                "auth: this server requires a HELLO frame with a client token first; allowed: HELLO, then SUBSCRIBE"
            )
        sub = sp.parse_subscribe(f, cfg.max_credit)
        p = self.principal
        if p is not None and not p.unrestricted:
            if not p.may_subscribe(sub.glob):
                raise sp.SubscribeProtocolError(p.refuse_subscribe(sub.glob))
            if sub.group:  # a principal's groups are its own: another cannot join or commit them
                sub = dataclasses.replace(sub, group=f"{p.name}:{sub.group}")
        tenants = self.server.tenants  # subscriber slots of a named principal, else of the address
        t = tenants.get(tenants.key(p, self.addr[0] if isinstance(self.addr, tuple) else str(self.addr)))
        why = tenants.subscribe(t)
        if why:
            raise sp.SubscribeProtocolError(why)
        self.tenant = t
        self._leftover = (dec, frames)
        return sub

    # ------------------------------------------------------------------------------------ threads
    def _run(self) -> None:
        try:
            try:
                sub = self._handshake()
            except sp.SubscribeProtocolError as exc:
                return self._fail(str(exc))
            except HandshakeTimeout:
                t = self.server.config.handshake_timeout_s
                return self._fail(
                    f"no SUBSCRIBE within {t:g} s; allowed: HELLO (if tokens are configured) and "
                    f"SUBSCRIBE within server.subscribe.handshake_timeout_s={t:g} in total"
                )
            except (SessionClosed, OSError):
                return self._close()
            if sub is None:  # refused already (plain text on a TLS port)
                return self._close()
            self.sub = sub
            self.credit = sub.credit
            try:
                if sub.group:
                    self.source = self.server.groups.join(sub, self, self.wake)
                else:
                    self.source = SoloSource(
                        open_tail(self.server.log_path, self.server.dtype, self.server.index, sub), sub.glob
                    )
            except GroupError as exc:
                return self._fail(str(exc))
            log.info(
                "subscriber_joined",
                sid=self.sid,
                peer=str(self.addr),
                glob=sub.glob,
                group=sub.group or None,
                start=sp.START_NAMES[sub.start],
                credit=sub.credit,
            )
            dec, frames = self._leftover
            for f in frames:
                self._on_frame(f)
            self.reader = threading.Thread(
                target=self._read_loop, args=(dec,), name=f"es-sub-{self.sid}-r", daemon=True
            )
            self.reader.start()
            self._send_loop()
        except Exception as exc:  # noqa: BLE001 - one session never takes the server down
            if not self.closed:
                log.exception("subscriber_failed", sid=self.sid)
                self._fail(f"internal error: {exc!r}")
        finally:
            self._close()

    def _send_loop(self) -> None:
        progress = self.server.progress
        sub = self.sub
        src = self.source
        assert sub is not None and src is not None  # the handshake set them
        while not self.closed:
            self.wake.clear()
            n = min(self.credit, MAX_SEND_EVENTS)
            if n <= 0:
                self.wake.wait(WAIT_S)
                continue
            batch = src.take(n)
            if batch is not None:
                self._deliver(batch)
                continue
            if not sub.follow and src.at_end():
                self._send(sp.encode_end(src.position()))
                while not self.closed:  # COMMITs may still come: the client closes when it is done
                    self.wake.wait(WAIT_S)
                    self.wake.clear()
                return
            progress.register(self.wake)
            try:
                batch = src.take(n)  # registered first: an append after this read wakes us
                if batch is not None:
                    self._deliver(batch)
                    continue
                self.wake.wait(WAIT_S)
            finally:
                progress.unregister(self.wake)

    def _deliver(self, batch: TailBatch) -> None:
        assert self.sub is not None  # delivering: the handshake set it
        n = len(batch)
        bufs: list = []
        if self.sub.batch:  # many events per frame (credit still counts events)
            bufs = [b for frame in deliver_batch_buffers(batch) for b in frame]
            frames = []
        else:
            frames = [
                sp.encode_deliver(
                    ev.offset,
                    ev.topic.encode("utf-8"),
                    ev.payload,
                    event_id=ev.event_id,
                    priority=ev.priority,
                    producer_ts=ev.producer_ts,
                    stored_ns=ev.stored_ns,
                )
                for ev in batch.events()
            ]
        with self.credit_lock:
            self.credit -= n
        self.sent += n  # handed to the socket (counted first: a reader of `sent` saw the bytes)
        self.server.delivered(n)
        if bufs:
            assert self.chan is not None  # made first in the handshake
            with self.send_lock:
                self.chan.send_buffers(bufs)
        else:
            self._send(frames[0] if len(frames) == 1 else b"".join(frames))

    def _send(self, data: bytes) -> None:
        assert self.chan is not None  # made first in the handshake
        with self.send_lock:
            self.chan.sendall(data)

    def _read_loop(self, dec: sp.SubscribeDecoder) -> None:
        try:
            while not self.closed:
                for f in self._recv_frames(dec):
                    self._on_frame(f)
        except sp.SubscribeProtocolError as exc:
            self._fail(str(exc))
        except GroupError as exc:
            self._fail(str(exc))
        except (SessionClosed, OSError):
            pass
        finally:
            self.closed = True
            self.wake.set()

    def _on_frame(self, f: sp.Frame) -> None:
        if f.kind == sp.KIND_CREDIT:
            limit = self.server.config.max_credit
            with self.credit_lock:
                if f.event_id == 0 or self.credit + f.event_id > limit:
                    raise sp.SubscribeProtocolError(
                        f"CREDIT {f.event_id} is not allowed (outstanding {self.credit}); allowed: 1.."
                        f"{max(0, limit - self.credit)} (outstanding credit at most server.subscribe.max_credit="
                        f"{limit})"
                    )
                self.credit += f.event_id
            self.wake.set()
        elif f.kind == sp.KIND_COMMIT:
            assert self.source is not None  # frames are read after the handshake set it
            done = self.source.commit(self, f.event_id)
            self._send(sp.encode_commit(done))
        else:
            raise sp.SubscribeProtocolError(
                f"kind {f.kind} ({sp.KIND_NAMES.get(f.kind, '?')}) is not allowed after "
                f"SUBSCRIBE; allowed: {sp.KIND_CREDIT} CREDIT, {sp.KIND_COMMIT} COMMIT"
            )

    # ------------------------------------------------------------------------------------ closing
    def _fail(self, reason: str) -> None:
        if self.closed and self.error is None and reason.startswith("internal"):
            return
        self.error = reason
        log.info("subscriber_refused", sid=self.sid, peer=str(self.addr), reason=reason)
        self.server.errors(1)
        self.closed = True
        self.wake.set()
        with self.send_lock:
            if self.chan is not None:
                self.chan.refuse(reason)
            else:
                refuse(self.sock, reason)

    def _close(self) -> None:
        self.closed = True
        self.wake.set()
        src, self.source = self.source, None
        if src is not None:
            src.leave(self)
        if threading.current_thread() is self.thread:
            if self.reader is not None and self.reader.is_alive():
                shutdown_raw(self.sock)
                self.reader.join(5.0)
            try:
                self.sock.close()
            except OSError:
                pass
            if self.tenant is not None:
                self.server.tenants.unsubscribe(self.tenant)
                self.tenant = None
            self.server.ended(self)

    def evict(self, reason: str) -> None:
        """From the acceptor: this session, still in its handshake, gives its slot to a newcomer."""
        self.error = reason
        self.closed = True
        log.info("subscriber_evicted", sid=self.sid, peer=str(self.addr), reason=reason)
        shutdown_raw(self.sock)

    def stop(self) -> None:
        """From the server: end the session (its thread closes the socket and leaves the group)."""
        self.closed = True
        self.wake.set()
        shutdown_raw(self.sock)
