"""NATS JetStream connector: a sink (processed events -> a stream) and a source (a durable pull
consumer -> the engine, as another ingest).

Modules: this one connects, runs and stops the connector; nats_sink.py publishes, nats_source.py
consumes (NatsSink and NatsSource, each owning its state; NatsConnector composes them and owns the
connection); headers.py maps headers to event ids and priorities.

Threads. nats-py is asyncio; it runs in one dedicated thread (`es-nats`) with its own event loop.
Engine threads never await and never wait for it:

- sink: it follows the engine's `stored` barrier like a subscriber: it reads events.bin from where
  the log ended when the connector was built (storage/tail.py's LogTail, its segment index in
  <data_dir>/nats/), at most `sink.max_pending` events a step; a release wakes it (one attribute
  read on the processor thread, `call_soon_threadsafe` only when the connector thread sleeps).
  Nothing is copied or queued for it on the engine's threads, so a NATS outage never blocks or grows
  the engine: the sink lags behind in the log and catches up.
- source: the connector thread decodes fetched messages into a record batch and calls
  `engine.offer()` (which never waits, and holds what the control plane does not admit, as for TCP);
  what is held back is offered again every millisecond (never nak'ed). A message is acked only once
  its records are stored (every completion mark `ring.completed() >= end`); `progress()` follows the
  engine's `stored` barrier and wakes the connector thread when it waits for marks (the same
  watermark scheme as TCP ACKs).

Sink messages: subject `<subject_prefix>.<topic>`, payload = event payload, headers `Nats-Msg-Id`
(= `<topic>:<event id>`, or `<engine-run>-<seq>` for events without an id, so JetStream deduplicates
re-publishes within the stream's duplicate window; the topic is part of it because the engine
deduplicates by (topic, id) and a stream deduplicates ids across all its subjects), `Eventstream-Priority` (0..4) and
`Eventstream-Producer-Ts` (ns). An event counts as delivered once JetStream acked the publish; at
most `sink.max_in_flight` publishes wait for their ack; a failed attempt (timeout, no responders
during a server restart, disconnect) is retried with backoff, and after `sink.max_attempts` the event
goes to our DLQ ("connector: publish ... failed"). Events that came in through the source are not
forwarded again (they carry conn_id NATS_CONN_ID), so a sink and a source on the same subjects do
not loop.

Source messages: topic = subject minus the prefix; priority from `Eventstream-Priority` (number or
name) else `source.default_priority`; event id = `Nats-Msg-Id` when it is a decimal number in
1..2^64-1 (or `<topic>:<number>` with the message's own topic, the sink's form), else a 64-bit hash
of it (of `<stream>:<stream seq>` when there is no id), so a redelivered message keeps its id.
Payloads over `records.payload_bytes` go to the payload arena, as from TCP (a full arena makes the
source wait: it stops fetching). Undecodable messages (no topic, bad priority, a payload larger than
the largest frame) and messages delivered more than `source.max_deliver` times go to our DLQ with
the reason and are terminated (`term()`), never redelivered. The JetStream consumer itself has no
max_deliver (-1): nothing is dropped by the server silently; the limit is ours.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import structlog

from eventstream.connectors.nats_sink import NatsSink
from eventstream.connectors.nats_source import NatsSource

log = structlog.get_logger("eventstream.connectors.nats")


def import_nats():
    """nats-py, imported only when the connector is enabled; a clear error when it is missing."""
    try:
        import nats  # noqa: F401
        import nats.errors  # noqa: F401
        import nats.js.api  # noqa: F401
        import nats.js.errors  # noqa: F401
    except ImportError as exc:
        from eventstream.errors import StartupError

        raise StartupError(
            f"connectors.nats.enabled: true needs the nats-py package ({exc}); allowed: install it "
            "(pip install 'eventstream[nats]') or set connectors.nats.enabled: false"
        ) from None
    return nats


class NatsConnector:
    def __init__(self, cfg, engine):
        """`engine`: engine/engine.py's Engine (its `offer` and `stored` ports, topics, payload arena,
        `drop` to the dead-letter log, metrics). Built before the engine starts its processors."""
        self.cfg = cfg
        self.engine = engine
        self.topics = engine.topics
        self.dtype = engine.dtype
        self.capacity = self.dtype.itemsize - 64
        self.prefix = cfg.subject_prefix
        self.run_id = uuid.uuid4().hex[:16]  # `<engine-run>-<seq>` ids for events without an id
        self.sink_on = cfg.sink.enabled
        self.source_on = cfg.source.enabled
        self.stats = {
            k: 0
            for k in (
                "forwarded",
                "published",
                "duplicates",
                "retries",
                "publish_failed",
                "refused_topic",
                "consumed",
                "acked",
                "poison",
                "reconnects",
                "disconnects",
                "source_errors",
                "arena_waits",
                "holds",
            )
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.nc = self.js = None
        self._started = False
        self._closed = False
        self.sink = NatsSink(self) if self.sink_on else None
        self.source = NatsSource(self) if self.source_on else None
        if self.source is not None:  # a release: JetStream acks may be due
            engine.stored.follow(self.source.progress)

    # ------------------------------------------------------------------ lifecycle (service thread)
    def start(self) -> None:
        from eventstream.errors import StartupError

        nats = import_nats()
        self._nats = nats
        from eventstream.runtime import gil

        gil.require_gil_off(self.engine.allow_gil, "the NATS connector (after importing nats-py)")
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, args=(loop,), name="es-nats", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._setup(), loop)
        try:
            fut.result(self.cfg.connect_timeout_s * 3 + 10)
        except Exception as exc:  # noqa: BLE001 - reported as a startup error naming the keys
            fut.cancel()
            self._stop_loop()
            raise StartupError(
                f"connectors.nats.servers: cannot set up JetStream at {self.cfg.servers} "
                f"(stream {self.cfg.stream!r}): {type(exc).__name__}: {exc}; allowed: a reachable "
                "NATS server with JetStream enabled, or connectors.nats.enabled: false"
            ) from None
        self._started = True
        self._register_metrics()
        log.info(
            "nats_connector_started",
            servers=self.cfg.servers,
            stream=self.cfg.stream,
            sink=self.sink_on,
            source=self.source_on,
            durable=self.cfg.source.durable if self.source_on else None,
        )

    def _register_metrics(self) -> None:
        m = getattr(self.engine, "metrics", None)
        if m is None:
            return
        for key in self.stats:
            m.counter_fn(
                "connector_nats_events",
                lambda k=key: self.stats[k],
                {"what": key},
                doc="NATS JetStream connector counters (eventstream/connectors/jetstream.py)",
            )

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _stop_loop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def failures(self) -> list[str]:
        """For /healthz: the connector thread or one of its loops died."""
        if not self._started or self._closed:
            return []
        out = []
        if self._thread is None or not self._thread.is_alive():
            out.append("es-nats: not running")
        src, sink = self.source, self.sink
        for name, task in (
            ("source", src and src._source_task),
            ("acks", src and src._ack_task),
            ("sink", sink and sink.task),
        ):
            if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
                out.append(f"es-nats: {name} loop failed: {task.exception()!r}")
        return out

    def stop_intake(self, timeout: float = 10.0) -> None:
        """The source stops pulling (called with ingest, before the processors drain)."""
        src = self.source
        if not self._started or src is None or src._intake_stopped:
            return
        assert self._loop is not None  # started
        fut = asyncio.run_coroutine_threadsafe(src._stop_source(timeout), self._loop)
        try:
            fut.result(timeout + 5)
        except Exception:  # noqa: BLE001
            log.exception("nats_source_stop_failed")

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """After the processors drained: ack what is stored, flush the sink, disconnect."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            if self.sink is not None:  # built (it follows `stored`, its tail is open) but never run
                self.engine.stored.unfollow(self.sink)
                self.sink.tail.close()
            self._stop_loop()
            return
        self.stop_intake()
        assert self._loop is not None  # started
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(drain, timeout), self._loop)
        try:
            fut.result(timeout + 15)
        except Exception:  # noqa: BLE001
            log.exception("nats_connector_close_failed")
        self._stop_loop()
        log.info("nats_connector_stopped", **self.stats)

    # ------------------------------------------------------------------ the connector thread
    async def _setup(self) -> None:
        nats = self._nats
        cfg = self.cfg

        async def on_error(exc):
            log.warning("nats_error", error=f"{type(exc).__name__}: {exc}")

        async def on_disconnected():
            self.stats["disconnects"] += 1
            log.warning("nats_disconnected")

        async def on_reconnected():
            self.stats["reconnects"] += 1
            log.info("nats_reconnected", server=str(self.nc.connected_url.netloc if self.nc.connected_url else ""))

        # The first connection gives up after a few rounds over the servers (a startup error, not a hang:
        # with max_reconnect_attempts=-1 nats-py retries the *first* connect forever too); once
        # connected, reconnects never stop (nats-py reads the option on every reconnect round).
        self.nc = await nats.connect(
            servers=list(cfg.servers),
            name=f"eventstream-{self.run_id}",
            connect_timeout=cfg.connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=2,
            reconnect_time_wait=0.2,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        self.nc.options["max_reconnect_attempts"] = -1
        self.js = self.nc.jetstream(timeout=cfg.connect_timeout_s)
        if cfg.create_stream:
            try:
                await self.js.stream_info(cfg.stream)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(
                    name=cfg.stream, subjects=[f"{self.prefix}.>"], duplicate_window=cfg.duplicate_window_s
                )
        if self.sink is not None:
            self.sink.start()
        if self.source is not None:
            await self.source.start()

    async def _shutdown(self, drain: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.source is not None:
            await self.source.close()
        if self.sink is not None:
            await self.sink.close(deadline)
        try:
            await self.nc.flush(timeout=2)
        except Exception:  # noqa: BLE001
            pass
        try:
            await asyncio.wait_for(self.nc.close(), 5)
        except Exception:  # noqa: BLE001
            pass
