"""Engine: the pipeline as one object, with two ports.

    offer(records) ──▶ admission (the control plane's level: hold, or shed with shed_all)
        │              EventBusMulti: route by priority and topic partition, try_put, never waits
        │              (a lane whose partition is idle runs the handler on the offering thread)
        ▼
    realtime MpscRing            transactional MpscRing × partitions    batch MpscRing × partitions
        │ es-realtime-0                 │ es-transactional-0..k                 │ es-batch-0..k
        ▼                               ▼                                       ▼
    skip duplicates (topic, id) → handler → store: EventLog events.bin (es-storage-flush runs the
    interval fsync) → [fsync if a `synced` event] → release ring and payload arena slots
        │                                   refused / failed ─▶ DeadLetterLog (dlq_log.txt)
        ▼
    stored.advance() ─▶ every follower of `stored`: TCP ACK writers, subscribe tails, flows and the
                         NATS sink (they read events.bin), the NATS source (JetStream acks)

The ports. `offer(records, stamp=, shed_all=)` is the only way in: TCP and UDP readers (through
ingest/delivery.py), the NATS source and flows' outputs enter by it and obey the same levels. It
never waits; it returns an `Offer`: completion marks `(ring, end)` of what went in, positions held
back (full queues, or below the level admitted: the caller holds them and offers them again with
`stamp=False`), positions refused with a reason (a shedding queue; with `shed_all`, UDP, also what
is not admitted). `stored` (engine/stored.py) is the barrier over the rings' completed() sequences
that ACK writers and every other follower wait on.

What the engine owns: the payload arena (large payloads), the dead-letter log, the event log, the
bus and its queues, the processors and their lanes (ProcessManager), the dedup tables restored
before the first event (from dedup.snap and the log after it, engine/dedup_snapshot.py; without a
snapshot from events.bin), and the admission signals the control plane sets. The edges (ingest
servers, subscribe, connectors, control thread, exporter) are assembled by service.py and receive
the engine, never the service.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import structlog

from eventstream.config.loader import max_payload_bytes
from eventstream.core.arena import memory_node
from eventstream.core.payloads import PayloadArena, release_records
from eventstream.core.records import record_dtype
from eventstream.core.topics import TopicTable
from eventstream.engine import dedup_snapshot, idempotency
from eventstream.engine.bus import QUEUE_NAMES, REALTIME, ROUTE, EventBusMulti, Offer, sequence_base
from eventstream.engine.control import Sample
from eventstream.engine.dlq import DeadLetterLog, reason_category
from eventstream.engine.manager import ProcessManager
from eventstream.engine.processors import Sinks
from eventstream.engine.stored import Stored
from eventstream.errors import StartupError
from eventstream.ingest.admission import Admission
from eventstream.metrics.engine_gauges import register_dedup, register_engine_gauges, register_storage
from eventstream.runtime import heap
from eventstream.storage.reader import ColumnCollector
from eventstream.storage.writer import EventLog

log = structlog.get_logger("eventstream.engine")

BACKPRESSURE_REASONS = ("backpressure", "paused")
# Drops the control plane reacts to: a full queue's overflow policy. Not its own shedding
# ("backpressure", "paused": counting those would hold the level up by itself), not malformed input
# (one bad client must not raise the level for everyone), not handler failures.
OVERLOAD_REASONS = ("overflow",)


class Engine:
    def __init__(self, cfg, metrics, *, handlers: dict | None = None, allow_gil: bool = False):
        """`metrics`: the MetricsRegistry every count goes to; `allow_gil`: edges that import more
        (nats-py) check the GIL again with it. Nothing is opened before `open()`."""
        self.cfg = cfg
        self.data = Path(cfg.storage.data_dir)
        self.metrics = metrics
        self.handlers = handlers
        self.allow_gil = allow_gil
        self.topics = TopicTable(cfg.server.max_topics)
        self.dtype = record_dtype(cfg.records.payload_bytes)
        # what TCP readers decode and offer first in a read (ingest/connection.py): the realtime queue's priorities
        self.realtime_priorities = bytes(int(q == REALTIME) for q in ROUTE.tolist()).ljust(256, b"\0")
        self.admission = Admission()  # written by the control plane (engine/levels.py), read by offer
        self.stored = Stored()
        # made by open() (the manager by start()); None before: stop() and close() know what to undo
        self.payloads: PayloadArena | None = None
        self.dlq: DeadLetterLog | None = None
        self.event_log: EventLog | None = None
        self.bus: EventBusMulti | None = None
        self.manager: ProcessManager | None = None
        self.dedup_rebuilt: int | None = None
        self.dedup_start: dict = {}  # what the start's rebuild did (idempotency.rebuild)
        self.snapshots: dedup_snapshot.Snapshotter | None = None  # dedup.snapshot_interval_s > 0
        self.startup: dict[str, float] = {}  # seconds of each start-up phase (the startup_phases log line)
        # dedup keys of the active file, collected by its recovery (open) for start(); the dedup
        # snapshot, read meanwhile
        self._keys: ColumnCollector | None = None
        self._snapshot: dedup_snapshot.PendingRead | None = None
        self._last_sample = (0, 0, time.monotonic())

    # ------------------------------------------------------------------------------------ ports
    def offer(self, records: np.ndarray, *, stamp: bool = True, shed_all: bool = False) -> Offer:
        """Put `records` in without waiting (module docstring). Positions in the result index `records`."""
        adm, bus = self.admission, self.bus
        assert bus is not None  # opened
        lo = 4 if adm.paused else (adm.min_priority if shed_all else adm.tcp_min_priority)
        if lo == 0 or len(records) == 0:
            return bus.offer(records, stamp=stamp, shed_all=shed_all)
        below = records["priority"] < lo
        if not below.any():
            return bus.offer(records, stamp=stamp, shed_all=shed_all)
        if shed_all:  # no flow control (UDP): what is not admitted is refused, the rest goes in
            keep = np.flatnonzero(~below)
            off = bus.offer(records[keep], stamp=stamp, shed_all=True) if len(keep) else Offer()
            off.refused = [(keep[pos], why) for pos, why in off.refused]
            off.refused.append((np.flatnonzero(below), "paused" if adm.paused else "backpressure"))
            return off
        # held from the first record not admitted: the source keeps its order (stamped now, like
        # records a full queue holds back, so the retry keeps their sequence numbers)
        if stamp:
            bus.stamp(records)
        cut = int(below.argmax())
        off = bus.offer(records[:cut], stamp=False) if cut else Offer()
        tail = np.arange(cut, len(records))
        off.held = tail if off.held is None else np.concatenate((off.held, tail))
        return off

    # ------------------------------------------------------------------------------------ sinks
    def drop(self, records: np.ndarray, reason, payloads: list | None = None) -> None:
        """Every dropped or failed event: dead-letter log + events_dropped_total{reason}. `payloads`:
        the records' payloads when the caller copied them out of the payload arena already."""
        if len(records) == 0:
            return
        assert self.dlq is not None  # opened
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

    def reject(self, records, reason: str, rejections) -> None:
        """What ingest refused: decoded records refused as a group (backpressure, paused, sink full)
        and frames that failed to decode. One DLQ line each, counted by reason."""
        if records is not None and len(records):
            self.drop(records, reason)
        assert self.dlq is not None  # opened
        for rj in rejections:
            self.dlq.write_line(rj.event_id, rj.topic, rj.priority, rj.reason)
            self.metrics.dropped(reason_category(rj.reason), rj.count)

    def _store(self, records: np.ndarray) -> None:
        assert self.event_log is not None  # opened
        self.event_log.append(records)

    def _sync(self) -> None:
        """Group commit for `synced` ACKs: everything stored (and dead-lettered) so far is fsynced."""
        assert self.event_log is not None and self.dlq is not None  # opened
        self.event_log.sync()
        self.dlq.sync()

    def _stages(self, ingest_ns: np.ndarray, taken_ns: int | np.ndarray, stored_ns: int | np.ndarray) -> None:
        m = self.metrics
        m.observe_stage("queued", np.int64(taken_ns) - ingest_ns)
        m.observe_stage("stored", np.int64(stored_ns) - ingest_ns)

    def _processed(self, queue: str, records: np.ndarray, handled_ns: int | None = None) -> None:
        now = time.monotonic_ns() if handled_ns is None else handled_ns
        self.metrics.processed(queue, len(records), now - records["ingest_ts"].astype(np.int64))

    # ------------------------------------------------------------------------------------ lifecycle
    def _data_dir(self) -> Path:
        data = self.data
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"storage.data_dir: cannot create {data} ({exc.strerror}); allowed: a writable directory"
            ) from None
        try:  # an existing directory may still refuse files (read-only mount, permissions, /proc, /sys)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=data)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StartupError(
                f"storage.data_dir: cannot write in {data} ({exc.strerror}); allowed: a writable directory"
            ) from None
        return data

    def open(self) -> Engine:
        """Payload arena, dead-letter log, events.bin (recovered), bus; nothing runs yet. On failure
        the caller runs close()."""
        heap.keep_freed_memory()  # per-batch arrays reuse freed memory, not fresh pages (runtime/heap.py)
        cfg, st, data = self.cfg, self.cfg.storage, self._data_dir()
        try:  # payloads over records.payload_bytes (up to the largest frame) live here
            self.payloads = PayloadArena(
                cfg.payloads.arena_bytes,
                max_payload_bytes(cfg),
                min_payload=cfg.records.payload_bytes,
                node=memory_node(cfg.numa.node, cfg.numa.bind_memory),
            )
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.dlq = DeadLetterLog(
            data / st.dlq_file, max_bytes=st.dlq_max_bytes, max_segments=st.dlq_max_segments, max_age_s=st.dlq_max_age_s
        )
        # flush_events=1: every append is written to the OS before it returns (the `stored` promise);
        # the flusher thread (es-storage-flush) only runs the interval fsync policy
        # the dedup keys of the active file are read while recovery verifies it (one pass, not two),
        # from the position the dedup snapshot covers when it is in that file; the snapshot is read
        # and checked on another thread meanwhile
        t0 = time.perf_counter()
        snap_path, head = data / dedup_snapshot.FILE_NAME, None
        if cfg.dedup.window_s > 0 and cfg.dedup.snapshot_interval_s > 0 and snap_path.exists():
            head = idempotency.snapshot_offset(data / st.events_file, snap_path)
            node = memory_node(cfg.numa.node, cfg.numa.bind_memory)
            self._snapshot = dedup_snapshot.PendingRead(snap_path, cfg.dedup.window_s, node)
        self._keys = idempotency.collector(cfg.dedup.window_s, head[1] if head else 0)
        self.event_log = EventLog(
            data / st.events_file,
            dtype=self.dtype,
            topics=self.topics,
            flush_events=1,
            flush_interval_ms=max(st.fsync_interval_ms / 2, 1.0),
            fsync=st.fsync,
            fsync_interval_ms=st.fsync_interval_ms,
            cpus=cfg.affinity.storage,
            flusher=st.fsync == "interval",
            max_segment_bytes=st.events_max_bytes,
            max_segments=st.events_max_segments,
            max_age_s=st.events_max_age_s,
            collect=self._keys,
        )
        self.startup["recovery"] = time.perf_counter() - t0
        try:
            self.bus = EventBusMulti(cfg, self.dtype, seq_base=sequence_base())
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        bus = self.bus  # events_received counts what the bus placed, read at scrape time (no call per offer)
        self.metrics.counter_fn("events_received", lambda: bus.received)
        return self

    def start(self) -> Engine:
        """Processors (dedup tables rebuilt from events.bin first: a resend after a restart is stored
        once) and their caller-runs lanes."""
        cfg, bus = self.cfg, self.bus
        assert bus is not None  # opened first
        sinks = Sinks(
            self.topics,
            store=self._store,
            drop=self.drop,
            processed=self._processed,
            dedup_hit=self.metrics.dedup_hits,
            sync=self._sync,
            progress=self.stored.advance,
            stages=self._stages,
        )
        try:
            self.manager = ProcessManager(cfg, bus, sinks, handlers=self.handlers)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if self.manager.dedups is not None:
            t0 = time.perf_counter()
            snap = self._snapshot.result() if self._snapshot is not None else None
            self.startup["dedup_snapshot_read"] = time.perf_counter() - t0
            done = idempotency.rebuild(
                self.data / cfg.storage.events_file,
                self.manager.dedups,
                self.topics,
                ROUTE,
                QUEUE_NAMES,
                cfg.dedup.window_s,
                active=self._keys,
                snapshot=snap,
            )
            self._keys = self._snapshot = None  # their arrays are in the tables now
            self.dedup_rebuilt, self.dedup_start = done["keys"], done
            self.startup.update(dedup_keys_read=done["read_s"], dedup_keys_placed=done["load_s"])
            register_dedup(self.metrics, self.manager.dedups)
            assert self.event_log is not None  # opened
            if cfg.dedup.snapshot_interval_s > 0:
                self.snapshots = dedup_snapshot.Snapshotter(
                    self.data / dedup_snapshot.FILE_NAME,
                    self.manager.dedups,
                    {tier: bus[tier].tokens for tier in self.manager.dedups},
                    self.topics,
                    self.event_log.position,
                    cfg.dedup.snapshot_interval_s,
                    soon=done["replayed"] >= dedup_snapshot.SOON_KEYS,
                    covered=(snap.log_created_ns, snap.log_offset) if done["from_snapshot"] and snap else None,
                )
            else:  # off: a file left from earlier runs would only go stale
                (self.data / dedup_snapshot.FILE_NAME).unlink(missing_ok=True)
        register_engine_gauges(self.metrics, bus, QUEUE_NAMES, self.topics, self.payloads)
        register_storage(self.metrics, self.event_log, self.dlq)
        t0 = time.perf_counter()
        self.manager.start()
        if self.snapshots is not None:
            self.snapshots.start()
        self.startup["processors"] = time.perf_counter() - t0
        for tier in QUEUE_NAMES:  # caller runs: ingest handles a tier's events itself when it is idle
            lanes = self.manager.lanes(tier)  # (which tiers and batch sizes: ProcessManager.lanes)
            if lanes:
                bus[tier].lanes = lanes
        return self

    def stop(self, drain: bool = True, timeout: float = 60.0) -> bool:
        """Processors drain their queues (batch windows flushed); without `drain`, whatever is still
        queued is dead-lettered. Returns False when a processor thread did not finish in time."""
        mgr = self.manager
        snaps = self.snapshots
        # the tables are idle once the processors finished: saved before they are closed
        save = (lambda finished: snaps.stop(final=finished)) if snaps is not None else None
        finished = mgr.stop(timeout, drain, before_close=save) if mgr is not None else True
        self.snapshots = None
        if not drain and finished and self.bus is not None:
            self._dead_letter_leftovers()
        return finished

    def close(self, threads_finished: bool = True) -> None:
        """Event log and DLQ flushed and closed, then the rings and the payload arena. A thread that
        did not finish still holds views into ring memory: freeing the rings under it crashes the
        process (SIGSEGV), so they are leaked instead."""
        if not threads_finished and self.bus is not None:
            log.error("threads_still_running_rings_not_freed")
        closers: list = [self.event_log, self.dlq]
        if threads_finished:
            closers = [self.bus, *closers, self.payloads]
        for part in closers:
            if part is None:
                continue
            try:
                part.close()
            except Exception:
                log.exception("close_failed", part=type(part).__name__)

    def _dead_letter_leftovers(self) -> None:
        """Stopped without draining: whatever is still queued goes to the DLQ, never silently away."""
        left = 0
        assert self.bus is not None  # called only with one
        for ring in (r for q in self.bus.queues for r in q.rings):
            while True:
                recs = ring.take(ring.capacity)
                if not len(recs):
                    break
                left += len(recs)
                self.drop(recs, "shutdown: stopped without draining")
                release_records(recs)
        if left:
            log.warning("stopped_without_draining", dead_lettered=left)

    # ------------------------------------------------------------------------------------ state
    def sample(self) -> Sample:
        """What the control thread evaluates: depth fraction, and the rate of overload drops (see
        OVERLOAD_REASONS) among the events offered since the last sample."""
        m = self.metrics
        by_reason = m.dropped_by_reason()
        received = m.received_total()
        dropped = sum(n for reason, n in by_reason.items() if reason in OVERLOAD_REASONS)
        r0, d0, _ = self._last_sample
        self._last_sample = (received, dropped, time.monotonic())
        offered = (received - r0) + (dropped - d0)
        assert self.bus is not None  # opened
        return Sample(
            depth=self.bus.depth / self.cfg.backpressure.max_queue_depth,
            drop_rate=(dropped - d0) / offered if offered else 0.0,
            processed=m.processed_total(),
            p99_ns=m.p99_ns("realtime"),
        )

    def threads(self) -> list:
        return [p for ws in self.manager.workers.values() for p in ws] if self.manager is not None else []

    def failures(self) -> list[str]:
        """Processor threads that died with an error."""
        return [f"{name}: {exc!r}" for name, exc in self.manager.errors()] if self.manager is not None else []

    def summary(self) -> dict:
        m = self.metrics
        out = {
            "received": m.received_total(),
            "processed": m.processed_total(),
            "dropped": m.dropped_total(),
            "dropped_by_reason": m.dropped_by_reason(),
            "dedup_hits": m.dedup_hits_total(),
        }
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
