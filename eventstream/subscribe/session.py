"""One subscriber connection: handshake, then a sender loop and a reader thread.

The session's own thread does the handshake (an optional HELLO, then SUBSCRIBE) and then sends: it
takes up to `credit` events from its source (subscribe/groups.py) and sends them as DELIVER frames;
with no credit, or at the end of the log, it waits on its own Event. That Event is set by the reader
thread (CREDIT arrived, the connection closed), by the log's Progress (an append; registered only while
the session waits at the end of the log) and by its group (a member left, handing events back). The
wait has a bound (WAIT_S) as a safety net only.

The reader thread reads CREDIT and COMMIT frames. A protocol error gets a SUB_ERROR frame naming the
field and what is allowed; the server then closes the connection.
"""

from __future__ import annotations

import socket
import threading

import structlog

from eventstream.protocol import subscribe as sp
from eventstream.protocol.frames import parse_hello
from eventstream.subscribe.groups import GroupError, SoloSource, open_tail

log = structlog.get_logger("eventstream.subscribe")

WAIT_S = 1.0
MAX_SEND_EVENTS = 1024  # DELIVER frames per write


class SessionClosed(Exception):
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


class Session:
    def __init__(self, server, sock: socket.socket, addr, sid: int):
        self.server = server
        self.sock = sock
        self.addr = addr
        self.sid = sid
        self.wake = threading.Event()
        self.credit = 0
        self.credit_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.closed = False
        self.error: str | None = None
        self.source = None
        self.sub: sp.Subscribe | None = None
        self.sent = 0
        self.thread = threading.Thread(target=self._run, name=f"es-sub-{sid}", daemon=True)
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        self.thread.start()

    # ------------------------------------------------------------------------------------ handshake
    def _recv_frames(self, dec: sp.SubscribeDecoder) -> list[sp.Frame]:
        data = self.sock.recv(65536)
        if not data:
            raise SessionClosed()
        return dec.feed(data)

    def _handshake(self) -> sp.Subscribe | None:
        cfg = self.server.config
        self.sock.settimeout(cfg.handshake_timeout_s or None)
        dec = sp.SubscribeDecoder(sp.CLIENT_KINDS, sp.MAX_CONTROL_FRAME + 1024)  # + a HELLO's token
        tokens = self.server.tokens
        frames: list[sp.Frame] = []
        while not frames:
            frames = self._recv_frames(dec)
        f = frames.pop(0)
        if f.kind == sp.KIND_HELLO:
            raw = sp._frame(sp.KIND_HELLO, topic=f.topic, payload=f.payload)
            status, _, token = parse_hello(raw)
            if status != "ok":
                raise sp.SubscribeProtocolError(status)
            if tokens is not None and not tokens.check(token):
                raise sp.SubscribeProtocolError("auth: token not accepted; allowed: one of server.auth.tokens")
            while not frames:
                frames = self._recv_frames(dec)
            f = frames.pop(0)
        elif tokens is not None:
            raise sp.SubscribeProtocolError("auth: this server requires a HELLO frame with a client token first; "
                                            "allowed: HELLO, then SUBSCRIBE")
        sub = sp.parse_subscribe(f, cfg.max_credit)
        self.sock.settimeout(None)
        self._leftover = (dec, frames)
        return sub

    # ------------------------------------------------------------------------------------ threads
    def _run(self) -> None:
        try:
            try:
                sub = self._handshake()
            except sp.SubscribeProtocolError as exc:
                return self._fail(str(exc))
            except TimeoutError:
                t = self.server.config.handshake_timeout_s
                return self._fail(f"no SUBSCRIBE within {t:g} s; allowed: HELLO (if tokens are configured) and "
                                  f"SUBSCRIBE within server.subscribe.handshake_timeout_s={t:g}")
            except (SessionClosed, OSError):
                return self._close()
            self.sub = sub
            self.credit = sub.credit
            try:
                if sub.group:
                    self.source = self.server.groups.join(sub, self, self.wake)
                else:
                    self.source = SoloSource(open_tail(self.server.log_path, self.server.dtype, self.server.index,
                                                       sub), sub.glob)
            except GroupError as exc:
                return self._fail(str(exc))
            log.info("subscriber_joined", sid=self.sid, peer=str(self.addr), glob=sub.glob, group=sub.group or None,
                     start=sp.START_NAMES[sub.start], credit=sub.credit)
            dec, frames = self._leftover
            for f in frames:
                self._on_frame(f)
            self.reader = threading.Thread(target=self._read_loop, args=(dec,), name=f"es-sub-{self.sid}-r",
                                           daemon=True)
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
        while not self.closed:
            self.wake.clear()
            n = min(self.credit, MAX_SEND_EVENTS)
            if n <= 0:
                self.wake.wait(WAIT_S)
                continue
            events = src.take(n)
            if events:
                self._deliver(events)
                continue
            if not sub.follow and src.at_end():
                self._send(sp.encode_end(src.position()))
                while not self.closed:  # COMMITs may still come: the client closes when it is done
                    self.wake.wait(WAIT_S)
                    self.wake.clear()
                return
            progress.register(self.wake)
            try:
                events = src.take(n)  # registered first: an append after this read wakes us
                if events:
                    self._deliver(events)
                    continue
                self.wake.wait(WAIT_S)
            finally:
                progress.unregister(self.wake)

    def _deliver(self, events) -> None:
        frames = [sp.encode_deliver(ev.offset, ev.topic.encode("utf-8"), ev.payload, event_id=ev.event_id,
                                    priority=ev.priority, producer_ts=ev.producer_ts, stored_ns=ev.stored_ns)
                  for ev in events]
        with self.credit_lock:
            self.credit -= len(events)
        self.sent += len(events)  # handed to the socket (counted first: a reader of `sent` saw the bytes)
        self.server.delivered(len(events))
        self._send(b"".join(frames))

    def _send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

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
                        f"{limit})")
                self.credit += f.event_id
            self.wake.set()
        elif f.kind == sp.KIND_COMMIT:
            done = self.source.commit(self, f.event_id)
            self._send(sp.encode_commit(done))
        else:
            raise sp.SubscribeProtocolError(f"kind {f.kind} ({sp.KIND_NAMES.get(f.kind, '?')}) is not allowed after "
                                            f"SUBSCRIBE; allowed: {sp.KIND_CREDIT} CREDIT, {sp.KIND_COMMIT} COMMIT")

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
            refuse(self.sock, reason)

    def _close(self) -> None:
        self.closed = True
        self.wake.set()
        src, self.source = self.source, None
        if src is not None:
            src.leave(self)
        if threading.current_thread() is self.thread:
            if self.reader is not None and self.reader.is_alive():
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.reader.join(5.0)
            try:
                self.sock.close()
            except OSError:
                pass
            self.server.ended(self)

    def stop(self) -> None:
        """From the server: end the session (its thread closes the socket and leaves the group)."""
        self.closed = True
        self.wake.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
