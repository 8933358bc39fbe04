"""ProcessManager: builds, starts, scales and stops the processor threads.

    EventBusMulti.realtime       --> RealtimeProcessor        x 1
    EventBusMulti.transactional  --> TransactionalProcessor   x workers .. max_workers
    EventBusMulti.batch          --> BatchProcessor           x workers .. max_workers  (shared WindowTables)

Workers of one tier share that tier's partitions through per-partition tokens (see engine/bus.py), so
`add_worker` just starts one more thread; nothing is reassigned. Every partition of every tier has
its own Deduplicator (engine/idempotency.py).
"""

from __future__ import annotations

import threading

import structlog

from eventstream.config import Config
from eventstream.core.arena import memory_node
from eventstream.core.dedup import Deduplicator, MemoryBudget
from eventstream.core.records import SMALL_BATCH
from eventstream.engine.bus import EventBusMulti
from eventstream.engine.handlers import noop, resolve
from eventstream.engine.processors import (
    BatchProcessor,
    Processor,
    RealtimeProcessor,
    Sinks,
    TransactionalProcessor,
    WindowTable,
)
from eventstream.engine.processors.batch import flush_windows

log = structlog.get_logger("eventstream.manager")


class ProcessManager:
    def __init__(self, cfg: Config, bus: EventBusMulti, sinks: Sinks, *, handlers: dict | None = None):
        """`handlers` may override the configured callables by tier ("realtime", "transactional",
        "batch", "aggregate"), for embedding and tests."""
        self.cfg = cfg
        self.bus = bus
        self.sinks = sinks
        p = cfg.processors
        given = handlers or {}
        self.handlers = {
            "realtime": given.get("realtime", resolve(p.realtime.handler, "processors.realtime.handler")),
            "transactional": given.get(
                "transactional", resolve(p.transactional.handler, "processors.transactional.handler")
            ),
            "batch": given.get("batch", resolve(p.batch.handler, "processors.batch.handler")),
            "aggregate": given.get("aggregate", resolve(p.batch.aggregate, "processors.batch.aggregate")),
        }
        # one dedup table per partition of every tier, all sharing one memory budget: only the worker
        # holding the partition's token touches a table, so it is probed and filled with numpy
        d = cfg.dedup
        self.dedups: dict[str, list[Deduplicator]] | None = None
        if d.window_s > 0:
            budget = MemoryBudget(d.max_bytes)
            node = memory_node(cfg.numa.node, cfg.numa.bind_memory)
            self.dedups = {
                tier: [
                    Deduplicator(d.buckets, d.window_s, node=node, budget=budget) for _ in range(bus[tier].partitions)
                ]
                for tier in ("realtime", "transactional", "batch")
            }
        self.window_tables = [WindowTable() for _ in range(bus["batch"].partitions)]
        self.workers: dict[str, list[Processor]] = {"realtime": [], "transactional": [], "batch": []}
        self._lock = threading.Lock()  # guards worker lists (control plane vs shutdown), never the data path
        self._stopping = False

    def _make(self, tier: str, worker: int | None = None) -> Processor:
        cfg, aff = self.cfg, self.cfg.affinity
        n = len(self.workers[tier]) if worker is None else worker
        common = dict(
            worker=n,
            cpus=getattr(aff, tier),
            max_batch=cfg.queues.max_batch,
            topics=getattr(cfg.processors, tier).topics,
            dedups=self.dedups[tier] if self.dedups is not None else None,
            scheduling=getattr(cfg.scheduling, tier),
        )
        if tier == "realtime":
            return RealtimeProcessor(self.bus["realtime"], self.sinks, self.handlers["realtime"], **common)
        if tier == "transactional":
            t = cfg.processors.transactional
            return TransactionalProcessor(
                self.bus["transactional"],
                self.sinks,
                self.handlers["transactional"],
                max_retries=t.max_retries,
                retry_backoff_ms=t.retry_backoff_ms,
                **common,
            )
        b = cfg.processors.batch
        return BatchProcessor(
            self.bus["batch"],
            self.sinks,
            self.handlers["batch"],
            tables=self.window_tables,
            window_s=b.window_s,
            aggregate=self.handlers["aggregate"],
            **common,
        )

    def lanes(self, tier: str) -> list[Processor]:
        """Caller-runs lanes for `tier`: one processor per queue partition, never started (ingest
        threads call its run_inline), sharing the tier's handler, dedup tables and windows; [] for none.

        With `processors.<tier>.inline` a lane takes batches of any size. Without it, a bulk tier whose
        handler is the stock `noop` (and, for the batch tier, with no aggregate) still gets lanes for
        batches of at most SMALL_BATCH records: no user code runs on the ingest thread then (only the
        dedup check and the write a worker would do), and a few records cost the reader less than the
        hand-off to a worker and the wake-up back for the ACK. Larger batches (under load) go to the
        workers, which can use the other CPUs."""
        most = 0  # any size
        if not getattr(self.cfg.processors, tier).inline:
            if tier == "realtime" or self.handlers[tier] is not noop:
                return []
            if tier == "batch" and self.handlers["aggregate"] is not None:
                return []
            most = SMALL_BATCH
        out = []
        for i in range(self.bus[tier].partitions):
            lane = self._make(tier, worker=i)
            lane.name = f"es-{tier}-lane-{i}"
            lane.inline_max = most
            out.append(lane)
        return out

    def start(self) -> None:
        p = self.cfg.processors
        for tier, count in (("realtime", 1), ("transactional", p.transactional.workers), ("batch", p.batch.workers)):
            for _ in range(count):
                self._start_one(tier)

    def _start_one(self, tier: str) -> Processor:
        proc = self._make(tier)
        self.workers[tier].append(proc)
        proc.start()
        log.info("worker_started", tier=tier, thread=proc.name, cpus=proc.cpus or "any")
        return proc

    def max_workers(self, tier: str) -> int:
        return 1 if tier == "realtime" else getattr(self.cfg.processors, tier).max_workers

    def add_worker(self, tier: str) -> bool:
        """Start one more worker for `tier` if below its max_workers. Returns whether one started."""
        if tier not in ("transactional", "batch"):
            raise ValueError(f"tier {tier!r} cannot scale; allowed: 'transactional', 'batch'")
        with self._lock:
            if self._stopping or len(self.workers[tier]) >= self.max_workers(tier):
                return False
            self._start_one(tier)
            return True

    def worker_counts(self) -> dict[str, int]:
        return {t: len(w) for t, w in self.workers.items()}

    def stop(self, timeout: float = 30.0, drain: bool = True, before_close=None) -> bool:
        """Drain (or, without `drain`, abandon after the current batch) and stop every worker (every
        source must have stopped offering first), then flush the batch windows. Returns False if a worker
        did not finish within `timeout`. `before_close(finished)`: called once the workers are done,
        before the dedup tables are closed (the engine saves them)."""
        with self._lock:
            self._stopping = True
            procs = [p for ws in self.workers.values() for p in ws]
        for proc in procs:
            proc.stop(drain)
        ok = True
        for proc in procs:
            proc.join(timeout)
            if proc.is_alive():
                ok = False
                log.error("worker_stuck", thread=proc.name)
        if self.workers["batch"] and ok:
            first = self.workers["batch"][0]
            assert isinstance(first, BatchProcessor)  # the batch tier's workers
            flushed = flush_windows(first)
            log.info("windows_flushed", windows=flushed)
        if before_close is not None:
            before_close(ok)
        if ok and self.dedups is not None:
            for tables in self.dedups.values():
                for d in tables:
                    d.close()
        return ok

    def errors(self) -> list[tuple[str, BaseException]]:
        return [(p.name, p.error) for ws in self.workers.values() for p in ws if p.error is not None]
