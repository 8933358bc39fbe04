"""Metrics HTTP endpoint: one thread, a selector over non-blocking sockets, bounded and timeout-aware.

Why not http.server / prometheus_client.start_http_server: both start a thread per connection with no
read timeout, so clients that open a connection and send half a request line each hold a thread
forever (the hardening issue saw 1,000 such connections hold 1,013 threads). Here:

* one daemon thread (`es-metrics`) runs the whole server: a connection costs a socket and a small
  buffer, never a thread, however slowly its client sends;
* a connection has `timeout_s` to send its request head and then to take the response; it is closed
  when that runs out;
* at most `max_connections` are open: a new connection beyond that closes the oldest one still
  sending its request (a complete scrape is answered at once, so only slow or stalled clients go);
* a request head over `max_request_bytes` is answered 431 and closed;
* one request per connection (`Connection: close`), GET or HEAD.

Security: with `tls` (the server.tls context, unless metrics.tls is false) the port speaks HTTPS; the
handshake is driven by the same loop (a plain-HTTP client gets a clear-text 400 saying the port needs
https). With `tokens` (server.auth, unless metrics.auth is false) `path` needs the header
"Authorization: Bearer <token>" (else 401); /healthz and /readyz stay open.

Paths: `path` (default /metrics) serves the registry's text exposition; `/healthz` answers 200 when
`health()` says ok, else 503 with its detail (e.g. the names of dead engine threads); `/readyz` answers
200 when `ready()` says ok (listening, not in EMERGENCY backpressure), else 503. Without callables both
answer 200 "ok". Anything else is 404.
"""

from __future__ import annotations

import errno
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = structlog.get_logger("eventstream.metrics")

Check = Callable[[], tuple[bool, str]]

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
PLAIN_HTTP_ON_TLS = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Length: 58\r\n\r\nthis port requires TLS: use https:// (server.tls is set)\r\n"
)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class MetricsServerError(OSError):
    """The endpoint could not start (port in use, bad address): the message says which and what to do."""


class _Conn:
    __slots__ = ("sock", "buf", "out", "deadline", "writing", "closing", "opened", "handshaking")

    def __init__(self, sock: socket.socket | ssl.SSLSocket, deadline: float, opened: float, handshaking: bool = False):
        self.sock = sock
        self.handshaking = handshaking  # TLS handshake not finished
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.deadline = deadline
        self.writing = False
        self.closing = False  # response sent and our side shut down: discard input until EOF
        self.opened = opened


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 9100,
        path: str = "/metrics",
        *,
        health: Check | None = None,
        ready: Check | None = None,
        timeout_s: float = 10.0,
        max_connections: int = 64,
        max_request_bytes: int = 8192,
        tls: ssl.SSLContext | None = None,
        tokens=None,
    ):
        if not path.startswith("/"):
            raise ValueError(f"metrics.path {path!r} is not allowed; allowed: a path starting with '/'")
        if max_connections < 1 or timeout_s <= 0 or max_request_bytes < 64:
            raise ValueError(
                "MetricsServer limits are not allowed; allowed: max_connections >= 1, "
                "timeout_s > 0, max_request_bytes >= 64"
            )
        self.registry, self.host, self.requested_port, self.path = registry, host, port, path
        self.health, self.ready = health, ready
        self.tls, self.tokens = tls, tokens
        self.unauthorized = 0  # requests for `path` without a valid token
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.scrapes = 0
        self.evicted = 0  # connections closed to make room (max_connections)
        self.timed_out = 0  # connections closed because their client was too slow

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> MetricsServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TCP: only skips TIME_WAIT
            sock.bind((self.host, self.requested_port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            what = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise MetricsServerError(
                exc.errno,
                f"metrics endpoint {self.host}:{self.requested_port} {what}; allowed: "
                "a free port (metrics.port), 0 for any, or metrics.enabled: false",
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="es-metrics", daemon=True)
        self._thread.start()
        log.info("metrics_listening", url=self.url, max_connections=self.max_connections, timeout_s=self.timeout_s)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._sock is None:
            return
        assert self._wake_r is not None and self._wake_w is not None  # made with _sock
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("metrics_server_did_not_stop", timeout_s=timeout)
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()
        self._sock = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else self.requested_port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (the real port when 0 was asked)."""
        return (self.host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}{self.path}"

    def __enter__(self) -> MetricsServer:
        return self.start() if self._sock is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ the loop
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        conns: dict[int, _Conn] = {}
        wake_r = self._wake_r
        assert self._sock is not None and wake_r is not None  # start() made them before this thread
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait = min((c.deadline for c in conns.values()), default=now + 1.0) - now
                for key, _events in sel.select(max(0.0, min(wait, 1.0))):
                    if key.fileobj is self._sock:
                        self._accept(sel, conns)
                    elif key.fileobj is wake_r:
                        try:
                            wake_r.recv(64)
                        except OSError:
                            pass
                    else:
                        c = key.data
                        if c.sock.fileno() not in conns:
                            continue
                        try:
                            if c.handshaking:
                                self._handshake(sel, conns, c)
                            elif c.closing:
                                self._drain(sel, conns, c)
                            elif c.writing:
                                self._write(sel, conns, c)
                            else:
                                self._read(sel, conns, c)
                        except OSError:
                            self._close(sel, conns, c)
                now = time.monotonic()
                for c in [c for c in conns.values() if c.deadline <= now]:
                    self.timed_out += not c.closing
                    self._close(sel, conns, c)
        except Exception:
            log.exception("metrics_server_crashed")
        finally:
            for c in list(conns.values()):
                self._close(sel, conns, c)
            sel.close()

    def _accept(self, sel, conns: dict[int, _Conn]) -> None:
        assert self._sock is not None  # listening while the loop runs
        for _ in range(256):  # a bounded burst per wakeup, then serve the others
            try:
                s, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: log, keep serving what is open
                log.warning("metrics_accept_failed", error=f"{type(exc).__name__}: {exc}")
                return
            if len(conns) >= self.max_connections:
                reading = [c for c in conns.values() if not c.writing and not c.closing]
                victim = min(reading or conns.values(), key=lambda c: c.opened)
                self.evicted += 1
                self._close(sel, conns, victim)
            s.setblocking(False)
            if self.tls is not None:
                try:
                    s = self.tls.wrap_socket(s, server_side=True, do_handshake_on_connect=False)
                except (ssl.SSLError, OSError):
                    s.close()
                    continue
            now = time.monotonic()
            c = _Conn(s, now + self.timeout_s, now, handshaking=self.tls is not None)
            conns[s.fileno()] = c
            sel.register(s, selectors.EVENT_READ, c)

    def _handshake(self, sel, conns, c: _Conn) -> None:
        """One step of the TLS handshake; a plain-HTTP client is answered in clear text."""
        from eventstream.ingest.tls import is_plain_text, plain_answer

        assert isinstance(c.sock, ssl.SSLSocket)  # handshaking: a TLS connection
        try:
            c.sock.do_handshake()
        except ssl.SSLWantReadError:
            sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        except ssl.SSLWantWriteError:
            sel.modify(c.sock, selectors.EVENT_WRITE, c)
            return
        except ssl.SSLError as exc:
            if is_plain_text(exc):
                plain_answer(c.sock, PLAIN_HTTP_ON_TLS)
            self._close(sel, conns, c)
            return
        c.handshaking = False
        sel.modify(c.sock, selectors.EVENT_READ, c)
        if c.sock.pending():
            self._read(sel, conns, c)

    def _read(self, sel, conns, c: _Conn) -> None:
        try:
            data = c.sock.recv(4096)
            # TLS: decrypted bytes the selector cannot see
            while data and isinstance(c.sock, ssl.SSLSocket) and c.sock.pending():
                data += c.sock.recv(4096)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        if not data:
            self._close(sel, conns, c)
            return
        c.buf += data
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            end = c.buf.find(b"\n\n")
        if end < 0:
            if len(c.buf) > self.max_request_bytes:
                self._respond(sel, c, 431, b"request head too large\n", head_only=False)
            return
        if end > self.max_request_bytes:
            self._respond(sel, c, 431, b"request head too large\n", head_only=False)
            return
        line = bytes(c.buf[: c.buf.find(b"\n")]).rstrip(b"\r").decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._respond(sel, c, 400, b"bad request line\n", head_only=False)
            return
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            self._respond(sel, c, 405, b"allowed: GET, HEAD\n", head_only=False, extra=(("Allow", "GET, HEAD"),))
            return
        path = target.split("?", 1)[0]
        if self.tokens is not None and path == self.path and not self._authorized(c.buf):
            self.unauthorized += 1
            self._respond(
                sel,
                c,
                401,
                b"a client token is required: Authorization: Bearer <token> (server.auth.tokens)\n",
                head_only=False,
                extra=(("WWW-Authenticate", "Bearer"),),
            )
            return
        status, ctype, body = self._route(path)
        self._respond(sel, c, status, body, head_only=method == "HEAD", ctype=ctype)

    def _authorized(self, head: bytes) -> bool:
        for line in bytes(head).split(b"\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    return self.tokens.check(token.strip())
        return False

    def _route(self, path: str) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if path == self.path:
            try:
                body = generate_latest(self.registry)
            except Exception as exc:  # noqa: BLE001 - answer, keep serving
                log.exception("metrics_render_failed")
                return 500, text, f"metrics could not be rendered: {type(exc).__name__}\n".encode()
            self.scrapes += 1
            return 200, CONTENT_TYPE_LATEST, body
        if path in (HEALTH_PATH, READY_PATH):
            check = self.health if path == HEALTH_PATH else self.ready
            try:
                ok, detail = check() if check is not None else (True, "ok")
            except Exception as exc:  # noqa: BLE001 - a failing check means not ok
                ok, detail = False, f"check failed: {type(exc).__name__}: {exc}"
            return (200 if ok else 503), text, (str(detail or ("ok" if ok else "not ok")) + "\n").encode()
        return (
            404,
            text,
            (f"not found; metrics are at {self.path}, health at {HEALTH_PATH}, readiness at {READY_PATH}\n").encode(),
        )

    def _respond(
        self,
        sel,
        c: _Conn,
        status: int,
        body: bytes,
        *,
        head_only: bool,
        ctype: str = "text/plain; charset=utf-8",
        extra=(),
    ) -> None:
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        head += [f"{k}: {v}" for k, v in extra]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
        c.out = memoryview(data)
        c.writing = True
        c.buf = bytearray()
        c.deadline = time.monotonic() + self.timeout_s
        sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def _write(self, sel, conns, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        c.out = c.out[n:]
        if not c.out and isinstance(c.sock, ssl.SSLSocket):  # TLS: close_notify, then close (no half-close below TLS)
            try:
                c.sock.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
            self._close(sel, conns, c)
            return
        if not c.out:
            # Close gracefully: FIN after the response, then read until the client closes (closing
            # with unread input would send a RST that can destroy the response in flight).
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(sel, conns, c)
                return
            c.writing, c.closing = False, True
            c.deadline = time.monotonic() + min(self.timeout_s, 2.0)
            sel.modify(c.sock, selectors.EVENT_READ, c)

    def _drain(self, sel, conns, c: _Conn) -> None:
        if not c.sock.recv(4096):
            self._close(sel, conns, c)

    @staticmethod
    def _close(sel, conns, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            conns.pop(fd, None)
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.sock.close()
