"""The processor loop shared by every tier.

A processor thread walks its queue's partitions, try-acquires a partition's ownership token, polls up
to `max_batch` records as views (zero copy), handles them, releases them in one store, and gives the
token back. When no partition had work it calls `on_idle` (the batch tier closes windows there) and
parks on the queue's wait strategy (a publish to any partition wakes it). `stop()` lets it finish: it
exits once stop was asked and its queue is empty.

Completion: handle() stores (or dead-letters) every record before the batch is released, so a ring's
released count is a watermark of "stored" (payloads kept in the payload arena are given back in the
same step, just before the release: core/payloads.py); a batch holding an event whose ACK promises an fsync is
fsynced (group commit, `Sinks.sync`) before its release. After each release `Sinks.progress` (the
engine's `stored.advance`) wakes every follower of `stored`, so ACKs leave as soon as they are due,
never on a timer.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from eventstream.core.payloads import release_records
from eventstream.core.records import ACK_SYNCED, FLAG_ACK_MASK, FLAG_ACK_SHIFT, SMALL_BATCH
from eventstream.core.topics import TopicTable
from eventstream.engine import idempotency
from eventstream.engine.bus import Queue
from eventstream.engine.handlers import Handler, TopicFilter, noop
from eventstream.runtime import scheduling as sched
from eventstream.runtime.affinity import pin_current_thread

log = structlog.get_logger("eventstream.processor")


@dataclass
class Sinks:
    """Where processors put their results."""

    topics: TopicTable
    store: Callable[[np.ndarray], None]  # processed records -> events.bin
    # failed/dropped records -> dead-letter log, with one reason or a reason per record
    drop: Callable[[np.ndarray, str | list[str]], None]
    # (queue, records, handled_ns) -> counters, and latency = handled_ns - ingest_ts (handled_ns is
    # time.monotonic_ns() when the handler was done, before storage: the latency is ingest -> handled).
    # Called after the batch's release (off the ACK path) with a copy holding only `ingest_ts`.
    processed: Callable[[str, np.ndarray, int], None]
    dedup_hit: Callable[[int], None] = lambda n: None
    sync: Callable[[], None] | None = None  # fsync what is stored (group commit) before a release
    progress: Callable[[], None] | None = None  # a watermark moved: wake ACK senders
    # (ingest_ts of released records, ns they were taken, ns they were stored: one int for a batch, or
    # an array, one per record, for several batches at once) -> stage latencies; after the release,
    # off the ACK path
    stages: Callable[[np.ndarray, int | np.ndarray, int | np.ndarray], None] | None = None


def _int64s(parts: list) -> np.ndarray:
    """One int64 array of the values of `parts` (lists of ints or arrays), in order."""
    if len(parts) == 1:
        return np.asarray(parts[0], dtype=np.int64)
    if all(isinstance(p, list) for p in parts):
        return np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64)
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def _wants_sync(views) -> bool:
    if len(views) == 1 and len(views[0]) <= SMALL_BATCH:  # a few records: plain ints beat numpy temporaries
        return any(f & FLAG_ACK_MASK == _SYNCED_BITS for f in views[0]["flags"].tolist())
    return any(((v["flags"] & FLAG_ACK_MASK) == _SYNCED_BITS).any() for v in views)


_SYNCED_BITS = ACK_SYNCED << FLAG_ACK_SHIFT
BACKLOG_STEPS = 4  # batches (of up to max_batch records) a lane drains ahead of its caller's records
# a worker records the metrics of the batches it handled once this many records are pending, the
# first of them METRICS_AGE_NS ago, or when it finds no work (before it parks): one call per sink for
# many batches, off the ACK path (the control plane samples every backpressure.interval_ms)
METRICS_EVERY = 16384
METRICS_AGE_NS = 20_000_000
IDLE_WAIT_S = 0.1  # longest park of an idle processor between checks (publishes wake it at once)
_TS_DTYPE = np.dtype([("ingest_ts", "<u8")])
# the dedup keys of a batch, as skip_duplicates returns them and commit_ids takes them: (id, tag)
# pairs for a few records, else an idempotency.Probed
DedupKeys = list[tuple[int, int]] | idempotency.Probed


class Processor(threading.Thread):
    kind = "processor"
    # a lane (run_inline) that finds records queued in its partition handles them first instead of
    # queueing its caller's records behind them (the realtime tier: its events never wait for a thread)
    drains_backlog = False

    def __init__(
        self,
        queue: Queue,
        sinks: Sinks,
        handler: Handler | None,
        *,
        topics: list[str] | None = None,
        worker: int = 0,
        cpus=(),
        max_batch: int = 4096,
        poll_timeout: float = 0.002,
        dedups: list | None = None,
        scheduling: str = "normal",
    ):
        super().__init__(name=f"es-{self.kind}-{worker}", daemon=True)
        self.queue = queue
        self.sinks = sinks
        # the stock noop accepts everything: the same as no handler, without a call per batch
        self.handler = None if handler is noop else handler
        self.filter = TopicFilter(topics or ["*"], sinks.topics)
        self.worker = worker
        self.cpus = list(cpus)
        self.max_batch = max_batch
        self.poll_timeout = poll_timeout
        self.scheduling = sched.parse(scheduling)  # the OS policy the thread asks for (runtime/scheduling.py)
        # one Deduplicator per partition of this tier (engine/idempotency.py), or None: no dedup
        if dedups is not None and len(dedups) != queue.partitions:
            raise ValueError(
                f"one Deduplicator per partition is needed: got {len(dedups)} for {queue.partitions} partitions"
            )
        self.dedups = dedups
        # processed() calls, made after the release: (queue, ingest times as an int64 array or, for a
        # few records, a list of ints, handled ns)
        self._done: list[tuple[str, np.ndarray | list[int], int]] = []
        # stage latencies left by run_inline: (ingest times, an array or a few ints, taken ns, stored ns)
        self._stages: list[tuple[np.ndarray | list[int], int, int]] = []
        self._pending = 0  # records whose metrics are in _done and _stages (a worker records them in bulk)
        self._pending_since = 0  # monotonic ns when the first of them was taken
        self.handled = 0
        self.inline = 0  # of which handled by run_inline on a caller's thread
        self.inline_max = 0  # run_inline takes batches of at most this many records (0: any size)
        self.batches = 0
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()
        self._abandon = False

    def stop(self, drain: bool = True) -> None:
        """Finish: with `drain`, exit once the queue is empty; without, after the current batch."""
        if not drain:
            self._abandon = True
        self._stop_requested.set()
        wait = self.queue.wait
        if wait is not None and wait.signals:
            wait.signal()  # wake it if it is parked idle

    def run(self) -> None:
        pin_current_thread(self.cpus, self.name)
        sched.apply_current_thread(self.scheduling, self.name)
        parts = self.queue.partitions
        idle_sleep = 0.0
        try:
            while not self._abandon:
                worked = False
                for k in range(parts):
                    i = (self.worker + k) % parts
                    token = self.queue.tokens[i]
                    if not token.acquire(blocking=False):
                        continue
                    try:
                        worked |= self._drain_once(i)
                    finally:
                        token.release()
                if worked:
                    idle_sleep = 0.0
                    continue
                self.on_idle()
                self._flush_metrics()
                self._flush_inline_metrics()
                if self._stop_requested.is_set() and self.queue.depth == 0:
                    return
                # wait outside every token, so a caller-runs thread (run_inline) can take one meanwhile;
                # a publish to any partition (or stop()) signals the wait, the timeout is a safety net
                wait = self.queue.wait
                if wait is not None:
                    wait.wait_for(
                        lambda: self.queue.has_work() or self._stop_requested.is_set(),
                        IDLE_WAIT_S if wait.signals else 0.0,
                    )
                if not (wait is not None and wait.signals):
                    idle_sleep = min(0.002, idle_sleep * 2 or 0.00005)
                    time.sleep(idle_sleep)
        except BaseException as exc:
            self.error = exc
            log.exception("processor_failed", thread=self.name)
            raise
        finally:
            self._flush_metrics()
            self._flush_inline_metrics()
            self.on_exit()

    def _drain_once(self, partition: int, flush: bool = True) -> bool:
        """Handle one batch of what is queued in `partition` (token holder only). Its metrics are
        recorded once METRICS_EVERY records are pending, unless `flush` is False (a lane draining a
        backlog ahead of its caller's records: they are left for later)."""
        ring = self.queue.rings[partition]
        views = ring.poll(self.max_batch)
        if not views:
            return False
        taken_ns = time.monotonic_ns()
        n = 0
        for view in views:
            self.handle(view, partition)
            n += len(view)
        sinks = self.sinks
        if sinks.sync is not None and _wants_sync(views):
            sinks.sync()
        stages = sinks.stages
        if stages is not None:  # copied before the release: the views belong to the ring after it
            stored_ns = time.monotonic_ns()
            ingest = (
                views[0]["ingest_ts"].astype(np.int64)
                if len(views) == 1
                else np.concatenate([v["ingest_ts"] for v in views]).astype(np.int64)
            )
        for view in views:  # stored or dead-lettered: their payload arena slots go back first
            release_records(view)
        ring.release(n)
        if sinks.progress is not None:
            sinks.progress()
        if stages is not None:
            self._stages.append((ingest, taken_ns, stored_ns))
        if not self._pending:
            self._pending_since = taken_ns
        self._pending += n
        if flush and (self._pending >= METRICS_EVERY or taken_ns - self._pending_since >= METRICS_AGE_NS):
            self._flush_metrics()
        self.handled += n
        self.batches += 1
        return True

    def run_inline(self, records: np.ndarray, partition: int = 0) -> bool:
        """Caller runs: handle `records` on the calling thread (an ingest reader), when `partition`
        is idle: no worker inside it and nothing queued ahead of them (order is kept). The records are
        then handled and stored when this returns True; False: not now (the caller queues them).
        No thread handoff at all on the way to the handler and the ACK. The service gives each
        partition its own lane (a processor that is not started), so lanes of different partitions
        never share their pending metrics; everything here runs under the partition's token."""
        if self.inline_max and len(records) > self.inline_max:
            return False
        token = self.queue.tokens[partition]
        if not token.acquire(blocking=False):
            return False
        try:
            ran = self._run_inline_locked(records, partition)
        finally:
            token.release()
        if ran and self.sinks.progress is not None:  # followers of `stored` (tails, flows); the caller ACKs itself
            self.sinks.progress()
        return ran

    def _run_inline_locked(self, records: np.ndarray, partition: int) -> bool:
        """run_inline's work, under the partition's token."""
        if not self.queue.rings[partition].drained() and not (self.drains_backlog and self._drain_backlog(partition)):
            return False
        sinks = self.sinks
        taken_ns = time.monotonic_ns()
        if not self.handle_inline(records, partition):
            return False
        release_records(records)  # stored or dead-lettered: payload arena slots back
        if sinks.sync is not None and _wants_sync((records,)):
            sinks.sync()
        if sinks.stages is not None:  # recorded later, off the caller's way to its ACK
            ingest = records["ingest_ts"]
            self._stages.append(
                (
                    ingest.tolist() if len(ingest) <= SMALL_BATCH else ingest.astype(np.int64),
                    taken_ns,
                    time.monotonic_ns(),
                )
            )
        if len(self._done) > 256:
            self._flush_metrics()
        self.handled += len(records)
        self.inline += len(records)
        self.batches += 1
        return True

    def _drain_backlog(self, partition: int) -> bool:
        """A lane finds records queued in its partition (under the partition's token): it handles them
        first, in order, on the calling thread, so that the caller's records need not queue behind
        them and wait for the tier's thread to be scheduled. True once the partition is drained; False
        when a producer is still copying into it (then the caller queues its records)"""
        ring = self.queue.rings[partition]
        for _ in range(BACKLOG_STEPS):
            if not self._drain_once(partition, flush=False):
                break
            if ring.drained():
                return True
        return ring.drained()

    def _flush_metrics(self) -> None:
        """Record deferred metrics (a lane's: token holder only): everything pending in one call per
        sink (a lane leaves one entry per batch it ran, up to 257 between flushes, a worker up to
        METRICS_EVERY records' worth; a call per batch each would cost more than the batch's dedup)."""
        self._pending = 0
        if self._done or self._stages:
            self._record(self._done, self._stages)
            self._done, self._stages = [], []

    def _record(self, done: list, pending: list) -> None:
        """Record pending stage latencies (`pending`, as run_inline leaves them) and processed()
        calls (`done`), each in one call per sink; the lists are not changed (the caller drops them)."""
        sinks = self.sinks
        if pending:
            stages = sinks.stages
            assert stages is not None  # run_inline leaves stage latencies only for it
            if len(pending) == 1:
                ingest, taken_ns, stored_ns = pending[0]
                stages(_int64s([ingest]), taken_ns, stored_ns)
            else:
                counts = [len(e[0]) for e in pending]
                taken = np.repeat(np.array([e[1] for e in pending], dtype=np.int64), counts)
                stored = np.repeat(np.array([e[2] for e in pending], dtype=np.int64), counts)
                stages(_int64s([e[0] for e in pending]), taken, stored)
        if not done:
            return
        queue0 = done[0][0]
        if len(done) > 1 and all(q == queue0 for q, _, _ in done):
            # one call: each batch's ingest times moved by (last handled - its handled), so that the
            # last handled time gives every record its own latency
            last = max(h for _, _, h in done)
            counts = [len(ts) for _, ts, _ in done]
            shift = np.repeat(np.array([last - h for _, _, h in done], dtype=np.int64), counts)
            merged = [(queue0, _int64s([ts for _, ts, _ in done]) + shift, last)]
        else:
            merged = [(q, _int64s([ts]), h) for q, ts, h in done]
        for queue, ingest, handled_ns in merged:
            rows = np.empty(len(ingest), dtype=_TS_DTYPE)
            rows["ingest_ts"] = ingest
            sinks.processed(queue, rows, handled_ns)

    def _flush_inline_metrics(self) -> None:
        """Idle: record what the lanes (run_inline) left for later, when no caller holds a partition.
        The partition's token is held only to take the lane's pending lists, never while recording
        them: a caller that finds the token taken queues its records (and waits for this thread)."""
        queue = self.queue
        for i, lane in enumerate(queue.lanes):
            if lane is None or not (lane._done or lane._stages):
                continue
            token = queue.tokens[i]
            if not token.acquire(blocking=False):
                continue
            try:
                done, stages = lane._done, lane._stages
                lane._done, lane._stages = [], []
            finally:
                token.release()
            self._record(done, stages)

    def processed(self, queue: str, records: np.ndarray, handled_ns: int) -> None:
        """Count handled records; the metrics are recorded after the batch's release (their ingest
        times copied now: the records belong to the ring after it)."""
        ingest = records["ingest_ts"]  # a few: plain ints now, the array at the flush (off the ACK path)
        self._done.append(
            (queue, ingest.tolist() if len(ingest) <= SMALL_BATCH else ingest.astype(np.int64), handled_ns)
        )

    # -- idempotency
    def skip_duplicates(
        self, records: np.ndarray, partition: int, count: bool = True
    ) -> tuple[np.ndarray, DedupKeys | None]:
        """Drop records already stored (same topic and event id, within the window) and repeats inside
        the batch, counting them (unless `count` is False: the caller counts once it is sure it will
        not hand the batch back); returns (records to handle, their dedup keys or None)."""
        if self.dedups is None:
            return records, None
        if len(records) <= SMALL_BATCH:  # keys as plain (id, tag) ints (see commit_ids)
            pairs, few = idempotency.duplicates_few(records, self.dedups[partition])
            if True in few:
                kept = [i for i, s in enumerate(few) if not s]
                if count:
                    self.sinks.dedup_hit(len(few) - len(kept))
                return records[kept], [pairs[i] for i in kept]
            return records, pairs
        probed, skip = idempotency.duplicates(records, self.dedups[partition])
        if skip.any():
            if count:
                self.sinks.dedup_hit(int(skip.sum()))
            keep = ~skip
            return records[keep], probed.select(keep)
        return records, probed

    def commit_ids(self, keys: DedupKeys | None, partition: int, ok: np.ndarray | None = None) -> None:
        """Remember the keys of stored records (after the store: a failed store is retried by a resend).
        `keys` as skip_duplicates returned them: a list of (id, tag) pairs for a few records, else an
        idempotency.Probed."""
        if keys is None:
            return
        assert self.dedups is not None  # keys come from skip_duplicates, which has them
        if isinstance(keys, list):
            if ok is not None:
                keys = [k for k, good in zip(keys, ok.tolist(), strict=True) if good]
            if keys:
                self.dedups[partition].commit_few(keys)
            return
        if ok is not None:
            keys = keys.select(ok)
        if len(keys):
            keys.commit(self.dedups[partition])

    # -- hooks
    def handle(self, records: np.ndarray, partition: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def handle_inline(self, records: np.ndarray, partition: int) -> bool:
        """handle() on a caller's thread; False: nothing was stored, the caller queues the records."""
        self.handle(records, partition)
        return True

    def on_idle(self) -> None:
        pass

    def on_exit(self) -> None:
        pass


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
