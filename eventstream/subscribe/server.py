"""The subscribe listener (`server.subscribe.*`): accepts subscriber connections, one Session each.

Subscribers read events.bin (storage/tail.py), never the engine's rings: a slow or stalled
subscriber stops only its own session. `progress` is the engine's `stored` barrier (engine/stored.py):
every release of a stored batch wakes the sessions waiting at the end of the log.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import structlog

from eventstream.ingest.tenants import Tenants
from eventstream.runtime.affinity import pin_current_thread
from eventstream.storage.tail import Progress, SegmentIndex, file_created_ns, log_files
from eventstream.subscribe.groups import GroupRegistry, GroupStore
from eventstream.subscribe.lag import GroupLag
from eventstream.subscribe.session import Refuser, Session

log = structlog.get_logger("eventstream.subscribe")

SESSION_KINDS = ("handshake", "solo", "group")


class SubscribeServer:
    def __init__(
        self,
        config,
        log_path: Path,
        dtype,
        data_dir: Path,
        *,
        tokens=None,
        progress: Progress | None = None,
        cpus: list[int] | None = None,
        tls=None,
        tenants: Tenants | None = None,
    ):
        """`tokens`: the TokenSet a HELLO must carry (None: no authentication); `tls`: the server.tls
        context (ingest/tls.py; None: plain TCP)."""
        self.config = config
        self.log_path = Path(log_path)
        self.dtype = dtype
        self.tokens = tokens
        self.tls = tls
        self.tenants = tenants if tenants is not None else Tenants.unbounded()
        self.refuser = Refuser()
        self._last_refusal_log = 0.0
        self.progress = progress or Progress()
        self.cpus = cpus or []
        sub_dir = Path(config.group_dir) if config.group_dir else Path(data_dir) / "subscribe"
        self.index = SegmentIndex(self.log_path, sub_dir / "segments.json", dtype)
        self.groups = GroupRegistry(GroupStore(sub_dir / "groups"), self.log_path, dtype, self.index)
        self.lag = GroupLag(
            self.log_path, dtype, self.index, self.groups.store, max_series=getattr(config, "lag_group_series", 100)
        )
        self.lock = threading.Lock()
        self.sessions: dict[int, Session] = {}
        self._next_sid = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.address: tuple[str, int] | None = None
        self.stats = {"accepted": 0, "refused": 0, "delivered": 0, "errors": 0, "evicted": 0}

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> SubscribeServer:
        self.index.refresh()  # bases of the files that exist now (counted once, then kept)
        s = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.config.host, self.config.port))
            s.listen(128)
        except OSError:
            s.close()
            raise
        self._sock = s
        self.address = s.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name="es-sub-acceptor", daemon=True)
        self._thread.start()
        log.info(
            "subscribe_listening",
            address=f"{self.address[0]}:{self.address[1]}",
            tls=self.tls is not None,
            auth=self.tokens is not None,
        )
        return self

    def threads(self) -> list[threading.Thread]:
        return [self._thread] if self._thread is not None else []

    def _accept_loop(self) -> None:
        pin_current_thread(self.cpus, "es-sub-acceptor")
        sock = self._sock
        assert sock is not None  # start() made it before this thread
        while not self._stopping:
            try:
                conn, addr = sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reason, victim = "", None
            with self.lock:
                if self._stopping:
                    conn.close()
                    return
                # connections still in their handshake (TLS, HELLO, SUBSCRIBE not complete): one address
                # holds at most server.tenants.max_subscribers of them; past that, or when the table is
                # full, the oldest such connection (of that address first) makes room for the newcomer
                waiting = [s for s in self.sessions.values() if s.sub is None and not s.closed]
                mine = [s for s in waiting if s.addr[0] == addr[0]]
                per_ip = self.tenants.config.max_subscribers
                if per_ip and len(mine) >= per_ip:
                    victim = min(mine, key=lambda s: s.opened)
                elif len(self.sessions) >= self.config.max_subscribers:
                    victim = min(waiting, key=lambda s: s.opened, default=None)
                    if victim is None:
                        reason = (
                            f"too many subscribers: {self.config.max_subscribers} connected; allowed: at most "
                            f"server.subscribe.max_subscribers={self.config.max_subscribers}"
                        )
                if victim is not None:
                    self.sessions.pop(victim.sid, None)  # its slot is the newcomer's from now on
                if not reason:
                    self._next_sid += 1
                    sess = Session(self, conn, addr, self._next_sid)
                    self.sessions[sess.sid] = sess
                    self.stats["accepted"] += 1
                else:
                    self.stats["refused"] += 1
            if victim is not None:
                self.stats["evicted"] += 1
                victim.evict(
                    "made room for a new subscriber: this connection had not finished its handshake "
                    "(server.subscribe.max_subscribers, server.tenants.max_subscribers)"
                )
            if reason:
                self._log_refusal(addr, reason)
                self.refuser.refuse(conn, reason)  # no thread per refused connection
                continue
            sess.start()

    def _log_refusal(self, addr, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:  # a client retrying in a loop must not flood the log
            self._last_refusal_log = now
            log.warning("subscriber_refused", peer=str(addr), reason=reason, refused_total=self.stats["refused"])

    def ended(self, sess: Session) -> None:
        with self.lock:
            self.sessions.pop(sess.sid, None)

    def delivered(self, n: int) -> None:
        with self.lock:
            self.stats["delivered"] += n

    def errors(self, n: int) -> None:
        with self.lock:
            self.stats["errors"] += n

    def statistics(self) -> dict:
        with self.lock:
            return dict(self.stats, subscribers=len(self.sessions))

    def unread_by(self, segment: Path) -> list[str]:
        """Named groups whose committed offset is before the end of `segment` (a closed events.bin
        segment): they have not read all of it. Called by the event log's retention (under its lock):
        the lag tail counts what was appended since its last call, which records each file's first
        offset as it crosses a rotation; a segment whose end offset is unknown counts as unread."""
        offsets = self.groups.store.offsets()
        if not offsets:
            return []
        self.lag.end_offset()
        created = file_created_ns(segment)
        files = log_files(self.log_path)
        later = [c for c, _ in files if created is not None and c > created]
        end = self.index.base(later[0]) if later else None
        if end is None:
            return sorted(offsets)
        return sorted(name for name, off in offsets.items() if off < end)

    def sessions_by_kind(self) -> dict[str, int]:
        """Connected sessions: in the handshake, following their own tail (solo), members of a group."""
        out = dict.fromkeys(SESSION_KINDS, 0)
        with self.lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            out["handshake" if s.source is None else ("group" if s.source.group else "solo")] += 1
        return out

    def credit(self) -> dict[str, int]:
        """outstanding: credit granted and not yet used, over all sessions; exhausted: sessions past the
        handshake with none left (their consumer is the bottleneck, not the log)."""
        with self.lock:
            sessions = list(self.sessions.values())
        live = [s for s in sessions if s.source is not None]
        return {"outstanding": sum(s.credit for s in live), "exhausted": sum(1 for s in live if s.credit <= 0)}

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout)
        with self.lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            s.stop()
        for s in sessions:
            s.thread.join(timeout)
        self.lag.close()
        self.refuser.stop()
        log.info("subscribe_stopped", **self.statistics())


def build(cfg, data_dir: Path, dtype, tokens=None, tls=None, stored=None, tenants=None) -> SubscribeServer | None:
    """The subscribe server of a configuration, or None when `server.subscribe.enabled` is false.
    `stored`: the engine's `stored` barrier (engine/stored.py), which wakes sessions at the end of the log;
    `tenants`: the service's ingest.tenants.Tenants (subscriber slots per principal or address)."""
    sc = cfg.server.subscribe
    if not sc.enabled:
        return None
    return SubscribeServer(
        sc,
        Path(data_dir) / cfg.storage.events_file,
        dtype,
        data_dir,
        tokens=tokens,
        progress=stored,
        cpus=cfg.affinity.acceptor,
        tls=tls,
        tenants=tenants,
    )
