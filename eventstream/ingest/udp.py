"""UDP ingest server (:9001): one pinned thread, recvmmsg batches into preallocated buffers.

Each datagram holds one or more complete frames of either version; there is no ACK/NACK. A datagram
that ends inside a frame or carries a framing error is counted in datagrams_bad and logged (rate
limited); the frames before the bad spot are kept and the socket keeps working. Content errors reject
only their frame (on_reject, frames_rejected), as on TCP.

recvmmsg is called through ctypes on libc (up to batch_datagrams datagrams per syscall, MSG_DONTWAIT
after the selector reports the socket readable). Every ctypes object (iovecs, mmsghdrs) is built by the
receiver thread itself and never shared: ctypes on 3.13t is not safe to share between threads. Where
recvmmsg is unavailable, a loop of socket.recvmsg_into fills the same buffers.

Backpressure while paused: the UDP reader keeps reading and rejects with reason "paused" (see
admission.py for why).

The reader thread dying with an error is a failure of the service: failures() lists it
(Service.failures(): /healthz, the threads_failed gauge, `eventstream serve` exits 1).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import selectors
import socket
import threading
import time

import structlog

from eventstream.config import UdpConfig
from eventstream.core.topics import TopicTable
from eventstream.ingest.admission import Rejection
from eventstream.ingest.delivery import Delivery, IngestStats, merge_stats
from eventstream.ingest.limits import RejectMeter
from eventstream.ingest.tcp import bind_error
from eventstream.ingest.tenants import TopicGate
from eventstream.protocol.decoder import FrameDecoder, FrameError, decode_frames
from eventstream.protocol.frames import BATCH_HEAD, KIND_BATCH, V2_MAGIC
from eventstream.protocol.framing import scan
from eventstream.runtime.affinity import pin_current_thread

# a datagram whose payload found no room in the payload arena (payloads.arena_bytes): shed, as a full queue
REASON_ARENA_FULL = "overflow:payloads (the payload arena is full; payloads.arena_bytes)"

log = structlog.get_logger("eventstream.ingest.udp")

MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
UDP_CONN_ID = 0


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_IoVec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _load_recvmmsg():
    """The libc recvmmsg prototype, built once at import (None where unavailable)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_RECVMMSG = _load_recvmmsg()


NAME_BYTES = 128  # a sockaddr_storage per datagram (its source address; only with a per-source limit)


class _Receiver:
    """Preallocated batch buffers + the per-thread ctypes structures (create inside the thread).
    With `sources`, each datagram's source address is kept too (self.source(i))."""

    def __init__(self, sock: socket.socket, batch: int, slot: int, use_recvmmsg: bool, sources: bool = False):
        self.sock = sock
        self.batch = batch
        self.slot = slot
        self.buf = bytearray(batch * slot)
        self.lengths = [0] * batch
        self.sources = sources
        self.names = bytearray(batch * NAME_BYTES) if sources else None
        self.addrs: list = [None] * batch
        self.mode = "recvmmsg" if use_recvmmsg and _RECVMMSG is not None else "recvmsg_into"
        if self.mode == "recvmmsg":
            base = ctypes.addressof((ctypes.c_char * len(self.buf)).from_buffer(self.buf))
            self.iov = (_IoVec * batch)()
            self.msgs = (_MMsgHdr * batch)()
            nb = self.names
            names = ctypes.addressof((ctypes.c_char * len(nb)).from_buffer(nb)) if nb is not None else 0
            for i in range(batch):
                self.iov[i].iov_base = base + i * slot
                self.iov[i].iov_len = slot
                self.msgs[i].msg_hdr.msg_iov = ctypes.pointer(self.iov[i])
                self.msgs[i].msg_hdr.msg_iovlen = 1
                if sources:
                    self.msgs[i].msg_hdr.msg_name = names + i * NAME_BYTES
        else:
            mv = memoryview(self.buf)
            self.views = [mv[i * slot : (i + 1) * slot] for i in range(batch)]

    def receive(self) -> int:
        """Datagrams now in the buffer (0 when none were waiting); lengths in self.lengths."""
        if self.mode == "recvmmsg":
            if self.sources:
                for i in range(self.batch):  # the kernel writes back each address's length
                    self.msgs[i].msg_hdr.msg_namelen = NAME_BYTES
            n = _RECVMMSG(self.sock.fileno(), self.msgs, self.batch, MSG_DONTWAIT, None)
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    return 0
                raise OSError(err, f"recvmmsg failed: {errno.errorcode.get(err, err)}")
            for i in range(n):
                self.lengths[i] = self.msgs[i].msg_len
            return n
        n = 0
        while n < self.batch:
            try:
                nbytes, _anc, _flags, addr = self.sock.recvmsg_into([self.views[n]], 0, MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            self.lengths[n] = nbytes
            self.addrs[n] = addr
            n += 1
        return n

    def source(self, i: int):
        """A hashable key of datagram i's source address (the address bytes, or the address tuple)."""
        if self.mode != "recvmmsg":
            return self.addrs[i][0] if self.addrs[i] else None
        names = self.names
        assert names is not None  # asked only when sources are tracked
        o = i * NAME_BYTES
        family = names[o] | (names[o + 1] << 8)
        if family == socket.AF_INET6:
            return bytes(names[o + 8 : o + 24])
        return bytes(names[o + 4 : o + 8])


class SourceLimit:
    """Datagrams per second per source address: a token bucket each, in a bounded table."""

    def __init__(self, rate: float, max_sources: int):
        self.rate = float(rate)
        self.burst = max(self.rate * 0.1, 1.0)
        self.max_sources = max_sources
        self.buckets: dict = {}  # key -> [tokens, stamp]
        self.limited = 0  # datagrams discarded

    def admit(self, key, now: float) -> bool:
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.max_sources:
                self._forget(now)
            b = self.buckets[key] = [self.burst, now]
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        self.limited += 1
        return False

    def _forget(self, now: float) -> None:
        """Full: forget sources not heard from for a second (all of them if that frees nothing)."""
        stale = [k for k, b in self.buckets.items() if now - b[1] > 1.0]
        for k in stale:
            del self.buckets[k]
        if len(self.buckets) >= self.max_sources:
            self.buckets.clear()


def kernel_drops(sock: socket.socket | None) -> int:
    """Datagrams the kernel dropped for this socket (its receive buffer was full): the `drops` column
    of /proc/net/udp(6) for the socket's inode (0 where that is not available)."""
    if sock is None or sock.fileno() < 0:
        return 0
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) >= 13 and cols[9] == inode:
                        return int(cols[-1])
        except OSError:
            continue
    return 0


class UdpServer:
    def __init__(
        self,
        config: UdpConfig,
        sink,
        topics: TopicTable,
        *,
        on_reject=None,
        cpus=None,
        payload_bytes: int = 448,
        max_frame_bytes: int = 1 << 20,
        payloads=None,
        use_recvmmsg: bool = True,
        tenants=None,
    ):
        """`tenants`: the service's tenants.Tenants: all UDP sources together are one tenant for new
        topics (server.tenants.max_new_topics), so UDP cannot fill the topic table for TCP clients."""
        self.config = config
        self.topics = topics
        self.cpus = list(cpus or [])
        self.payload_bytes = payload_bytes
        self.payloads = payloads  # PayloadArena for payloads over payload_bytes (None: refused)
        self.max_frame_bytes = max_frame_bytes
        self.use_recvmmsg = use_recvmmsg
        self.tenants = tenants
        self.stats = IngestStats()
        self.delivery = Delivery(sink, on_reject, self.stats, udp=True)
        self.recv_mode = ""
        self.rcvbuf_effective = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._address: tuple[str, int] | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.meter = RejectMeter(config.max_rejects_per_s, time.monotonic())
        rate = getattr(config, "max_datagrams_per_s_per_source", 0.0)
        self.source_limit = SourceLimit(rate, getattr(config, "max_sources", 65536)) if rate else None

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("UdpServer.address is known after start()")
        return self._address

    def start(self) -> UdpServer:
        cfg = self.config
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_DGRAM)
        # Exclusive bind: no SO_REUSEADDR / SO_REUSEPORT. With either, another local process setting the
        # same option could bind the port too and the kernel would hand it (some or all of) our
        # datagrams; without them a port already bound by anyone fails here (EADDRINUSE) and a later
        # bind by anyone else fails while we hold it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.rcvbuf_bytes)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            sock.close()
            raise bind_error("UDP", "server.udp.port", cfg.host, cfg.port, exc) from None
        self.rcvbuf_effective = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if self.rcvbuf_effective < cfg.rcvbuf_bytes:
            log.warning(
                "udp_rcvbuf_capped",
                requested=cfg.rcvbuf_bytes,
                effective=self.rcvbuf_effective,
                hint="raise net.core.rmem_max to allow server.udp.rcvbuf_bytes",
            )
        sock.setblocking(False)
        self._sock = sock
        self._address = sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._run, name="es-udp", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)
        log.info("udp_listening", host=self._address[0], port=self._address[1], mode=self.recv_mode)
        return self

    def _run(self) -> None:
        pin_current_thread(self.cpus, "es-udp")
        cfg = self.config
        sock = self._sock
        assert sock is not None  # start() bound it before this thread
        rx = _Receiver(
            sock, cfg.batch_datagrams, cfg.max_datagram_bytes, self.use_recvmmsg, sources=self.source_limit is not None
        )
        self.recv_mode = rx.mode
        self._ready.set()
        dec = FrameDecoder(
            self.topics,
            max_frame_bytes=self.max_frame_bytes,
            payload_bytes=self.payload_bytes,
            conn_id=UDP_CONN_ID,
            payloads=self.payloads,
        )
        if self.tenants is not None:
            dec.topics = TopicGate(dec.topics, None, self.tenants.get("udp"), self.tenants)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        last_bad_log = 0.0
        try:
            while not self._stopping.is_set():
                if not sel.select(0.2):
                    continue
                while not self._stopping.is_set():
                    n = rx.receive()
                    if n == 0:
                        break
                    bad = self._handle(rx, n, dec)
                    if bad and time.monotonic() - last_bad_log > 1.0:
                        last_bad_log = time.monotonic()
                        log.warning(
                            "udp_bad_datagrams", count=len(bad), example=bad[0], total_bad=self.stats.datagrams_bad
                        )
                    if n < rx.batch:
                        break
        except Exception as exc:
            self.error = exc
            log.exception("udp_reader_crashed")
        finally:
            sel.close()

    def _handle(self, rx: _Receiver, n: int, dec: FrameDecoder) -> list[str]:
        """Decode n datagrams in one vectorized pass; returns reasons of bad datagrams."""
        stats = self.stats
        offs: list[int] = []
        lens: list[int] = []
        owner: list[int] = []
        bad: list[str] = []
        buf, slot, maxf = rx.buf, rx.slot, self.max_frame_bytes
        limit = self.source_limit
        now = time.monotonic()
        for i in range(n):
            if limit is not None and not limit.admit(rx.source(i), now):
                continue  # this source is over its datagrams/s: not even decoded
            start = i * slot
            end = start + rx.lengths[i]
            stats.bytes_received += end - start
            o, ln, pos, fatal = scan(buf, start, end, maxf)
            if fatal is not None or pos != end:
                bad.append(fatal or f"datagram ends inside a frame ({end - pos} bytes left over)")
            offs.extend(o)
            lens.extend(ln)
            owner.extend([i] * len(o))
        ingest_ts = time.monotonic_ns()
        first = 0
        while first < len(offs):
            records, indices, errors, bad_at = decode_frames(
                dec, buf, offs[first:], lens[first:], dec.frames_seen + 1, ingest_ts
            )
            stop = dec.arena_stop
            # indices count events (a BATCH frame of N takes N): dec.next_index is the one after what
            # decode_frames consumed
            if stop >= 0:  # the payload arena is full: no flow control here, shed that frame (the
                dec.arena_stop = -1  # rest of it, when a BATCH frame was cut part way)
                at = offs[first + stop]
                left = 1
                if buf[at + 4] == V2_MAGIC and buf[at + 5] == KIND_BATCH:
                    left = BATCH_HEAD.unpack_from(buf, at)[5] - dec.batch_skip
                dec.batch_skip = 0
                dec.frames_seen = dec.next_index - 1 + left
                consumed = first + stop + 1
                self._shed_arena_full(dec.next_index, left)
            elif bad_at is None:
                dec.frames_seen = dec.next_index - 1
                consumed = len(offs)
            else:  # a frame whose topic runs past its end: drop the rest of that datagram
                e: FrameError = errors.pop()
                bad.append(e.reason)
                dgram = owner[first + bad_at]
                consumed = first + bad_at
                while consumed < len(offs) and owner[consumed] == dgram:
                    consumed += 1
                dec.frames_seen = dec.next_index - 1 + (consumed - first - bad_at - 1)
            report = None
            if errors:
                report, ended = self.meter.admit(len(errors), len(records), time.monotonic())
                if ended:
                    self.delivery.report_suppressed(
                        UDP_CONN_ID, ended, "server.udp.max_rejects_per_s", self.meter.limit
                    )
            self.delivery.deliver(records, indices, errors, UDP_CONN_ID, want_nacks=False, report_errors=report)
            first = consumed
        stats.datagrams_bad += len(bad)
        stats.datagrams += n  # last: a reader of statistics() that sees the datagrams sees their outcome
        return bad

    def _shed_arena_full(self, index: int, events: int = 1) -> None:
        self.stats.backpressure_drops += events
        self.stats.frames_rejected[REASON_ARENA_FULL] += events
        if self.delivery.on_reject is not None:
            try:
                self.delivery.on_reject(None, "", [Rejection(UDP_CONN_ID, index, 0, "", -1, REASON_ARENA_FULL)])
            except Exception as exc:  # noqa: BLE001 - the engine's callback: log, keep receiving
                log.error("on_reject_failed", error=repr(exc))

    def kernel_drops(self) -> int:
        return kernel_drops(self._sock)

    def threads(self) -> list[threading.Thread]:
        """The reader thread (for health checks)."""
        return [self._thread] if self._thread is not None else []

    def failures(self) -> list[str]:
        """The reader thread, if it died with an error."""
        return [f"es-udp: {self.error!r}"] if self.error is not None else []

    def stop(self, drain: bool = True, timeout: float = 5.0) -> None:
        """Stop reading; datagrams already received are decoded before the thread exits."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("udp_reader_did_not_stop", timeout_s=timeout)
        final = self.statistics()  # kernel drops are read from the socket: before it closes
        if self._sock is not None:
            self._sock.close()
        self.delivery.report_suppressed(
            UDP_CONN_ID, self.meter.take_suppressed(), "server.udp.max_rejects_per_s", self.meter.limit
        )
        log.info("udp_stopped", **final)

    def statistics(self) -> dict:
        out = merge_stats([self.stats])
        out.update(
            datagrams_received=self.stats.datagrams,
            datagrams_bad=self.stats.datagrams_bad,
            recv_mode=self.recv_mode,
            rcvbuf_bytes=self.rcvbuf_effective,
            datagrams_rate_limited=self.source_limit.limited if self.source_limit is not None else 0,
            kernel_drops=self.kernel_drops(),
        )
        return out

    def __enter__(self) -> UdpServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
