"""Service: the Engine (engine/engine.py) and its edges, built from a Config, started and stopped in order.

    start:  engine opened → connectors built → engine started → connectors, flows, TCP/UDP ingest,
            subscribe listener, control thread, metrics endpoint
    stop:   ingest, NATS source intake, flows, control → processors drain → connectors (acks, sink
            flushed) → subscribe listener, exporter → engine closed (logs, rings, arena) → summary

Every edge receives the engine (its `offer` and `stored` ports and the handles it needs), never the service.
"""

from __future__ import annotations

import os
import time

import structlog

from eventstream.config import Config
from eventstream.core.records import ACK_MODES
from eventstream.engine.control import Backpressure, ControlThread, Level
from eventstream.engine.engine import Engine
from eventstream.engine.levels import LevelActions
from eventstream.errors import StartupError, startup_refused
from eventstream.ingest import tls as tlsmod
from eventstream.ingest.auth import TokenError, TokenSet
from eventstream.ingest.limits import CLOSE_REASONS
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest.tenants import Tenants
from eventstream.ingest.udp import UdpServer
from eventstream.metrics.engine_gauges import register_edges
from eventstream.metrics.registry import MetricsRegistry, MetricsServer
from eventstream.runtime import gil

log = structlog.get_logger("eventstream.service")


class Service:
    def __init__(self, cfg: Config, *, handlers: dict | None = None, allow_gil: bool | None = None,
                 flows: list | None = None):
        """`allow_gil`: run even with the GIL on (comparisons); None = as EVENTSTREAM_ALLOW_GIL says.
        `flows`: eventstream.flow.Flow objects to run inside the engine (with those of `flows.builders`)."""
        self.cfg, self.handlers, self.flow_defs, self.started = cfg, handlers, flows, False
        self.allow_gil = gil.gil_allowed_by_env() if allow_gil is None else allow_gil
        self.metrics = MetricsRegistry()
        self.engine = Engine(cfg, self.metrics, handlers=handlers, allow_gil=self.allow_gil)
        self.tcp: TcpServer | None = None
        self.udp: UdpServer | None = None
        self.control: ControlThread | None = None
        self.exporter: MetricsServer | None = None
        self.backpressure = Backpressure(cfg.backpressure)  # the level /readyz reports
        self.connectors = self.subscribe = self.flows = None  # None when disabled
        self.tenants = Tenants(cfg.server.tenants)  # bounds per principal or address (TCP, subscribe)
        self._closers: list = []  # edges stopped after the processors, in reverse order

    def start(self) -> Service:
        gil.require_gil_off(self.allow_gil, "the eventstream engine")
        cfg = self.cfg
        try:  # one server.tls context and one token set for every TCP port
            tls, tokens = tlsmod.from_config(cfg.server.tls), TokenSet.from_config(cfg.server.auth)
        except (tlsmod.TlsConfigError, TokenError) as exc:
            raise StartupError(str(exc)) from None
        from eventstream import connectors
        from eventstream.flow.runtime import start_flows
        from eventstream.subscribe import server as subscribe

        try:
            engine = self.engine.open()  # storage.data_dir checked and created first
            self.connectors = connectors.build(cfg, engine)
            sub = self.subscribe = startup_refused(subscribe.build, cfg, engine.data, engine.dtype, tokens=tokens,
                                                   tls=tls, stored=engine.stored, tenants=self.tenants)
            if sub is not None and engine.event_log is not None:  # retention asks the named groups
                engine.event_log.unread_by = sub.unread_by
                engine.event_log.keep_unread = cfg.storage.retention_respects_groups
            engine.start()
            if self.connectors is not None:
                self.connectors.start()
            self.flows = startup_refused(start_flows, engine, engine.data, self.flow_defs)
            self._start_ingest(engine, tls, tokens)
            if sub is not None:
                self._start_server(sub, "server.subscribe")
                self._closers.append(sub.stop)
            self.control = ControlThread(self.backpressure, engine.sample, LevelActions(engine),
                                         interval_ms=cfg.backpressure.interval_ms, cpus=cfg.affinity.control)
            self.control.start()
            register_edges(self.metrics, failures=self.failures, tenants=self.tenants, tcp=self.tcp, udp=self.udp,
                           subscribe=sub, close_reasons=CLOSE_REASONS)
            self._start_exporter(tls, tokens)
        except BaseException:
            self.stop(drain=False)
            raise
        log.info("service_started", tcp=self.tcp and self.tcp.address, udp=self.udp and self.udp.address,
                 data_dir=str(engine.data), metrics=self.exporter and self.exporter.address, pid=os.getpid(),
                 workers=engine.manager.worker_counts() if engine.manager is not None else {})
        self.started = True
        return self

    def _start_ingest(self, engine: Engine, tls, tokens) -> None:
        """TCP and UDP, both offering to the engine: TCP readers hold what is not admitted or does
        not fit (pushing the client back), UDP sheds it (counted and dead-lettered)."""
        cfg, aff, pb = self.cfg, self.cfg.affinity, self.cfg.records.payload_bytes
        if cfg.server.tcp.enabled:
            self.tcp = TcpServer(cfg.server.tcp, engine, engine.topics, on_reject=engine.reject, cpus=aff.acceptor,
                                 reader_cpus=aff.ingest, reader_scheduling=cfg.scheduling.ingest, payload_bytes=pb,
                                 ack_default=ACK_MODES[cfg.server.ack], tokens=tokens,
                                 on_acked=lambda lat: self.metrics.observe_stage("acked", lat),
                                 payloads=engine.payloads, tls=tls, tenants=self.tenants)
            self._start_server(self.tcp, "server.tcp")
            engine.stored.follow(self.tcp.progress)
        if cfg.server.udp.enabled:
            self.udp = UdpServer(cfg.server.udp, engine, engine.topics, on_reject=engine.reject, cpus=aff.udp,
                                 payload_bytes=pb, payloads=engine.payloads, tenants=self.tenants)
            self._start_server(self.udp, "server.udp")

    def _start_exporter(self, tls, tokens) -> None:
        m = self.cfg.metrics
        if not m.enabled:
            return
        try:
            self.exporter = self.metrics.serve(m.host, m.port, m.path, health=self._health, ready=self._ready,
                                               tls=tls if m.tls else None, tokens=tokens if m.auth else None)
        except OSError as exc:
            raise StartupError(f"metrics.port: cannot listen on {m.host}:{m.port} "
                               f"({exc.strerror}); allowed: a free port, or metrics.enabled: false") from None
        self._closers.append(self.exporter.stop)

    def _start_server(self, server, key: str) -> None:
        try:
            server.start()
        except tlsmod.TlsConfigError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            host, port = server.config.host, server.config.port
            raise StartupError(f"{key}.port: cannot bind {host}:{port} ({exc.strerror}); "
                               f"allowed: a free port (or 0 for any)") from None

    def _health(self) -> tuple[bool, str]:
        """/healthz: every engine thread alive."""
        threads = [*([self.control] if self.control is not None else []), *self.engine.threads(),
                   *(t for srv in (self.tcp, self.udp, self.subscribe) if srv is not None for t in srv.threads())]
        failed = self.failures()
        dead = failed + [f"{t.name}: not running" for t in threads
                         if not t.is_alive() and not any(f.startswith(f"{t.name}:") for f in failed)]
        return (not dead, "; ".join(dead) or "ok")

    def _ready(self) -> tuple[bool, str]:
        """/readyz: listening, and not shedding everything."""
        failed = self.failures()
        if not self.started or failed:
            return False, "not started (or stopping)" if not self.started else "thread failed: " + "; ".join(failed)
        return (self.backpressure.level < Level.EMERGENCY, f"backpressure {self.backpressure.level.name}")

    def stop(self, drain: bool = True, timeout: float = 60.0) -> dict:
        """Stop in dependency order; with `drain`, everything accepted is processed or dead-lettered."""
        t0, engine, conn = time.monotonic(), self.engine, self.connectors
        for part, step in ((self.tcp, "stop"), (self.udp, "stop"), (conn, "stop_intake"), (self.flows, "stop"),
                           (self.control, "stop")):
            if part is not None:
                _quietly(getattr(part, step))
        finished = engine.stop(drain, timeout)
        if conn is not None:  # acks for what is stored, sink flushed, before the log closes
            conn.close(drain=drain and finished)
        summary = dict(self.summary(), drained=finished)  # False: a worker did not finish within `timeout`
        while self._closers:
            _quietly(self._closers.pop())
        engine.close(threads_finished=finished)
        if self.started:
            log.info("service_stopped", seconds=round(time.monotonic() - t0, 3), **summary)
        self.started = False
        return summary

    def failures(self) -> list[str]:
        """Threads that died with an error (the service should then stop)."""
        out = self.engine.failures()
        for part in (self.tcp, self.udp, self.connectors, self.flows):
            if part is not None and hasattr(part, "failures"):
                out.extend(part.failures())
        return out

    def summary(self) -> dict:
        return self.engine.summary() if self.engine.bus is not None else {}  # nothing opened: nothing to say

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _quietly(step) -> None:
    try:
        step()
    except Exception:
        log.exception("stop_failed", step=getattr(step, "__qualname__", repr(step)))
