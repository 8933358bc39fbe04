"""The NATS JetStream connector's source: a durable pull consumer taken into the engine like another
ingest (through `engine.offer`), each message acked once its event is stored (it follows
`engine.stored`). Runs on the connector's asyncio thread (jetstream.py), except `progress`."""

from __future__ import annotations

import asyncio
import collections
import time

import numpy as np
import structlog

from eventstream.config.subjects import glob_filter, subject_topic
from eventstream.connectors.headers import (
    H_MSG_ID,
    H_PRIORITY,
    H_PRODUCER_TS,
    NATS_CONN_ID,
    hashed_id,
    numeric_id,
    parse_priority,
)
from eventstream.core.records import PRIORITY_NAMES
from eventstream.core.topics import MAX_TOPIC_BYTES

log = structlog.get_logger("eventstream.connectors.nats")

FETCH_TIMEOUT_S = 0.5  # a fetch that finds nothing returns after this (bounds how long stop waits)
HELD_RETRY_S = 0.001  # how often records the full queues (or a full payload arena) held back are offered again


class NatsSource:
    """Consuming: fetch, decode, offer to the engine, ack what is stored."""

    def __init__(self, conn):
        """`conn`: the NatsConnector (its nats module, JetStream context, event loop, stats)."""
        self.conn = conn
        self.cfg = conn.cfg
        self.engine = conn.engine
        self.topics = conn.topics
        self.dtype = conn.dtype
        self.capacity = conn.capacity
        self.prefix = conn.prefix
        self.stats = conn.stats
        self._default_priority = PRIORITY_NAMES.index(self.cfg.source.default_priority)
        # connector thread only, except the two flags read by progress()
        self._inflight: collections.deque = collections.deque()  # [marks, msgs, last in_progress]
        self._want_progress = False
        self._nudged = False
        self._intake_stopped = False
        self._ack_stop = False
        self._progress_event: asyncio.Event  # start() makes it, on the connector's loop; used only after
        self._source_task: asyncio.Task | None = None
        self._ack_task: asyncio.Task | None = None
        self._psub = None

    # ------------------------------------------------------------------ engine threads
    def progress(self) -> None:
        """A processor released a batch: wake the source if it waits for completion marks."""
        if self._want_progress and not self._nudged:
            self._nudged = True
            loop = self.conn._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._progress_event.set)

    # ------------------------------------------------------------------ the connector thread
    async def start(self) -> None:
        """On the connector's loop, once JetStream is set up: bind the durable consumer, start the loops."""
        self._progress_event = asyncio.Event()
        api = self.conn._nats.js.api
        src, cfg = self.cfg.source, self.cfg
        filters = [glob_filter(self.prefix, g) for g in src.subjects]
        ccfg = api.ConsumerConfig(
            durable_name=src.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=src.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=src.max_ack_pending,
        )
        if len(filters) > 1:
            ccfg.filter_subjects = filters
        self._psub = await self.conn.js.pull_subscribe(filters[0], durable=src.durable, stream=cfg.stream, config=ccfg)
        loop = asyncio.get_running_loop()
        self._source_task = loop.create_task(self._source_loop())
        self._ack_task = loop.create_task(self._ack_loop())

    def _decode(self, msg) -> tuple | str:
        """(event_id, topic_id, priority, producer_ts, payload) of `msg`, or a DLQ reason (str), or
        (reason, event_id, topic_id, priority, payload) when it decoded but must not go in (poison)."""
        topic = subject_topic(self.prefix, msg.subject)
        if topic is None:
            return f"connector: subject {msg.subject[:80]!r} is not under {self.prefix}.>"
        tb = topic.encode("utf-8")
        if len(tb) > MAX_TOPIC_BYTES:
            return f"connector: topic of {len(tb)} bytes is longer than {MAX_TOPIC_BYTES}"
        hdrs = msg.headers or {}
        mid = hdrs.get(H_MSG_ID)
        eid = numeric_id(mid, topic)
        if not eid:
            eid = hashed_id(mid or f"{self.cfg.stream}:{msg.metadata.sequence.stream}")
        prio = hdrs.get(H_PRIORITY)
        if prio is None:
            p = self._default_priority
        else:
            p = parse_priority(prio)
            if p is None:
                return f"connector: header {H_PRIORITY} {prio[:20]!r} is not a priority (0..4 or a name)"
        pts = hdrs.get(H_PRODUCER_TS, "")
        pts = int(pts) if pts.isdigit() and int(pts) < (1 << 64) else 0
        data = msg.data
        arena = self.engine.payloads
        biggest = self.capacity if arena is None else max(self.capacity, arena.max_payload)
        if len(data) > biggest:
            return (
                f"connector: payload of {len(data)} bytes exceeds the largest payload the engine takes "
                f"({biggest} bytes: from server.tcp.max_frame_bytes and server.udp.max_datagram_bytes)"
            )
        tid = self.topics.intern(tb)
        delivered = msg.metadata.num_delivered
        if delivered > self.cfg.source.max_deliver:
            return (
                f"connector: delivered {delivered} times, more than connectors.nats.source.max_deliver "
                f"({self.cfg.source.max_deliver})",
                eid,
                tid,
                p,
                pts,
                data,
            )
        return eid, tid, p, pts, data

    async def _poison(self, msg, reason: str, fields: tuple | None) -> None:
        self.stats["poison"] += 1
        if fields is not None:  # decoded: the DLQ line carries the payload (whole, whatever its size)
            rec = self._records([fields])
            self.engine.drop(rec, reason, [fields[-1]])
        else:
            eid = numeric_id((msg.headers or {}).get(H_MSG_ID), subject_topic(self.prefix, msg.subject))
            self.engine.dlq.write_line(eid, msg.subject, 0, reason)
            self.engine.metrics.dropped("connector", 1)
        try:
            await msg.term()
        except Exception as exc:  # noqa: BLE001 - redelivered later, dead-lettered again
            log.warning("nats_term_failed", error=repr(exc))

    def _records(self, rows: list[tuple]) -> np.ndarray:
        """A record batch from decoded (event_id, topic_id, priority, producer_ts, payload) rows: one
        numpy assignment per column (payloads padded into one buffer)."""
        n = len(rows)
        recs = np.zeros(n, dtype=self.dtype)
        eids, tids, prios, ptss, datas = zip(*rows, strict=True)
        recs["event_id"] = eids
        recs["topic_id"] = tids
        recs["priority"] = prios
        recs["producer_ts"] = ptss
        recs["payload_len"] = [len(d) for d in datas]
        cap = self.capacity
        if cap:  # payloads over the inline capacity go to the payload arena (_claim_large), not here
            buf = b"".join(d.ljust(cap, b"\0") if len(d) <= cap else bytes(cap) for d in datas)
            recs["payload"] = np.frombuffer(buf, dtype=np.uint8).reshape(n, cap)
        recs["conn_id"] = NATS_CONN_ID
        recs["ingest_ts"] = time.monotonic_ns()
        return recs

    async def _source_loop(self) -> None:
        nats = self.conn._nats
        src = self.cfg.source
        max_batches = max(2, src.max_ack_pending // src.batch)
        while not self._intake_stopped:
            if len(self._inflight) >= max_batches:
                self._want_progress = True
                await self._wait_progress(0.01)
                continue
            try:
                msgs = await self._psub.fetch(src.batch, timeout=FETCH_TIMEOUT_S)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - disconnected, server restarting: try again
                log.warning("nats_fetch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
                continue
            if msgs:
                try:
                    await self._take_in(msgs)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - never lose the source; unacked messages are redelivered
                    self.stats["source_errors"] += 1
                    log.exception("nats_source_batch_failed")
                    await asyncio.sleep(0.2)

    async def _take_in(self, msgs) -> None:
        rows, keep = [], []
        for msg in msgs:
            try:
                got = self._decode(msg)
            except Exception as exc:  # noqa: BLE001 - whatever it is, it is undecodable
                got = f"connector: undecodable message: {type(exc).__name__}: {exc}"[:300]
            if isinstance(got, str):
                await self._poison(msg, got, None)
            elif isinstance(got[0], str):
                await self._poison(msg, got[0], got[1:])
            else:
                rows.append(got)
                keep.append(msg)
        n = len(keep)
        if n == 0:
            return
        recs = self._records(rows)
        datas = [r[-1] for r in rows]
        marks: list = []
        start = 0
        while start < n:  # in pieces when the payload arena has room for only some large payloads
            end = await self._claim_large(recs, datas, keep, start)
            if end < 0:
                break  # stopping while the arena was full: the rest is not acked, JetStream redelivers it
            marks.extend(await self._offer_all(recs[start:end], keep))
            start = end
        if start == 0:
            return
        self.stats["consumed"] += start
        self._inflight.append([marks, keep[:start], time.monotonic()])
        self._want_progress = True
        self._progress_event.set()

    async def _pause_in_progress(self, msgs: list, touched: float) -> float:
        """Wait HELD_RETRY_S before offering again; every ack_wait/2 (since `touched`) mark `msgs` in
        progress so JetStream does not redeliver what this engine still works on. Returns the new
        `touched`."""
        await asyncio.sleep(HELD_RETRY_S)
        now = time.monotonic()
        if now - touched <= self.cfg.source.ack_wait_s / 2:
            return touched
        for msg in msgs:
            try:
                await msg.in_progress()
            except Exception:  # noqa: BLE001 - then it is redelivered: at-least-once
                pass
        return now

    async def _offer_all(self, recs: np.ndarray, msgs: list) -> list:
        """Offer `recs` until every one is placed (the queues hold some back: offer again, never nak);
        returns their completion marks."""
        offer = self.engine.offer  # admission behind it: held below the level admitted, like TCP
        off = offer(recs)
        marks = list(off.marks)
        self._refused(recs, None, off.refused)
        held = off.held
        if held is not None:  # full queues, or not admitted at this level (engine.offer): held, offered again
            self.stats["holds"] += 1
        touched = time.monotonic()
        while held is not None:
            touched = await self._pause_in_progress(msgs, touched)
            off = offer(recs[held], stamp=False)
            marks.extend(off.marks)
            self._refused(recs, held, off.refused)
            held = None if off.held is None else held[off.held]
        return marks

    async def _claim_large(self, recs: np.ndarray, datas: list, msgs: list, start: int) -> int:
        """Copy payloads over the inline capacity, from row `start` on, into the payload arena (as TCP
        ingest does), as many as it has room for now. Returns the end of the rows ready to offer (past
        `start`), or -1 if the intake stops while the arena has no room at all: the source waits for
        room meanwhile (it stops fetching, like a TCP connection that is pushed back), marking its
        messages in progress."""
        cap = self.capacity
        big = [i for i in range(start, len(datas)) if len(datas[i]) > cap]
        if not big:
            return len(datas)
        arena = self.engine.payloads
        sizes = [len(datas[i]) for i in big]
        touched = time.monotonic()
        while True:
            offs, cls = arena.claim(sizes)  # the longest prefix that fits now
            if len(offs):
                break
            self.stats["arena_waits"] += 1
            if self._intake_stopped:
                return -1
            touched = await self._pause_in_progress(msgs, touched)
        got = big[: len(offs)]
        idx = np.array(got, dtype=np.intp)
        recs["ext_off"][idx] = offs
        recs["ext_class"][idx] = cls
        recs["ext_arena"][idx] = arena.id
        dst = memoryview(arena.buf)
        for o, i in zip(offs.tolist(), got, strict=True):
            d = datas[i]
            dst[o : o + len(d)] = d
        dst.release()
        if len(offs) < len(big):
            self.stats["arena_waits"] += 1
            return big[len(offs)]  # up to the first payload that found no room
        return len(datas)

    def _refused(self, recs, held, refused) -> None:
        """Positions a DROP_NEW queue shed at the edge: dead-lettered (as for TCP), then acked."""
        for pos, reason in refused:
            idx = pos if held is None else held[pos]
            self.engine.drop(recs[idx], reason)

    async def _wait_progress(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._progress_event.wait(), timeout)
        except TimeoutError:
            pass
        self._progress_event.clear()
        self._nudged = False

    def _done_batches(self) -> list:
        done: list = []
        rest: collections.deque = collections.deque()
        for entry in self._inflight:
            if all(ring.completed() >= end for ring, end in entry[0]):
                done.append(entry[1])
            else:
                rest.append(entry)
        self._inflight = rest
        return done

    async def _ack_done(self) -> None:
        for msgs in self._done_batches():
            for msg in msgs:
                try:
                    await msg.ack()
                    self.stats["acked"] += 1
                except Exception as exc:  # noqa: BLE001 - redelivered after ack_wait: at-least-once
                    log.warning("nats_ack_failed", error=f"{type(exc).__name__}: {exc}")

    async def _keep_alive(self) -> None:
        """Messages placed in the queues but not stored yet (a slow handler, a deep queue) are marked
        in progress every ack_wait/2, so JetStream does not redeliver them while this engine works on
        them; only an engine that stops (or dies) lets them go after ack_wait."""
        half = self.cfg.source.ack_wait_s / 2
        now = time.monotonic()
        for entry in list(self._inflight):
            if now - entry[2] < half:
                continue
            entry[2] = now
            for msg in entry[1]:
                try:
                    await msg.in_progress()
                except Exception:  # noqa: BLE001 - then it is redelivered: at-least-once
                    pass

    async def _ack_loop(self) -> None:
        while not self._ack_stop:
            self._want_progress = bool(self._inflight)
            await self._ack_done()
            if self._inflight:
                await self._keep_alive()
            await self._wait_progress(0.005 if self._inflight else 0.05)

    async def _stop_source(self, timeout: float) -> None:
        self._intake_stopped = True
        task = self._source_task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(task, timeout)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("nats_source_stop_timeout", note="messages not placed are redelivered")
            except Exception:  # noqa: BLE001
                log.exception("nats_source_failed")

    async def close(self) -> None:
        """After the processors drained: ack what they stored (the rest JetStream redelivers)."""
        if self._ack_task is None:
            return
        self._ack_stop = True  # not cancelled: a batch half acked would be redelivered
        self._progress_event.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._ack_task), 10)
        except TimeoutError:
            self._ack_task.cancel()
        await self._ack_done()  # the processors drained: what they stored is acked now
        if self._inflight:
            log.warning("nats_not_acked", batches=len(self._inflight), note="JetStream redelivers them")
