"""The NATS JetStream connector's sink side: stored events published to the stream (jetstream.py
says how the connector runs; a mixin of NatsConnector, running on its asyncio thread)."""

from __future__ import annotations

import asyncio

import numpy as np
import structlog

from eventstream.connectors.headers import H_MSG_ID, H_PRIORITY, H_PRODUCER_TS
from eventstream.config.subjects import topic_subject
from eventstream.core.payloads import payload_list

log = structlog.get_logger("eventstream.connectors.nats")


class SinkSide:
    """Publishing: batches forwarded by the store sink go out one message per event."""

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
                    ack = await self.js.publish(subject, payload, timeout=sink.ack_timeout_s, stream=self.cfg.stream,
                                                headers=dict(headers))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - timeout, no responders, disconnected: retry
                    last = f"{type(exc).__name__}: {exc}"[:200]
                    if attempt + 1 < sink.max_attempts:
                        self.stats["retries"] += 1
                        await asyncio.sleep(min(1.0, 0.05 * (2 ** attempt)))
                    continue
                self.stats["published"] += 1
                if ack.duplicate:
                    self.stats["duplicates"] += 1
                return
            self.stats["publish_failed"] += 1
            self.engine.drop(batch[i:i + 1], f"connector: publish to JetStream failed after {sink.max_attempts} "
                                          f"attempts (connectors.nats.sink.max_attempts): {last}", [payload])
        except asyncio.CancelledError:
            self.stats["publish_failed"] += 1
            self.engine.drop(batch[i:i + 1], "connector: shutdown: not acked by JetStream before the stop timeout",
                          [payload])
            raise
        finally:
            self._sink_sem.release()
