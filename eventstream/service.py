"""Service: the whole engine built from a Config, started and stopped in the right order.

    start:  storage (recovery) → DLQ → bus (queues) → processors → TCP/UDP ingest
            → control thread → metrics endpoint
    stop:   ingest (stop reading, held events placed, final ACKs once stored) → processors drain
            their queues → batch windows flushed → event log and DLQ flushed and closed → summary

Ingest readers route decoded events straight into the processor queues; processors store each batch
(written to the OS) before releasing it, and the released counts are the watermarks ACKs are sent
from (see ingest/reader.py). So with `server.ack: stored` an ACKed event survives kill -9.
"""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import numpy as np
import structlog

from eventstream.config import Config
from eventstream.config.loader import max_payload_bytes
from eventstream.core.payloads import PayloadArena, release_records
from eventstream.core.records import ACK_MODES, record_dtype
from eventstream.core.topics import TopicTable
from eventstream.engine import idempotency
from eventstream.engine.bus import QUEUE_NAMES, ROUTE, EventBusMulti
from eventstream.engine.control import Backpressure, ControlThread, Level, Sample
from eventstream.engine.dispatcher import sequence_base
from eventstream.engine.dlq import DeadLetterLog, reason_category
from eventstream.engine.manager import ProcessManager
from eventstream.engine.processors import Sinks
from eventstream.ingest.admission import Admission
from eventstream.ingest.auth import TokenError, TokenSet
from eventstream.ingest.delivery import REASON_SINK_FULL
from eventstream.ingest.limits import CLOSE_REASONS
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest.tls import TlsConfigError
from eventstream.ingest.udp import UdpServer
from eventstream.metrics.registry import MetricsRegistry
from eventstream.runtime import gil
from eventstream.storage.writer import EventLog

log = structlog.get_logger("eventstream.service")

BACKPRESSURE_REASONS = ("backpressure", "paused")
# Drops the control plane reacts to: a full queue's overflow policy. Not its own shedding
# ("backpressure", "paused": counting those would hold the level up by itself), not malformed input
# (one bad client must not raise the level for everyone), not handler failures.
OVERLOAD_REASONS = ("overflow", "timeout", "evicted")


class StartupError(RuntimeError):
    """The service cannot start (port in use, bad handler, unwritable data dir...)."""


class LevelActions:
    """What each backpressure level does (cumulative as the level rises, undone step by step):

    ELEVATED   add a transactional and a batch worker (up to max_workers)
    DEGRADED   UDP: admit no BATCH-priority events
    CRITICAL   UDP: admit no LOW or BATCH events
    EMERGENCY  admit only CRITICAL events, over UDP and TCP

    Over TCP a full queue already pushes the client back, tier by tier (the reader holds what did not
    fit and stops reading that connection; nothing is dropped), so the levels hold TCP events only at
    EMERGENCY. UDP has no flow control: what it does not admit is shed (reason "backpressure", DLQ),
    leaving queue room for higher priorities. Events already accepted are never shed.
    """

    MIN_PRIORITY = {Level.HEALTHY: 0, Level.ELEVATED: 0, Level.DEGRADED: 1, Level.CRITICAL: 2, Level.EMERGENCY: 4}

    def __init__(self, service: Service):
        self.service = service

    def on_level(self, level: Level, previous: Level) -> None:
        svc = self.service
        if level >= Level.ELEVATED and previous < Level.ELEVATED:
            for tier in ("transactional", "batch"):
                svc.manager.add_worker(tier)
        svc.admission.min_priority = self.MIN_PRIORITY[level]
        svc.admission.tcp_min_priority = 4 if level >= Level.EMERGENCY else 0
        svc.metrics.set_state(int(level), level.name, int(previous), previous.name)


class Service:
    def __init__(self, cfg: Config, *, handlers: dict | None = None, allow_gil: bool | None = None):
        """`allow_gil`: run even with the GIL on (comparisons); None = as EVENTSTREAM_ALLOW_GIL says."""
        self.cfg = cfg
        self.handlers = handlers
        self.allow_gil = gil.gil_allowed_by_env() if allow_gil is None else allow_gil
        self.topics = TopicTable(cfg.server.max_topics)
        self.dtype = record_dtype(cfg.records.payload_bytes)
        self.started = False
        self._closers: list = []
        self.tcp = self.udp = self.control = None
        self.bus = None
        self.payloads = None  # PayloadArena (created at start)
        self.connectors = None  # eventstream/connectors (NATS JetStream), None when disabled
        self.subscribe = None  # eventstream/subscribe (server.subscribe), None when disabled
        self._last_sample = (0, 0, time.monotonic())

    # ------------------------------------------------------------------------------------ sinks
    def drop(self, records: np.ndarray, reason, payloads: list | None = None) -> None:
        """Every dropped or failed event: dead-letter log + events_dropped_total{reason}. `payloads`:
        the records' payloads when the caller copied them out of the payload arena already."""
        if len(records) == 0:
            return
        if isinstance(reason, str):
            self.dlq.write(records, reason, self.topics, payloads)
            category = reason_category(reason)
            self.metrics.dropped(category, len(records))
            if category in BACKPRESSURE_REASONS:
                self.metrics.backpressure_dropped(len(records))
        else:
            self.dlq.write_each(records, list(reason), self.topics, payloads)
            for r in reason:
                self.metrics.dropped(reason_category(r), 1)

    def on_reject(self, records, reason: str, rejections) -> None:
        """What ingest refused: decoded records refused as a group (backpressure, paused, sink full)
        and frames that failed to decode. One DLQ line each, counted by reason."""
        if records is not None and len(records):
            if reason == REASON_SINK_FULL:  # the ingest ring was full: an overflow, not shedding
                reason = "overflow:ingest"
            self.drop(records, reason)
        for rj in rejections:
            self.dlq.write_line(rj.event_id, rj.topic, rj.priority, rj.reason)
            self.metrics.dropped(reason_category(rj.reason), rj.count)

    def _sync(self) -> None:
        """Group commit for `synced` ACKs: everything stored (and dead-lettered) so far is fsynced."""
        self.event_log.sync()
        sync = getattr(self.dlq, "sync", None)
        if sync is not None:
            sync()

    def _progress(self) -> None:
        tcp = self.tcp
        if tcp is not None:
            tcp.progress()
        conn = self.connectors
        if conn is not None:  # connectors: a NATS source waiting for marks
            conn.progress()

    def _stages(self, ingest_ns: np.ndarray, taken_ns: int, stored_ns: int) -> None:
        m = self.metrics
        m.observe_stage("queued", np.int64(taken_ns) - ingest_ns)
        m.observe_stage("stored", np.int64(stored_ns) - ingest_ns)

    def _processed(self, queue: str, records: np.ndarray, handled_ns: int | None = None) -> None:
        now = time.monotonic_ns() if handled_ns is None else handled_ns
        self.metrics.processed(queue, len(records), now - records["ingest_ts"].astype(np.int64))

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Service:
        cfg = self.cfg
        gil.require_gil_off(self.allow_gil, "the eventstream engine")
        data = Path(cfg.storage.data_dir)
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"storage.data_dir: cannot create {data} ({exc.strerror}); "
                               "allowed: a writable directory") from None
        import tempfile

        try:  # an existing directory may still refuse files (read-only mount, permissions, /proc, /sys)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=data)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StartupError(f"storage.data_dir: cannot write in {data} ({exc.strerror}); "
                               "allowed: a writable directory") from None
        try:
            self._start(data)
        except BaseException:
            self.stop(drain=False)
            raise
        self.started = True
        return self

    def _start(self, data: Path) -> None:
        cfg = self.cfg
        self.metrics = MetricsRegistry()
        # payloads over records.payload_bytes (up to the largest frame) live here; closed last
        try:
            self.payloads = PayloadArena(cfg.payloads.arena_bytes, max_payload_bytes(cfg),
                                         min_payload=cfg.records.payload_bytes, node=cfg.numa.node)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self._closers.append(self.payloads.close)
        st = cfg.storage
        self.dlq = DeadLetterLog(data / st.dlq_file, max_bytes=st.dlq_max_bytes, max_segments=st.dlq_max_segments,
                                 max_age_s=st.dlq_max_age_s)
        self._closers.append(self.dlq.close)
        st = cfg.storage
        # flush_events=1: every append is written to the OS before it returns (the `stored` promise);
        # the flusher thread only runs the interval fsync policy
        self.event_log = EventLog(data / st.events_file, dtype=self.dtype, topics=self.topics,
                                  flush_events=1, flush_interval_ms=max(st.fsync_interval_ms / 2, 1.0),
                                  fsync=st.fsync, fsync_interval_ms=st.fsync_interval_ms, cpus=cfg.affinity.storage,
                                  flusher=st.fsync == "interval", max_segment_bytes=st.events_max_bytes,
                                  max_segments=st.events_max_segments, max_age_s=st.events_max_age_s)
        self._closers.append(self.event_log.close)
        try:
            self.bus = EventBusMulti(cfg, self.dtype, seq_base=sequence_base())
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.bus.on_received = self.metrics.received
        self._closers.append(self.bus.close)
        self.admission = Admission()
        # --- connectors hook (eventstream/connectors): the sink wraps `store` (a copy of each stored
        # batch is queued for the connector thread); started after the processors, stopped around them
        from eventstream import connectors

        self.connectors = connectors.build(cfg, self)
        store = self.event_log.append if self.connectors is None else self.connectors.wrap_store(self.event_log.append)
        # --- end connectors hook
        # --- subscribe hook (eventstream/subscribe): each store bumps the tails' progress signal
        from eventstream.subscribe import server as subscribe

        try:
            sub_tokens = TokenSet.from_config(cfg.server.auth) if cfg.server.subscribe.enabled else None
            self.subscribe = subscribe.build(cfg, data, self.dtype, tokens=sub_tokens)
        except (TokenError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        if self.subscribe is not None:
            store = self.subscribe.wrap_store(store)
        # --- end subscribe hook
        sinks = Sinks(self.topics, store=store, drop=self.drop, processed=self._processed,
                      dedup_hit=self.metrics.dedup_hits, sync=self._sync, progress=self._progress,
                      stages=self._stages)
        try:
            self.manager = ProcessManager(cfg, self.bus, sinks, handlers=self.handlers)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if self.manager.dedups is not None:  # before any event: a resend after a restart is stored once
            self.dedup_rebuilt = idempotency.rebuild(data / st.events_file, self.manager.dedups, self.topics,
                                                     ROUTE, QUEUE_NAMES, cfg.dedup.window_s)
        self._register_gauges()
        self.manager.start()
        for tier in QUEUE_NAMES:  # caller runs: ingest handles a tier's events itself when it is idle
            if getattr(cfg.processors, tier).inline:
                self.bus[tier].lanes = self.manager.lanes(tier)
        if self.connectors is not None:  # connectors hook
            self.connectors.start()
        # Admission (the control plane's level) is applied at the edge: TCP readers hold what is not
        # admitted (pushing the client back), UDP sheds it (NACK-less: counted and dead-lettered).
        # Events already accepted are never shed by the control plane.
        aff, pb = cfg.affinity, cfg.records.payload_bytes
        if cfg.server.tcp.enabled:
            try:
                tokens = TokenSet.from_config(cfg.server.auth)
            except TokenError as exc:
                raise StartupError(str(exc)) from None
            self.tcp = TcpServer(cfg.server.tcp, self.bus, self.topics, admission=self.admission,
                                 on_reject=self.on_reject, cpus=aff.acceptor, reader_cpus=aff.ingest,
                                 payload_bytes=pb, ack_default=ACK_MODES[cfg.server.ack], tokens=tokens,
                                 on_acked=lambda lat: self.metrics.observe_stage("acked", lat),
                                 payloads=self.payloads)
            self._start_server(self.tcp, "server.tcp")
            self._register_limit_metrics(self.tcp)
        if cfg.server.udp.enabled:
            self.udp = UdpServer(cfg.server.udp, self.bus, self.topics, admission=self.admission,
                                 on_reject=self.on_reject, cpus=aff.udp, payload_bytes=pb,
                                 payloads=self.payloads)
            self._start_server(self.udp, "server.udp")
        if self.subscribe is not None:  # subscribe hook: stopped (closers run reversed) before the log closes
            self._start_server(self.subscribe, "server.subscribe")
            self._closers.append(self.subscribe.stop)
            sub = self.subscribe
            self.metrics.gauge_fn("subscribers", {}, lambda: sub.statistics()["subscribers"],
                                  doc="subscriber connections (bound: server.subscribe.max_subscribers)")
            self.metrics.counter_fn("subscribe_delivered", lambda: sub.statistics()["delivered"], {},
                                    doc="events sent to subscribers (DELIVER frames)")
        self.backpressure = Backpressure(cfg.backpressure)
        self.control = ControlThread(self.backpressure, self.sample, LevelActions(self),
                                     interval_ms=cfg.backpressure.interval_ms, cpus=aff.control)
        self.control.start()
        if cfg.metrics.enabled:
            def health() -> tuple[bool, str]:  # /healthz: every engine thread alive
                threads = [self.control, *(p for ws in self.manager.workers.values() for p in ws)]
                for srv in (self.tcp, self.udp, self.subscribe):
                    if srv is not None:
                        threads.extend(srv.threads())
                failed = self.failures()
                dead = failed + [f"{t.name}: not running" for t in threads
                                 if not t.is_alive() and not any(f.startswith(f"{t.name}:") for f in failed)]
                return (not dead, "; ".join(dead) or "ok")

            def ready() -> tuple[bool, str]:  # /readyz: listening, and not shedding everything
                level = self.backpressure.level
                if not self.started:
                    return False, "not started (or stopping)"
                failed = self.failures()
                if failed:
                    return False, "thread failed: " + "; ".join(failed)
                return (level < Level.EMERGENCY, f"backpressure {level.name}")

            try:
                self.exporter = self.metrics.serve(cfg.metrics.host, cfg.metrics.port, cfg.metrics.path,
                                                   health=health, ready=ready)
            except OSError as exc:
                raise StartupError(f"metrics.port: cannot listen on {cfg.metrics.host}:{cfg.metrics.port} "
                                   f"({exc.strerror}); allowed: a free port, or metrics.enabled: false") from None
            self._closers.append(self.exporter.stop)
        log.info("service_started", tcp=self.tcp.address if self.tcp else None,
                 udp=self.udp.address if self.udp else None, data_dir=str(data),
                 metrics=self.exporter.address if cfg.metrics.enabled else None,
                 workers=self.manager.worker_counts(), pid=os.getpid())

    def _start_server(self, server, key: str) -> None:
        try:
            server.start()
        except TlsConfigError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            host, port = server.config.host, server.config.port
            raise StartupError(f"{key}.port: cannot bind {host}:{port} ({exc.strerror}); "
                               f"allowed: a free port (or 0 for any)") from None

    def _register_gauges(self) -> None:
        m = self.metrics
        for name in QUEUE_NAMES:
            m.gauge_fn("queue_depth", {"queue": name}, lambda q=self.bus[name]: q.depth)
        m.gauge_fn("threads_failed", {}, lambda: len(self.failures()),
                   doc="engine threads that died with an error (any: the service is unhealthy and stops)")
        m.gauge_fn("topics", {}, lambda: len(self.topics), doc="distinct topics known (bound: server.max_topics)")
        arena = self.payloads
        m.gauge_fn("payload_arena_used_bytes", {}, lambda: arena.statistics()["used_bytes"],
                   doc="bytes of payloads over records.payload_bytes in flight (bound: payloads.arena_bytes)")
        m.counter_fn("payload_arena_full", lambda: arena.statistics()["full"],
                     doc="claims the full payload arena cut short (the producer was pushed back; UDP: shed)")

    def _register_limit_metrics(self, tcp: TcpServer) -> None:
        """Per-client limits of the TCP ingest (ingest/limits.py): closes by reason, partial bytes."""
        m = self.metrics
        for reason in CLOSE_REASONS:
            m.counter_fn("connections_limited", lambda r=reason: tcp.statistics()["connections_limited"].get(r, 0),
                         {"reason": reason}, doc="TCP connections refused or closed for a per-client limit")
        m.gauge_fn("partial_frame_bytes", {}, tcp.budget.total,
                   doc="bytes held in partial frames over all TCP connections (bound: server.tcp.max_partial_bytes)")

    def sample(self) -> Sample:
        """Metrics the control thread evaluates: depth fraction, and the rate of overload drops (see
        OVERLOAD_REASONS) among the events offered since the last sample."""
        by_reason = self.metrics.dropped_by_reason()
        received = self.metrics.received_total()
        dropped = sum(n for reason, n in by_reason.items() if reason in OVERLOAD_REASONS)
        r0, d0, _ = self._last_sample
        self._last_sample = (received, dropped, time.monotonic())
        offered = (received - r0) + (dropped - d0)
        depth = self.bus.depth
        return Sample(depth=depth / self.cfg.backpressure.max_queue_depth,
                      drop_rate=(dropped - d0) / offered if offered else 0.0,
                      processed=self.metrics.processed_total(), p99_ns=self.metrics.p99_ns("realtime"))

    def stop(self, drain: bool = True, timeout: float = 60.0) -> dict:
        """Stop in dependency order; with `drain`, everything accepted is processed or dead-lettered."""
        t0 = time.monotonic()
        for srv in (self.tcp, self.udp):
            if srv is not None:
                try:
                    srv.stop()
                except Exception:
                    log.exception("ingest_stop_failed")
        conn = self.connectors
        if conn is not None:  # connectors hook: the NATS source stops pulling, like ingest
            conn.stop_intake()
        if getattr(self, "control", None) is not None:
            self.control.stop()
        still_running = False
        mgr = getattr(self, "manager", None)
        if mgr is not None:
            still_running = not mgr.stop(timeout, drain) or still_running
        if conn is not None:  # connectors hook: acks for what is stored, sink flushed, before the log closes
            conn.close(drain=drain and not still_running)
        if not drain and not still_running and self.bus is not None:
            self._dead_letter_leftovers()
        summary = self.summary()
        # A thread that did not finish still holds views into ring memory: freeing the rings under it
        # crashes the process (SIGSEGV). Leak them instead; everything else is flushed and closed.
        keep = {self.bus.close, getattr(self.payloads, "close", None)} if still_running and self.bus is not None else set()
        if keep:
            log.error("threads_still_running_rings_not_freed", timeout_s=timeout)
        for close in reversed(self._closers):
            if close in keep:
                continue
            try:
                close()
            except Exception:
                log.exception("close_failed")
        self._closers.clear()
        if self.started:
            log.info("service_stopped", seconds=round(time.monotonic() - t0, 3), **summary)
        self.started = False
        return summary

    def _dead_letter_leftovers(self) -> None:
        """Stopped without draining: whatever is still queued goes to the DLQ, never silently away."""
        rings = [r for q in self.bus.queues for r in q.rings]
        left = 0
        for ring in rings:
            while True:
                recs = ring.take(ring.capacity, 0.0)
                if not len(recs):
                    break
                left += len(recs)
                self.drop(recs, "shutdown: stopped without draining")
                release_records(recs)
        if left:
            log.warning("stopped_without_draining", dead_lettered=left)

    def exposure_warnings(self) -> list[str]:
        """Why this configuration may be reachable by anyone (serve logs each as a warning)."""
        cfg, out = self.cfg, []
        tcp, udp = cfg.server.tcp, cfg.server.udp
        auth = bool(cfg.server.auth.tokens or cfg.server.auth.tokens_file)
        if tcp.enabled and not _loopback(tcp.host) and not (tcp.tls.cert_file or auth):
            out.append(f"server.tcp.host {tcp.host} is not a loopback address and neither TLS "
                       "(server.tcp.tls.cert_file) nor client tokens (server.auth.tokens) are configured")
        sub = cfg.server.subscribe
        if sub.enabled and not _loopback(sub.host) and not auth:
            out.append(f"server.subscribe.host {sub.host} is not a loopback address and no client tokens "
                       "(server.auth.tokens) are configured: anyone reaching it can read every stored event")
        if udp.enabled and not _loopback(udp.host):
            out.append(f"server.udp.host {udp.host} is not a loopback address: UDP has no authentication "
                       "and no encryption")
        return out

    def failures(self) -> list[str]:
        """Threads that died with an error (the service should then stop)."""
        out = [f"{name}: {exc!r}" for name, exc in self.manager.errors()] if hasattr(self, "manager") else []
        for srv in (self.tcp, self.udp):
            if srv is not None and hasattr(srv, "failures"):
                out.extend(srv.failures())
        if self.connectors is not None:  # connectors hook
            out.extend(self.connectors.failures())
        return out

    def summary(self) -> dict:
        m = getattr(self, "metrics", None)
        if m is None:
            return {}
        out = {"received": m.received_total(), "processed": m.processed_total(),
               "dropped": m.dropped_total(), "dropped_by_reason": m.dropped_by_reason(),
               "dedup_hits": m.dedup_hits_total()}
        # the realtime SLA is reported, never enforced: exact p99 over the most recent events
        recent = m.percentiles("realtime").get("p99_recent", 0.0)
        sla_us = self.cfg.processors.realtime.sla_us
        out["realtime_p99_recent_us"] = round(recent / 1000, 1)
        out["realtime_sla_us"] = sla_us
        out["realtime_sla_met"] = bool(recent / 1000 <= sla_us)
        if self.payloads is not None and not self.payloads.closed:  # payloads over records.payload_bytes
            st = self.payloads.statistics()
            out["payload_arena"] = {k: st[k] for k in ("claimed", "released", "full", "used_bytes", "bytes")}
        return out

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
