"""Service: the whole engine built from a Config, started and stopped in the right order.

    start:  payload arena → DLQ → events.bin (recovery) → bus (queues) → store (+ connectors,
            subscribe) → processors and their lanes → TCP/UDP ingest → subscribe listener
            → control thread → metrics endpoint
    stop:   ingest (stop reading, held events placed, final ACKs once stored) → processors drain
            their queues → batch windows flushed → connectors → subscribe listener → event log and
            DLQ flushed and closed → payload arena → summary

Ingest readers route decoded events straight into the processor queues; processors store each batch
(written to the OS) before releasing it, and the released counts are the watermarks ACKs are sent
from (see ingest/reader.py). So with `server.ack: stored` an ACKed event survives kill -9.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import structlog

from eventstream.config import Config
from eventstream.config.exposure import exposure_warnings
from eventstream.config.loader import max_payload_bytes
from eventstream.core.payloads import PayloadArena, release_records
from eventstream.core.records import ACK_MODES, record_dtype
from eventstream.core.topics import TopicTable
from eventstream.engine import idempotency
from eventstream.engine.bus import QUEUE_NAMES, ROUTE, EventBusMulti
from eventstream.engine.control import Backpressure, ControlThread, Level, Sample
from eventstream.engine.dispatcher import sequence_base
from eventstream.engine.dlq import DeadLetterLog, reason_category
from eventstream.engine.levels import LevelActions
from eventstream.errors import StartupError
from eventstream.engine.manager import ProcessManager
from eventstream.engine.processors import Sinks
from eventstream.ingest.admission import Admission
from eventstream.ingest.auth import TokenError, TokenSet
from eventstream.ingest.delivery import REASON_SINK_FULL
from eventstream.ingest.limits import CLOSE_REASONS
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest import tls as tlsmod
from eventstream.ingest.tls import TlsConfigError
from eventstream.ingest.udp import UdpServer
from eventstream.metrics.engine_gauges import (register_dedup, register_engine_gauges, register_storage,
                                               register_subscribe, register_tcp_limits)
from eventstream.metrics.registry import MetricsRegistry
from eventstream.runtime import gil
from eventstream.storage.writer import EventLog

log = structlog.get_logger("eventstream.service")

BACKPRESSURE_REASONS = ("backpressure", "paused")
# Drops the control plane reacts to: a full queue's overflow policy. Not its own shedding
# ("backpressure", "paused": counting those would hold the level up by itself), not malformed input
# (one bad client must not raise the level for everyone), not handler failures.
OVERLOAD_REASONS = ("overflow", "timeout", "evicted")


class Service:
    def __init__(self, cfg: Config, *, handlers: dict | None = None, allow_gil: bool | None = None,
                 flows: list | None = None):
        """`allow_gil`: run even with the GIL on (comparisons); None = as EVENTSTREAM_ALLOW_GIL says.
        `flows`: eventstream.flow.Flow objects to run inside the engine (with those of `flows.builders`)."""
        self.cfg = cfg
        self.handlers = handlers
        self.flow_defs = flows
        self.flows = None  # eventstream/flow/runtime.py FlowSet, started after the processors
        self.allow_gil = gil.gil_allowed_by_env() if allow_gil is None else allow_gil
        self.topics = TopicTable(cfg.server.max_topics)
        self.dtype = record_dtype(cfg.records.payload_bytes)
        self.started = False
        self._closers: list = []
        self.tcp = self.udp = self.control = None
        self.tls = self.tokens = None  # server.tls context, server.auth tokens (set at start, shared by every port)
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
        """Build the engine and start its threads, in the order data flows backwards: storage and
        sinks first, then processors, then ingest, then the control plane and the exporter."""
        gil.require_gil_off(self.allow_gil, "the eventstream engine")
        data = self._data_dir()
        try:  # one server.tls context and one token set for every TCP port
            self.tls = tlsmod.from_config(self.cfg.server.tls)
            self.tokens = TokenSet.from_config(self.cfg.server.auth)
        except (TlsConfigError, TokenError) as exc:
            raise StartupError(str(exc)) from None
        try:
            self.metrics = MetricsRegistry()
            self._open_storage(data)
            self._build_bus()
            store = self._build_store(data)
            self._start_processors(data, store)
            self._start_flows(data)
            self._start_ingest()
            self._start_subscribe()
            self._start_control()
            self._start_exporter()
        except BaseException:
            self.stop(drain=False)
            raise
        log.info("service_started", tcp=self.tcp.address if self.tcp else None,
                 udp=self.udp.address if self.udp else None, data_dir=str(data),
                 metrics=self.exporter.address if self.cfg.metrics.enabled else None,
                 workers=self.manager.worker_counts(), pid=os.getpid())
        self.started = True
        return self

    def _data_dir(self) -> Path:
        data = Path(self.cfg.storage.data_dir)
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"storage.data_dir: cannot create {data} ({exc.strerror}); "
                               "allowed: a writable directory") from None
        try:  # an existing directory may still refuse files (read-only mount, permissions, /proc, /sys)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=data)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StartupError(f"storage.data_dir: cannot write in {data} ({exc.strerror}); "
                               "allowed: a writable directory") from None
        return data

    def _open_storage(self, data: Path) -> None:
        """The payload arena (closed last), the dead-letter log and events.bin."""
        cfg, st = self.cfg, self.cfg.storage
        # payloads over records.payload_bytes (up to the largest frame) live here
        try:
            self.payloads = PayloadArena(cfg.payloads.arena_bytes, max_payload_bytes(cfg),
                                         min_payload=cfg.records.payload_bytes, node=cfg.numa.node)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self._closers.append(self.payloads.close)
        self.dlq = DeadLetterLog(data / st.dlq_file, max_bytes=st.dlq_max_bytes, max_segments=st.dlq_max_segments,
                                 max_age_s=st.dlq_max_age_s)
        self._closers.append(self.dlq.close)
        # flush_events=1: every append is written to the OS before it returns (the `stored` promise);
        # the flusher thread only runs the interval fsync policy
        self.event_log = EventLog(data / st.events_file, dtype=self.dtype, topics=self.topics,
                                  flush_events=1, flush_interval_ms=max(st.fsync_interval_ms / 2, 1.0),
                                  fsync=st.fsync, fsync_interval_ms=st.fsync_interval_ms, cpus=cfg.affinity.storage,
                                  flusher=st.fsync == "interval", max_segment_bytes=st.events_max_bytes,
                                  max_segments=st.events_max_segments, max_age_s=st.events_max_age_s)
        self._closers.append(self.event_log.close)

    def _build_bus(self) -> None:
        try:
            self.bus = EventBusMulti(self.cfg, self.dtype, seq_base=sequence_base())
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.bus.on_received = self.metrics.received
        self._closers.append(self.bus.close)
        self.admission = Admission()

    def _build_store(self, data: Path):
        """What processors call to store a handled batch: events.bin, wrapped by the connectors (a
        copy of each stored batch is queued for the connector thread) and by the subscribe server
        (each store bumps the tails' progress signal)."""
        from eventstream import connectors
        from eventstream.subscribe import server as subscribe

        cfg = self.cfg
        store = self.event_log.append
        self.connectors = connectors.build(cfg, self)
        if self.connectors is not None:
            store = self.connectors.wrap_store(store)
        try:
            self.subscribe = subscribe.build(cfg, data, self.dtype, tokens=self.tokens, tls=self.tls)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if self.subscribe is not None:
            store = self.subscribe.wrap_store(store)
            self.event_log.unread_by = self.subscribe.unread_by  # retention asks the named groups
            self.event_log.keep_unread = cfg.storage.retention_respects_groups
        return store

    def _start_processors(self, data: Path, store) -> None:
        """Processors (deduplication rebuilt from events.bin first), their caller-runs lanes, then
        the connectors (started after the processors, stopped around them)."""
        cfg = self.cfg
        sinks = Sinks(self.topics, store=store, drop=self.drop, processed=self._processed,
                      dedup_hit=self.metrics.dedup_hits, sync=self._sync, progress=self._progress,
                      stages=self._stages)
        try:
            self.manager = ProcessManager(cfg, self.bus, sinks, handlers=self.handlers)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if self.manager.dedups is not None:  # before any event: a resend after a restart is stored once
            self.dedup_rebuilt = idempotency.rebuild(data / cfg.storage.events_file, self.manager.dedups,
                                                     self.topics, ROUTE, QUEUE_NAMES, cfg.dedup.window_s)
        register_engine_gauges(self.metrics, self.bus, QUEUE_NAMES, self.topics, self.payloads, self.failures)
        register_storage(self.metrics, self.event_log, self.dlq)
        if self.manager.dedups is not None:
            register_dedup(self.metrics, self.manager.dedups)
        self.manager.start()
        for tier in QUEUE_NAMES:  # caller runs: ingest handles a tier's events itself when it is idle
            if getattr(cfg.processors, tier).inline:
                self.bus[tier].lanes = self.manager.lanes(tier)
        if self.connectors is not None:
            self.connectors.start()

    def _start_flows(self, data: Path) -> None:
        """Dataflows (eventstream/flow): log consumers writing back through the bus; stopped before the
        processors so their last outputs are stored."""
        from eventstream.flow.runtime import start_flows

        try:
            self.flows = start_flows(self, data, self.flow_defs)
        except (ValueError, OSError) as exc:
            raise StartupError(str(exc)) from None

    def _start_ingest(self) -> None:
        """TCP and UDP. Admission (the control plane's level) is applied at the edge: TCP readers hold
        what is not admitted (pushing the client back), UDP sheds it (NACK-less: counted and
        dead-lettered). Events already accepted are never shed by the control plane."""
        cfg = self.cfg
        aff, pb = cfg.affinity, cfg.records.payload_bytes
        if cfg.server.tcp.enabled:
            tokens = self.tokens
            self.tcp = TcpServer(cfg.server.tcp, self.bus, self.topics, admission=self.admission,
                                 on_reject=self.on_reject, cpus=aff.acceptor, reader_cpus=aff.ingest,
                                 payload_bytes=pb, ack_default=ACK_MODES[cfg.server.ack], tokens=tokens,
                                 on_acked=lambda lat: self.metrics.observe_stage("acked", lat),
                                 payloads=self.payloads, tls=self.tls)
            self._start_server(self.tcp, "server.tcp")
            register_tcp_limits(self.metrics, self.tcp, CLOSE_REASONS)
        if cfg.server.udp.enabled:
            self.udp = UdpServer(cfg.server.udp, self.bus, self.topics, admission=self.admission,
                                 on_reject=self.on_reject, cpus=aff.udp, payload_bytes=pb,
                                 payloads=self.payloads)
            self._start_server(self.udp, "server.udp")

    def _start_subscribe(self) -> None:
        """The subscribe listener (stopped before the log closes: closers run in reverse)."""
        sub = self.subscribe
        if sub is None:
            return
        self._start_server(sub, "server.subscribe")
        self._closers.append(sub.stop)
        register_subscribe(self.metrics, sub)

    def _start_control(self) -> None:
        self.backpressure = Backpressure(self.cfg.backpressure)
        self.control = ControlThread(self.backpressure, self.sample, LevelActions(self),
                                     interval_ms=self.cfg.backpressure.interval_ms, cpus=self.cfg.affinity.control)
        self.control.start()

    def _start_exporter(self) -> None:
        m = self.cfg.metrics
        if not m.enabled:
            return
        try:
            self.exporter = self.metrics.serve(m.host, m.port, m.path, health=self._health, ready=self._ready,
                                               tls=self.tls if m.tls else None,
                                               tokens=self.tokens if m.auth else None)
        except OSError as exc:
            raise StartupError(f"metrics.port: cannot listen on {m.host}:{m.port} "
                               f"({exc.strerror}); allowed: a free port, or metrics.enabled: false") from None
        self._closers.append(self.exporter.stop)

    def _health(self) -> tuple[bool, str]:
        """/healthz: every engine thread alive."""
        threads = [self.control, *(p for ws in self.manager.workers.values() for p in ws)]
        for srv in (self.tcp, self.udp, self.subscribe):
            if srv is not None:
                threads.extend(srv.threads())
        failed = self.failures()
        dead = failed + [f"{t.name}: not running" for t in threads
                         if not t.is_alive() and not any(f.startswith(f"{t.name}:") for f in failed)]
        return (not dead, "; ".join(dead) or "ok")

    def _ready(self) -> tuple[bool, str]:
        """/readyz: listening, and not shedding everything."""
        if not self.started:
            return False, "not started (or stopping)"
        failed = self.failures()
        if failed:
            return False, "thread failed: " + "; ".join(failed)
        level = self.backpressure.level
        return (level < Level.EMERGENCY, f"backpressure {level.name}")

    def _start_server(self, server, key: str) -> None:
        try:
            server.start()
        except TlsConfigError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            host, port = server.config.host, server.config.port
            raise StartupError(f"{key}.port: cannot bind {host}:{port} ({exc.strerror}); "
                               f"allowed: a free port (or 0 for any)") from None

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
        if self.flows is not None:  # before the processors: a flow's last outputs are stored
            self.flows.stop()
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
        summary["drained"] = not still_running  # False: a worker did not finish within `timeout`
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
        return exposure_warnings(self.cfg)

    def failures(self) -> list[str]:
        """Threads that died with an error (the service should then stop)."""
        out = [f"{name}: {exc!r}" for name, exc in self.manager.errors()] if hasattr(self, "manager") else []
        for srv in (self.tcp, self.udp):
            if srv is not None and hasattr(srv, "failures"):
                out.extend(srv.failures())
        if self.connectors is not None:  # connectors hook
            out.extend(self.connectors.failures())
        if self.flows is not None:
            out.extend(self.flows.failures())
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

