"""The NATS JetStream connector's sink: stored events published to the stream (jetstream.py says how
the connector runs). `forward` runs on engine threads (one of `Engine.forwarders`); the rest on the
connector's asyncio thread."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import numpy as np
import structlog

from eventstream.config.subjects import glob_matches, topic_subject
from eventstream.connectors.headers import H_MSG_ID, H_PRIORITY, H_PRODUCER_TS, NATS_CONN_ID
from eventstream.core.payloads import has_ext, payload_list

log = structlog.get_logger("eventstream.connectors.nats")


class NatsSink:
    """Publishing: batches the engine stored go out one message per event (at most
    `sink.max_in_flight` publishes wait for their JetStream ack)."""

    def __init__(self, conn):
        """`conn`: the NatsConnector (its JetStream context `js`, event loop, stats, run id)."""
        self.conn = conn
        self.cfg = conn.cfg
        self.engine = conn.engine
        self.topics = conn.topics
        self.prefix = conn.prefix
        self.run_id = conn.run_id
        self.stats = conn.stats
        # the deque is shared with engine threads; the counters under _q_lock
        self._q: collections.deque = collections.deque()
        self._q_lock = threading.Lock()
        self._q_events = 0
        self._sink_waiting = False
        self._sink_closing = False
        self._allow = np.zeros(1, dtype=bool)  # topic id -> forwarded (sink.topics); ids < len are decided
        self._allow_lock = threading.Lock()
        self._subjects: dict[int, tuple[str | None, str | None]] = {}
        self._names: dict[int, str] = {}
        self._tasks: set = set()
        self._sink_event: asyncio.Event  # start() makes both, on the connector's loop; used only after
        self._sink_sem: asyncio.Semaphore
        self.task: asyncio.Task | None = None

    # ------------------------------------------------------------------ engine threads
    def _grow_allow(self) -> np.ndarray:
        with self._allow_lock:
            n = len(self.topics) + 1
            old = self._allow
            if len(old) >= n:
                return old
            table = np.zeros(n, dtype=bool)
            table[: len(old)] = old
            globs = self.cfg.sink.topics
            for tid in range(max(len(old), 1), n):
                name = self.topics.name(tid)
                table[tid] = any(glob_matches(g, name) for g in globs)
            self._allow = table
            return table

    def forward(self, records: np.ndarray) -> None:
        """Queue the forwarded part of a stored batch for the sink (never waits)."""
        if len(records) == 0:
            return
        tids = records["topic_id"]
        table = self._allow
        if int(tids.max()) >= len(table):  # a topic not decided yet (one lock per new topic set)
            table = self._grow_allow()
        mask = table[tids] & (records["conn_id"] != NATS_CONN_ID)
        if mask.all():
            batch = records.copy()
        elif mask.any():
            batch = records[mask]  # fancy indexing copies
        else:
            return
        n = len(batch)
        # payloads in the payload arena are copied out now: their slots go back when the engine
        # releases the records, before the sink publishes them
        pays = payload_list(batch) if has_ext(batch) else None
        wake = over = False
        with self._q_lock:
            if self._sink_closing or self._q_events + n > self.cfg.sink.max_pending:
                over = True
            else:
                self._q.append((batch, pays))
                self._q_events += n
                wake, self._sink_waiting = self._sink_waiting, False
        if over:
            self.stats["backlog_full"] += n
            self.engine.drop(
                batch,
                "connector: sink backlog full (connectors.nats.sink.max_pending="
                f"{self.cfg.sink.max_pending}); stored here, not published to JetStream",
                pays,
            )
        elif wake:
            assert self.conn._loop is not None  # the sink loop waits: the connector thread and its loop run
            self.conn._loop.call_soon_threadsafe(self._sink_event.set)

    # ------------------------------------------------------------------ the connector thread
    def start(self) -> None:
        """On the connector's loop, once JetStream is set up."""
        self._sink_event = asyncio.Event()
        self._sink_sem = asyncio.Semaphore(self.cfg.sink.max_in_flight)
        self.task = asyncio.get_running_loop().create_task(self._sink_loop())

    def _take(self):
        with self._q_lock:
            if self._q:
                item = self._q.popleft()
                self._q_events -= len(item[0])
                return item
            self._sink_event.clear()
            self._sink_waiting = True
            return None

    async def _sink_loop(self) -> None:
        while True:
            item = self._take()
            if item is None:
                if self._sink_closing:
                    return
                await self._sink_event.wait()
                continue
            batch, pays = item
            try:
                await self._publish_batch(batch, pays)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - never lose the loop; the batch goes to the DLQ
                log.exception("nats_sink_batch_failed")
                self.engine.drop(batch, "connector: sink failed on this batch (see the log)", pays)

    def _topic_name(self, tid: int) -> str:
        name = self._names.get(tid)
        if name is None:
            name = self._names[tid] = self.topics.name(tid)
        return name

    def _subject(self, tid: int) -> tuple[str | None, str | None]:
        got = self._subjects.get(tid)
        if got is None:
            got = self._subjects[tid] = topic_subject(self.prefix, self.topics.name(tid))
        return got

    async def _publish_batch(self, batch: np.ndarray, pays: list | None = None) -> None:
        self.stats["forwarded"] += len(batch)
        tids = batch["topic_id"].tolist()
        ids = batch["event_id"].tolist()
        seqs = batch["seq"].tolist()
        prios = batch["priority"].tolist()
        pts = batch["producer_ts"].tolist()
        if pays is None:
            pays = payload_list(batch)
        refused: list[int] = []
        reasons: list[str] = []
        loop = asyncio.get_running_loop()
        for i in range(len(batch)):
            subject, reason = self._subject(tids[i])
            if subject is None:
                assert reason is not None  # topic_subject gives one or the other
                refused.append(i)
                reasons.append(reason)
                continue
            # (topic, id) as the engine deduplicates: one stream dedups ids across all its subjects
            msg_id = f"{self._topic_name(tids[i])}:{ids[i]}" if ids[i] else f"{self.run_id}-{seqs[i]}"
            headers = {H_MSG_ID: msg_id, H_PRIORITY: str(prios[i]), H_PRODUCER_TS: str(pts[i])}
            await self._sink_sem.acquire()
            task = loop.create_task(self._publish_one(subject, pays[i], headers, batch, i))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if refused:
            self.stats["refused_topic"] += len(refused)
            self.engine.drop(batch[np.array(refused, dtype=np.intp)], reasons, [pays[j] for j in refused])

    async def _publish_one(self, subject: str, payload: bytes, headers: dict, batch: np.ndarray, i: int) -> None:
        sink = self.cfg.sink
        last = "?"
        try:
            for attempt in range(sink.max_attempts):
                try:
                    ack = await self.conn.js.publish(
                        subject, payload, timeout=sink.ack_timeout_s, stream=self.cfg.stream, headers=dict(headers)
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - timeout, no responders, disconnected: retry
                    last = f"{type(exc).__name__}: {exc}"[:200]
                    if attempt + 1 < sink.max_attempts:
                        self.stats["retries"] += 1
                        await asyncio.sleep(min(1.0, 0.05 * (2**attempt)))
                    continue
                self.stats["published"] += 1
                if ack.duplicate:
                    self.stats["duplicates"] += 1
                return
            self.stats["publish_failed"] += 1
            self.engine.drop(
                batch[i : i + 1],
                f"connector: publish to JetStream failed after {sink.max_attempts} "
                f"attempts (connectors.nats.sink.max_attempts): {last}",
                [payload],
            )
        except asyncio.CancelledError:
            self.stats["publish_failed"] += 1
            self.engine.drop(
                batch[i : i + 1], "connector: shutdown: not acked by JetStream before the stop timeout", [payload]
            )
            raise
        finally:
            self._sink_sem.release()

    async def close(self, deadline: float) -> None:
        """Publish what is queued until `deadline` (monotonic), then dead-letter the rest."""
        if self.task is None:  # never started (the connector's setup failed)
            return
        with self._q_lock:
            self._sink_closing = True
        self._sink_event.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            self.task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(0.1, deadline - time.monotonic()))
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        with self._q_lock:
            left = list(self._q)
            self._q.clear()
            self._q_events = 0
        for batch, pays in left:
            self.engine.drop(batch, "connector: shutdown: not published to JetStream before the stop timeout", pays)
