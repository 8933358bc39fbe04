"""TCP ingest server (:9000): one acceptor thread, N reader threads, both pinned from config.

The acceptor only accepts and hands sockets round-robin to readers (see reader.py for the reader
loop, ACK/NACK and backpressure). At max_connections the idlest connection that has sent nothing for
server.tcp.evict_idle_s makes room for the newcomer (closed by its reader: evicted_idle); when none
is that idle the newcomer is accepted and closed at once, so a client sees a clean close instead of a
hanging SYN. The same refusal holds past max_connections_per_ip connections from one address
(limits.py). Refusals cost no thread and are logged at most once a second (with a count).
Per-tenant bounds (connections of a principal, new topics, events/s): tenants.py.

A reader or the acceptor that dies with an error is a failure of the whole service: failures() lists
it (Service.failures(): /healthz, the threads_failed gauge, `eventstream serve` exits 1). Until the
service stops, a dead reader is skipped: new connections go to the readers still running (none left:
they are refused with a log line).
"""

from __future__ import annotations

import errno
import itertools
import os
import selectors
import socket
import ssl
import threading
import time

import structlog

from eventstream.config import TcpConfig
from eventstream.core.records import ACK_STORED
from eventstream.core.topics import TopicTable
from eventstream.ingest.auth import TokenSet
from eventstream.ingest.connection import Connection
from eventstream.ingest.delivery import Delivery, IngestStats, merge_stats
from eventstream.ingest.limits import REASON_MAX_CONNECTIONS, REASON_PER_IP, PartialBudget, PeerLimit
from eventstream.ingest.reader import Reader
from eventstream.ingest.tenants import Tenants
from eventstream.runtime.affinity import pin_current_thread

log = structlog.get_logger("eventstream.ingest.tcp")


class BindError(OSError):
    """The listening address cannot be bound (usually: the port is in use)."""


def bind_error(kind: str, key: str, host: str, port: int, exc: OSError) -> BindError:
    if exc.errno == errno.EADDRINUSE:
        why = "is already in use"
    elif exc.errno == errno.EACCES:
        why = "needs privileges (ports below 1024)"
    else:
        why = f"cannot be bound ({exc.strerror})"
    return BindError(
        exc.errno,
        f"{kind} {host}:{port} {why}; choose another port with {key} (0 = any free port) or stop the process using it",
    )


class TcpServer:
    def __init__(
        self,
        config: TcpConfig,
        sink,
        topics: TopicTable,
        *,
        on_reject=None,
        cpus=None,
        reader_cpus=None,
        reader_scheduling: str = "normal",
        payload_bytes: int = 448,
        ack_default: int = ACK_STORED,
        tokens: TokenSet | None = None,
        on_acked=None,
        payloads=None,
        tls: ssl.SSLContext | None = None,
        tenants: Tenants | None = None,
    ):
        """`payloads`: the PayloadArena for payloads over `payload_bytes` (None: such frames are
        rejected as payload_too_large). `ack_default`: the ACK mode of v2 frames that ask for none
        (core.records.ACK_*); `tokens`: the client tokens a connection must present in a HELLO (auth.py;
        None = no authentication). `tls`: the server context of `server.tls` (tls.from_config; None =
        plain TCP). `on_acked(latencies_ns)`: decode-to-ACK latency of every event an ACK covered
        (metrics)."""
        self.config = config
        self.sink = sink
        self.topics = topics
        self.on_reject = on_reject
        self.cpus = list(cpus or [])
        self.reader_cpus = list(reader_cpus or [])
        self.reader_scheduling = reader_scheduling  # the readers' OS policy (runtime/scheduling.py)
        self.payload_bytes = payload_bytes
        self.payloads = payloads
        self.ack_default = ack_default
        self.tokens = tokens
        self.on_acked = on_acked
        self.tls = tls
        self.tenants = tenants if tenants is not None else Tenants.unbounded()
        self.refused_full = 0  # refused at max_connections (no connection idle enough to make room)
        self._evicting: dict[int, Connection] = {}  # conn id -> connection asked to make room, not closed yet
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._readers: list[Reader] = []
        self._stats: list[IngestStats] = []
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self.connections_total = 0
        self.connections_refused = 0
        self.acceptor_error: BaseException | None = None
        self.peer_limit = PeerLimit(config.max_connections_per_ip)
        self.budget = PartialBudget(config.max_partial_bytes)
        self.refused_per_ip = 0
        self._last_refusal_log = 0.0
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("TcpServer.address is known after start()")
        return self._address

    def start(self) -> TcpServer:
        """Bind and start the threads. Raises BindError."""
        cfg = self.config
        tls = self.tls
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
            sock.listen(cfg.backlog)
        except OSError as exc:
            sock.close()
            raise bind_error("TCP", "server.tcp.port", cfg.host, cfg.port, exc) from None
        sock.setblocking(False)
        self._listener = sock
        self._address = sock.getsockname()[:2]
        self.readers = reader_count(cfg.readers, self.reader_cpus)
        for n in range(self.readers):
            stats = IngestStats()
            delivery = Delivery(self.sink, self.on_reject, stats)
            r = Reader(
                n,
                cfg,
                self.topics,
                delivery,
                stats,
                self.reader_cpus,
                self.payload_bytes,
                self.ack_default,
                peer_limit=self.peer_limit,
                budget=self.budget,
                tokens=self.tokens,
                tls=tls,
                on_acked=self.on_acked,
                payloads=self.payloads,
                tenants=self.tenants,
            )
            r.scheduling = self.reader_scheduling
            self._stats.append(stats)
            self._readers.append(r)
            self.budget.readers.append(r)
            r.start()
        self._acceptor = threading.Thread(target=self._accept_loop, name="es-tcp-acceptor", daemon=True)
        self._acceptor.start()
        log.info(
            "tcp_listening",
            host=self._address[0],
            port=self._address[1],
            readers=self.readers,
            tls=tls is not None,
            auth=self.tokens is not None,
        )
        return self

    def progress(self) -> None:
        """A completion watermark moved (called by processors after each released batch): readers
        waiting for one wake up and send the ACKs that became due."""
        for r in self._readers:
            if r.want_nudge:
                r.nudge()

    def threads(self) -> list[threading.Thread]:
        """The acceptor and reader threads (for health checks)."""
        return [t for t in (self._acceptor, *self._readers) if t is not None]

    def failures(self) -> list[str]:
        """Reader and acceptor threads that died with an error."""
        out = [f"{r.name}: {r.error!r}" for r in self._readers if r.error is not None]
        if self.acceptor_error is not None:
            out.append(f"es-tcp-acceptor: {self.acceptor_error!r}")
        return out

    def _next_reader(self, rr) -> Reader | None:
        """The next reader in round-robin order that is still running (None: every reader died)."""
        for _ in range(len(self._readers)):
            r = next(rr)
            if r.error is None and r.is_alive():
                return r
        return None

    def _open_connections(self) -> int:
        return self.connections_total - sum(s.connections_closed for s in self._stats)

    def _accept_loop(self) -> None:
        pin_current_thread(self.cpus, "es-tcp-acceptor")
        listener = self._listener
        assert listener is not None  # start() bound it before this thread
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        ids = itertools.count(1)
        rr = itertools.cycle(self._readers)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(1.0):
                    if key.fileobj is self._wake_r:
                        continue
                    while True:
                        try:
                            conn, peer = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:
                            log.warning("accept_failed", error=str(exc))
                            break
                        if self._open_connections() >= self.config.max_connections and not self._make_room():
                            self.refused_full += 1
                            self._refuse(
                                conn,
                                peer,
                                REASON_MAX_CONNECTIONS,
                                self.refused_full,
                                max_connections=self.config.max_connections,
                            )
                            continue
                        if not self.peer_limit.admit(peer[0]):
                            self._refuse_per_ip(conn, peer)
                            continue
                        reader = self._next_reader(rr)
                        if reader is None:
                            self.connections_refused += 1
                            log.error("connection_refused", peer=str(peer), reason="no_reader_running")
                            self.peer_limit.release(peer[0])
                            conn.close()
                            continue
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        self.connections_total += 1
                        reader.hand_over(conn, next(ids) & 0xFFFFFFFF, peer)
        except Exception as exc:
            self.acceptor_error = exc
            log.exception("acceptor_crashed")
        finally:
            sel.close()

    def _make_room(self) -> bool:
        """At max_connections: ask the reader of the idlest connection (nothing sent for at least
        evict_idle_s, nothing in flight) to close it. False when none is that idle. Reads the readers'
        connection tables as a snapshot; the owner re-checks before it closes."""
        for cid, c in list(self._evicting.items()):
            if c.closed:
                del self._evicting[cid]
        if self._open_connections() - len(self._evicting) < self.config.max_connections:
            return True  # room is being made already
        cutoff = time.monotonic() - self.config.evict_idle_s
        best: Connection | None = None
        owner: Reader | None = None
        for r in self._readers:
            for c in list(r.conns.values()):
                if (
                    c.last_active <= cutoff
                    and not c.closed
                    and not c.closing
                    and c.conn_id not in self._evicting
                    and (best is None or c.last_active < best.last_active)
                    and not c.busy
                ):
                    best, owner = c, r
        if best is None or owner is None:  # (owner is set with best)
            return False
        self._evicting[best.conn_id] = best
        owner.evict_idle(best.conn_id)
        return True

    def _refuse_per_ip(self, conn: socket.socket, peer) -> None:
        """One address has max_connections_per_ip open: close this one at once."""
        self.refused_per_ip += 1
        self._refuse(
            conn, peer, REASON_PER_IP, self.refused_per_ip, max_connections_per_ip=self.config.max_connections_per_ip
        )

    def _refuse(self, conn: socket.socket, peer, reason: str, count: int, **kw) -> None:
        """Close a new connection at once (no thread, no buffer); a log line at most once a second:
        a client retrying in a loop must not flood the log."""
        self.connections_refused += 1
        conn.close()
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:
            self._last_refusal_log = now
            log.warning("connection_refused", peer=str(peer), reason=reason, refused_total=count, **kw)

    def stop(self, drain: bool = True, timeout: float = 5.0) -> None:
        """Stop accepting; readers send final ACKs (drain) and close every connection."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        if self._listener is not None:
            self._listener.close()
        for r in self._readers:
            r.request_stop(drain)
        for r in self._readers:
            r.join(timeout)
            if r.is_alive():
                log.error("reader_did_not_stop", reader=r.name, timeout_s=timeout)
        self._wake_r.close()
        self._wake_w.close()
        log.info("tcp_stopped", **self.statistics())

    def statistics(self) -> dict:
        out = merge_stats(self._stats)
        out.update(
            connections_open=max(0, self._open_connections()),
            connections_total=self.connections_total,
            connections_refused=self.connections_refused,
            partial_bytes=self.budget.total(),
        )
        if self.refused_per_ip:
            out["connections_limited"][REASON_PER_IP] = self.refused_per_ip
        if self.refused_full:
            out["connections_limited"][REASON_MAX_CONNECTIONS] = self.refused_full
        out["tenants"] = self.tenants.statistics()
        return out

    def __enter__(self) -> TcpServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


AUTO_READERS_MAX = 4


def reader_count(configured: int, reader_cpus) -> int:
    """`server.tcp.readers`, or for 0 one reader per CPU the readers may run on (at most
    AUTO_READERS_MAX): two readers sharing one CPU only take turns, and each holds the realtime lane
    while it handles a read, so the other's realtime events queue behind it."""
    if configured:
        return configured
    cpus = list(reader_cpus or ()) or sorted(os.sched_getaffinity(0))
    return max(1, min(AUTO_READERS_MAX, len(cpus)))
