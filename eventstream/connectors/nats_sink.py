"""The NATS JetStream connector's sink: stored events published to the stream (jetstream.py says how
the connector runs). It follows `stored` like a subscriber: it reads events.bin from where the log
ended when the connector was built (storage/tail.py), woken by the engine's `stored` barrier; nothing
is copied for it on the engine's threads. Everything but the wake-up runs on the connector's asyncio
thread."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import structlog

from eventstream.config.subjects import glob_matches, topic_subject
from eventstream.connectors.headers import H_MSG_ID, H_PRIORITY, H_PRODUCER_TS, NATS_CONN_ID
from eventstream.storage.tail import ORIGIN_DTYPE, LogTail, SegmentIndex, TailBatch

log = structlog.get_logger("eventstream.connectors.nats")

WAKE_SLICE_S = 0.5  # a wait for `stored` is re-checked this often (a safety net: no wake-up is lost)


class NatsSink:
    """Publishing: events the engine stored go out one message per event (at most
    `sink.max_in_flight` publishes wait for their JetStream ack)."""

    def __init__(self, conn):
        """`conn`: the NatsConnector (its JetStream context `js`, event loop, stats, run id). Built
        after the engine opened its log and before it stores anything: the sink starts at the log's
        end, so it publishes what is stored from now on."""
        self.conn = conn
        self.cfg = conn.cfg
        self.engine = conn.engine
        self.topics = conn.topics
        self.prefix = conn.prefix
        self.run_id = conn.run_id
        self.stats = conn.stats
        engine = self.engine
        log_path = engine.data / engine.cfg.storage.events_file
        state = engine.data / "nats"
        state.mkdir(parents=True, exist_ok=True)
        index = SegmentIndex(log_path, state / "segments.json", engine.dtype)
        self.tail = LogTail(log_path, engine.dtype, index, rows=ORIGIN_DTYPE)  # rows with seq and conn_id
        self.tail.seek_end()
        self._allow: dict[str, bool] = {}  # topic name -> forwarded (sink.topics)
        self._subjects: dict[str, tuple[str | None, str | None]] = {}
        self._tasks: set = set()
        self._rest: TailBatch | None = None  # read, over sink.max_pending: published next
        self._waiting = False  # the sink loop waits for `stored` (read by engine threads)
        self._closing = False
        self._sink_event: asyncio.Event  # start() makes both, on the connector's loop; used only after
        self._sink_sem: asyncio.Semaphore
        self.task: asyncio.Task | None = None
        engine.stored.follow(self.progress, self)

    # ------------------------------------------------------------------ engine threads
    def progress(self) -> None:
        """Something was stored: wake the sink loop if it waits (one attribute read otherwise)."""
        if self._waiting:
            self._waiting = False
            loop = self.conn._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._sink_event.set)

    # ------------------------------------------------------------------ the connector thread
    def start(self) -> None:
        """On the connector's loop, once JetStream is set up."""
        self._sink_event = asyncio.Event()
        self._sink_sem = asyncio.Semaphore(self.cfg.sink.max_in_flight)
        self.task = asyncio.get_running_loop().create_task(self._sink_loop())

    def _read(self) -> TailBatch | None:
        """The next stored events to publish (at most sink.max_pending), or None at the log's end."""
        batch, self._rest = self._rest, None
        if batch is None:
            self._sink_event.clear()
            self._waiting = True  # before reading: a store after this point wakes the loop
            batch = self.tail.read_batch()
            if batch is None:
                return None
            self._waiting = False
        limit = self.cfg.sink.max_pending
        if len(batch) > limit:
            batch, self._rest = batch[:limit], batch[limit:]
        return batch

    def _forwarded(self, batch: TailBatch) -> tuple[np.ndarray, list[str]]:
        """The rows to publish (topics matching sink.topics, not from the NATS source) and their topic
        names; the topic rule is decided once per distinct topic."""
        rows = batch.rows
        ids, inverse = np.unique(rows["topic"], return_inverse=True)
        names = [batch.topics.get(t, f"#{t}") for t in ids.tolist()]
        allow, globs = self._allow, self.cfg.sink.topics
        ok = []
        for name in names:
            hit = allow.get(name)
            if hit is None:
                hit = allow[name] = any(glob_matches(g, name) for g in globs)
            ok.append(hit)
        inverse = inverse.ravel()
        keep = np.array(ok, dtype=bool)[inverse] & (rows["conn_id"] != NATS_CONN_ID)  # the source's: not sent back
        picked = inverse[keep]
        return rows[keep], [names[k] for k in picked.tolist()]

    async def _sink_loop(self) -> None:
        while True:
            batch = self._read()
            if batch is None:
                if self._closing:
                    return
                try:
                    await asyncio.wait_for(self._sink_event.wait(), WAKE_SLICE_S)
                except TimeoutError:
                    pass
                continue
            rows, names = self._forwarded(batch)
            if not len(rows):
                continue
            pays = _payloads(batch.data, rows)
            try:
                await self._publish_batch(rows, names, pays)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - never lose the loop; the batch goes to the DLQ
                log.exception("nats_sink_batch_failed")
                self._drop(rows, names, pays, "connector: sink failed on this batch (see the log)")

    def _drop(self, rows: np.ndarray, names: list[str], pays: list[bytes], reason) -> None:
        """Dead-letter stored events the sink could not publish (as records of the engine's dtype)."""
        recs = np.zeros(len(rows), dtype=self.engine.dtype)
        for f in ("event_id", "producer_ts", "seq", "priority", "conn_id", "payload_len"):
            recs[f] = rows[f]
        recs["topic_id"] = [self.topics.intern(n) for n in names]
        self.engine.drop(recs, reason, pays)

    def _subject(self, name: str) -> tuple[str | None, str | None]:
        got = self._subjects.get(name)
        if got is None:
            got = self._subjects[name] = topic_subject(self.prefix, name)
        return got

    async def _publish_batch(self, rows: np.ndarray, names: list[str], pays: list[bytes]) -> None:
        self.stats["forwarded"] += len(rows)
        ids = rows["event_id"].tolist()
        seqs = rows["seq"].tolist()
        prios = rows["priority"].tolist()
        pts = rows["producer_ts"].tolist()
        refused: list[int] = []
        reasons: list[str] = []
        loop = asyncio.get_running_loop()
        for i in range(len(rows)):
            subject, reason = self._subject(names[i])
            if subject is None:
                assert reason is not None  # topic_subject gives one or the other
                refused.append(i)
                reasons.append(reason)
                continue
            # (topic, id) as the engine deduplicates: one stream dedups ids across all its subjects
            msg_id = f"{names[i]}:{ids[i]}" if ids[i] else f"{self.run_id}-{seqs[i]}"
            headers = {H_MSG_ID: msg_id, H_PRIORITY: str(prios[i]), H_PRODUCER_TS: str(pts[i])}
            await self._sink_sem.acquire()
            task = loop.create_task(self._publish_one(subject, pays[i], headers, rows[i : i + 1], names[i]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if refused:
            self.stats["refused_topic"] += len(refused)
            self._drop(
                rows[np.array(refused, dtype=np.intp)], [names[j] for j in refused], [pays[j] for j in refused], reasons
            )

    async def _publish_one(self, subject: str, payload: bytes, headers: dict, row: np.ndarray, name: str) -> None:
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
            self._drop(
                row,
                [name],
                [payload],
                f"connector: publish to JetStream failed after {sink.max_attempts} "
                f"attempts (connectors.nats.sink.max_attempts): {last}",
            )
        except asyncio.CancelledError:
            self.stats["publish_failed"] += 1
            self._drop(row, [name], [payload], "connector: shutdown: not acked by JetStream before the stop timeout")
            raise
        finally:
            self._sink_sem.release()

    async def close(self, deadline: float) -> None:
        """After the processors drained: publish the rest of the log until `deadline` (monotonic),
        then dead-letter what is left."""
        self.engine.stored.unfollow(self)
        if self.task is None:  # never started (the connector's setup failed)
            self.tail.close()
            return
        self._closing = True
        self._sink_event.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - cancelled here, on purpose
                pass
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(0.1, deadline - time.monotonic()))
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        while True:  # not read before the deadline: dead-lettered, never silently away
            batch = self._rest or self.tail.read_batch()
            self._rest = None
            if batch is None:
                break
            rows, names = self._forwarded(batch)
            if len(rows):
                pays = _payloads(batch.data, rows)
                self._drop(rows, names, pays, "connector: shutdown: not published to JetStream before the stop timeout")
        self.tail.close()


def _payloads(data: bytes, rows: np.ndarray) -> list[bytes]:
    """Each row's payload (bytes: kept by the publishes after the read buffer is gone)."""
    mv = memoryview(data)
    return [bytes(mv[p : p + n]) for p, n in zip(rows["pos"].tolist(), rows["payload_len"].tolist(), strict=True)]
