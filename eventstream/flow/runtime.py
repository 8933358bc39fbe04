"""Flows inside the engine: each flow a consumer of the engine's own log, its keyed operators on
`parallelism` threads, its outputs written back through the engine's ingest path, exactly once.

    events.bin ──LogTail──▶ es-flow-<name>-0 (reads a chunk as columns, cuts it in P slices)
                               │  barrier: stage 0 on every partition thread (decode, map, key...)
                               │  barrier: stage 1.. (keyed state: windows, reduce, join)
                               ▼
                            outputs ──offer──▶ engine queues ──▶ events.bin (dedup by topic + id)
                            callables, NATS subjects; late events and failures ──▶ dead-letter log
                               │  once they are stored:
                               ▼
                            snapshot (state + next offset, atomic replace)   every snapshot_interval_s

Threads: es-flow-<name>-0 is partition 0 and the coordinator; es-flow-<name>-1.. run the other
partitions. They meet at a barrier between stages (plan.py), so partitions run their Python operators
at the same moment, truly in parallel with the GIL off.

Exactly-once: a snapshot holds the operators' state with the offset of the first event not yet in
it, and is taken only after every output of the events before that offset is stored. After kill -9
the flow restores the last snapshot and reads the log from its offset; the outputs it makes again
carry the event ids they had (ids.py), and the engine's (topic, event id) deduplication, rebuilt from
events.bin at start, stores none of them twice. Callables, NATS subjects and the dead-letter log see
replayed outputs again (at-least-once). Processing-time windows depend on the clock, not the log:
their outputs after a restart are not the same ones.

A flow skips the events of the topics it writes itself (no loops through its own outputs).
"""

from __future__ import annotations

import fnmatch
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from eventstream.flow import records as flow_records
from eventstream.flow import serde as serdes
from eventstream.flow import state as snapshots
from eventstream.flow.batch import Batch, Payloads, as_list
from eventstream.flow.flow import Flow
from eventstream.flow.plan import Executor
from eventstream.flow.sinks import Call, NatsSubject, Topic
from eventstream.runtime.affinity import pin_current_thread
from eventstream.storage.tail import LogTail, SegmentIndex, TailBatch

if TYPE_CHECKING:
    from eventstream.core.payloads import PayloadArena
    from eventstream.core.topics import TopicTable

log = structlog.get_logger("eventstream.flow")

OUTPUT_RETRY_S = 0.001
IDLE_MAX_S = 0.02  # longest park of an idle flow between looks at the log (a new append wakes it sooner)


@dataclass
class Ports:
    """What a flow runtime uses from the engine."""

    log_path: Path
    dtype: np.dtype
    topics: TopicTable
    offer: Callable[[np.ndarray], None]  # returns once the records are stored (or dead-lettered)
    dead_letter: Callable  # (records, reason or reasons, payloads) -> None
    state_dir: Path
    index: SegmentIndex
    payloads: PayloadArena | None = None  # for outputs over records.payload_bytes
    wait_stored: Callable[[float], None] | None = None  # park until something is stored (or timeout)


@dataclass
class FlowSettings:
    parallelism: int = 1
    cpus: tuple[int, ...] = ()
    snapshot_interval_s: float = 5.0
    chunk_bytes: int = 1 << 20
    tick_s: float = 0.1  # processing-time windows: how often an idle flow looks at the clock


class PartitionThreads:
    """Runs an Executor's steps on P threads: the caller is partition 0, threads 1..P-1 are started
    here; every stage runs on all partitions at once, with a barrier between stages."""

    def __init__(self, executor: Executor, name: str, cpus=()):
        self.executor = executor
        self.P = executor.partitions
        self.cpus = tuple(cpus)
        self.name = name
        self._barrier = threading.Barrier(self.P)
        self._errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._helper, args=(p,), name=f"{name}-{p}", daemon=True) for p in range(1, self.P)
        ]

    def start(self) -> PartitionThreads:
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._barrier.abort()
        for t in self.threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout)

    def _helper(self, p: int) -> None:
        pin_current_thread(self.cpus, self.name)
        stages = len(self.executor.stages)
        try:
            while True:
                self._barrier.wait()  # a step begins (BrokenBarrierError: stop)
                for s in range(stages):
                    self._stage(s, p)
                    self._barrier.wait()
        except threading.BrokenBarrierError:
            return

    def _stage(self, s: int, p: int) -> None:
        try:
            self.executor.run_stage(s, p)
        except BaseException as exc:  # noqa: BLE001 - a bug, not a user's operator (those dead-letter): stop the flow
            self._errors.append(exc)

    def step(self, batch: Batch) -> tuple[list, list]:
        """Run every stage over `batch` on all partitions; returns what they emitted and dead-lettered."""
        ex = self.executor
        ex.load(batch)
        if self.P == 1:
            for s in range(len(ex.stages)):
                self._stage(s, 0)
        else:
            self._barrier.wait()
            for s in range(len(ex.stages)):
                self._stage(s, 0)
                self._barrier.wait()
        if self._errors:
            raise self._errors[0]
        return ex.collect()


class FlowRunner:
    """One flow in the engine (see the module doc). start() / stop() / statistics()."""

    def __init__(self, flow: Flow, ports: Ports, settings: FlowSettings | None = None):
        self.flow = flow
        self.ports = ports
        self.settings = s = settings or FlowSettings()
        self.executor = Executor(flow, s.parallelism, clock=time.time_ns)
        self.P = s.parallelism
        self.snapshot_file = snapshots.snapshot_path(ports.state_dir, flow.name)
        self.status_file = ports.state_dir / f"{flow.name}.status.json"
        self.offset = 0  # first log offset not yet processed
        self.snapshot_offset = 0
        self.snapshot_bytes = 0
        self.snapshots = 0
        self.events = 0
        self.outputs_written = 0
        self.dead_lettered = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._parts = PartitionThreads(self.executor, f"es-flow-{flow.name}", s.cpus)
        self._main = threading.Thread(target=self._run, name=f"es-flow-{flow.name}-0", daemon=True)
        self._own_topics = {t.name for t in flow.outputs() if isinstance(t, Topic)}
        self._match: dict[str, int] = {}
        self._topic_names: list[str] = []
        self._topic_ids: dict[str, int] = {}
        self._processing_time = any(
            n.params.get("window") is not None and n.params["window"].time == "processing" for n in flow.nodes
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FlowRunner:
        snap = snapshots.read(self.snapshot_file)
        if snap is not None:
            self.offset, state = snap
            self.executor.restore(state)
            self.snapshot_offset = self.offset
            log.info("flow_restored", flow=self.flow.name, offset=self.offset)
        self._parts.start()
        self._main.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._main.is_alive():
            self._main.join(timeout)
        self._parts.stop(timeout)
        for target in self.flow.outputs():
            if isinstance(target, NatsSubject):
                target.close()

    def threads(self) -> list[threading.Thread]:
        return [self._main, *self._parts.threads]

    def _step(self, batch: Batch) -> None:
        emitted, dead = self._parts.step(batch)
        self._write(emitted, dead)

    def _run(self) -> None:
        pin_current_thread(self.settings.cpus, f"flow {self.flow.name}")
        tail = LogTail(
            self.ports.log_path,
            self.ports.dtype,
            self.ports.index,
            start=self.offset,
            chunk_bytes=self.settings.chunk_bytes,
        )
        last_snap = time.monotonic()
        last_tick = 0.0
        idle = 0.0005
        try:
            while not self._stop.is_set():
                events = tail.read_batch()
                if events is not None:
                    idle = 0.0005
                    self._step(self._batch(events))
                    self.offset = tail.next_offset
                    self.events += len(events)
                else:
                    now = time.monotonic()
                    if self._processing_time and now - last_tick >= self.settings.tick_s:
                        last_tick = now
                        self._step(Batch.empty())
                    if self.offset != self.snapshot_offset and now - last_snap >= self.settings.snapshot_interval_s:
                        self._snapshot()
                        last_snap = now
                    self._park(idle)
                    idle = min(IDLE_MAX_S, idle * 2)
                    continue
                if time.monotonic() - last_snap >= self.settings.snapshot_interval_s:
                    self._snapshot()
                    last_snap = time.monotonic()
            if self.offset != self.snapshot_offset:
                self._snapshot()
        except BaseException as exc:
            self.error = exc
            log.exception("flow_failed", flow=self.flow.name)
        finally:
            tail.close()
            self._parts.stop(0)

    def _park(self, timeout: float) -> None:
        wait = self.ports.wait_stored
        if wait is not None:
            wait(timeout)
        else:
            self._stop.wait(timeout)

    # ------------------------------------------------------------------ input
    def _batch(self, events: TailBatch) -> Batch:
        """The events of the flow's topics as a Batch of payloads (decoding happens per slice), from
        the log's columns with a constant number of numpy operations: the topic test per distinct
        topic, event time, offsets, and the payloads as a Payloads column over the bytes read."""
        r = events.rows
        tids = r["topic"]
        first = int(tids[0])
        if bool((tids == first).all()):
            t = self._flow_topic(events.topics.get(first, f"#{first}"))
            if t < 0:
                return Batch.empty()
            topic = np.full(len(r), t, dtype=np.int32)
        else:
            ids, inverse = np.unique(tids, return_inverse=True)
            index = np.array([self._flow_topic(events.topics.get(i, f"#{i}")) for i in ids.tolist()], dtype=np.int32)
            topic = index[inverse.ravel()]
            keep = topic >= 0
            if not keep.all():
                r, topic = r[keep], topic[keep]
                if not len(r):
                    return Batch.empty()
        payloads = Payloads(events.data, r["pos"].astype(np.int64), r["payload_len"].astype(np.int64))
        pts = r["producer_ts"].astype(np.int64)
        ts = np.where(pts != 0, pts, r["stored_ns"].astype(np.int64))
        seq = r["offset"].astype(np.int64)
        return Batch(payloads, ts, seq, seq.astype(np.uint64), None, topic)

    def _flow_topic(self, name: str) -> int:
        """The flow's index of topic `name`, -1 when the flow does not read it (cached per name)."""
        t = self._match.get(name)
        if t is None:
            ok = self.flow.matches(name) and name not in self._own_topics
            t = self._match[name] = self._topic_index(name) if ok else -1
        return t

    def _topic_index(self, name: str) -> int:
        self._topic_names.append(name)
        return len(self._topic_names) - 1

    # ------------------------------------------------------------------ output
    def _write(self, emitted, dead) -> None:
        ports = self.ports
        by_topic: dict[str, list] = {}
        for target, b in emitted:
            values = as_list(b.values) if not isinstance(b.values, np.ndarray) else b.values
            if isinstance(target, Topic):
                by_topic.setdefault(target.name, []).append((target, b, values))
            elif isinstance(target, Call):
                self._deliver(target, b, lambda t=target, v=values: t.deliver(as_list(v)))
            elif isinstance(target, NatsSubject):
                self._deliver(target, b, lambda t=target, v=values: t.publish(t.encode(as_list(v))))
        for name, parts in by_topic.items():
            target = parts[0][0]
            payloads, eids, ts, bad = [], [], [], []
            for _, b, values in parts:
                try:
                    enc = target.encode(values)
                except serdes.SerdeError as exc:
                    bad.append((b, f"flow_error: {self.flow.name}.to:{name}: {exc}"))
                    continue
                payloads += enc
                eids.append(b.origin)
                ts.append(b.ts)
            for b, reason in bad:
                dead.append((b, reason))
            if payloads:
                tid = self._topic_id(name)
                recs = flow_records.build(
                    ports.dtype,
                    tid,
                    payloads,
                    np.concatenate(eids),
                    np.concatenate(ts),
                    target.priority,
                    ports.payloads,
                )
                ports.offer(recs)
                self.outputs_written += len(recs)
        for b, reason in dead:
            self._dead_letter(b, reason)

    def _deliver(self, target, b: Batch, call) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a user's sink: dead-letter what it refused, keep running
            self._dead_letter(b, f"flow_error: {self.flow.name}.to:{target.name}: {type(exc).__name__}: {exc}"[:500])

    def _topic_id(self, name: str) -> int:
        tid = self._topic_ids.get(name)
        if tid is None:
            tid = self._topic_ids[name] = self.ports.topics.intern(name)
        return tid

    def _dead_letter(self, b: Batch, reason) -> None:
        values = as_list(b.values) if not isinstance(b.values, np.ndarray) else list(b.values)
        payloads = []
        for v in values:
            try:
                payloads.append(serdes.encode_any(v))
            except serdes.SerdeError:
                payloads.append(repr(v).encode())
        names = self._topic_names
        tids = np.array(
            [
                self._topic_id(names[t]) if 0 <= t < len(names) else self._topic_id(self.flow.topics[0])
                for t in b.topic.tolist()
            ],
            dtype=np.uint32,
        )
        recs = flow_records.build(self.ports.dtype, tids, [b""] * len(payloads), b.origin, b.ts, 2)
        recs["payload_len"] = [len(p) for p in payloads]
        self.ports.dead_letter(recs, reason, payloads)
        self.dead_lettered += len(recs)

    # ------------------------------------------------------------------ state
    def _snapshot(self) -> None:
        self.snapshot_bytes = snapshots.write(self.snapshot_file, self.offset, self.executor.snapshot())
        self.snapshot_offset = self.offset
        self.snapshots += 1
        self._write_status()

    def _write_status(self) -> None:
        st = self.statistics()
        tmp = self.status_file.with_name(self.status_file.name + ".tmp")
        tmp.write_text(json.dumps(st), encoding="utf-8")
        os.replace(tmp, self.status_file)

    def statistics(self) -> dict:
        ops = self.executor.operators()
        wms = [o["watermark"] for o in ops if o["watermark"] is not None]
        return {
            "flow": self.flow.name,
            "topics": self.flow.topics,
            "parallelism": self.P,
            "offset": self.offset,
            "events": self.events,
            "outputs": self.outputs_written,
            "dead_lettered": self.dead_lettered,
            "watermark_ns": min(wms) if wms else None,
            "state_keys": sum(o["state_keys"] for o in ops),
            "snapshot_offset": self.snapshot_offset,
            "snapshot_bytes": self.snapshot_bytes,
            "snapshots": self.snapshots,
            "error": None if self.error is None else repr(self.error),
            "operators": ops,
            "updated_ns": time.time_ns(),
        }


def topic_matches(globs: list[str], topic: str) -> bool:
    return any(fnmatch.fnmatchcase(topic, g) for g in globs)


# ---------------------------------------------------------------------------------------- in a Service
class FlowSet:
    """Every flow of one engine: built from `flows.builders` and Service(cfg, flows=[...])."""

    def __init__(self, runners: list[FlowRunner]):
        self.runners = runners

    def stop(self) -> None:
        for r in self.runners:
            r.stop()

    def threads(self) -> list[threading.Thread]:
        return [t for r in self.runners for t in r.threads()]

    def failures(self) -> list[str]:
        return [f"es-flow-{r.flow.name}: {r.error!r}" for r in self.runners if r.error is not None]

    def statistics(self) -> list[dict]:
        return [r.statistics() for r in self.runners]


def load_builders(specs: list[str]) -> list[Flow]:
    """The flows `flows.builders` names (each 'module:function' returns a Flow or a list of Flows)."""
    from eventstream.engine.handlers import resolve

    out: list[Flow] = []
    for i, spec in enumerate(specs):
        key = f"flows.builders[{i}]"
        fn: Any = resolve(spec, key)  # a builder, not a handler: resolve imports it and checks it is callable
        try:
            got = fn()
        except Exception as exc:  # noqa: BLE001 - a user's builder: say which one and what is allowed
            raise ValueError(
                f"{key}: {spec!r} raised {type(exc).__name__}: {exc}; allowed: a function taking no "
                "arguments that returns a Flow or a list of Flows"
            ) from None
        flows = got if isinstance(got, (list, tuple)) else [got]
        for f in flows:
            if not isinstance(f, Flow):
                raise ValueError(
                    f"{key}: {spec!r} returned {type(f).__name__}; allowed: a function returning a "
                    "Flow or a list of Flows (eventstream.flow.Flow)"
                )
        out += flows
    return out


def offer_until_stored(engine) -> Callable[[np.ndarray], None]:
    """An `offer` port over the engine's: place the records (waiting while they are held: the flow is
    pushed back like a TCP client), then wait on `engine.stored` until each is stored (its marks)."""
    from eventstream.core.payloads import release_records

    def offer(records: np.ndarray) -> None:
        pending, stamp, marks = records, True, []
        while True:
            off = engine.offer(pending, stamp=stamp)
            marks += off.marks
            for pos, reason in off.refused:  # a queue configured DROP_NEW: dead-lettered, never lost
                engine.drop(pending[pos], reason)
                release_records(pending[pos])
            if off.held is None:
                break
            pending, stamp = pending[off.held], False
            time.sleep(OUTPUT_RETRY_S)
        engine.stored.wait(marks)

    return offer


def start_flows(engine, data_dir: Path, flows: list[Flow] | None) -> FlowSet | None:
    """Start the flows on an engine (its config's builders and those passed in); None if none. A flow
    reads events.bin, woken by `engine.stored`, and writes back through `engine.offer`."""
    cfg = engine.cfg.flows
    all_flows = load_builders(cfg.builders) + list(flows or [])
    if not all_flows:
        return None
    names = [f.name for f in all_flows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"flows: the name {dup[0]!r} is used by two flows; allowed: unique flow names (the name "
            "keys the flow's snapshot)"
        )
    st = engine.cfg.storage
    state_dir = Path(cfg.state_dir) if cfg.state_dir else Path(data_dir) / "flows"
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(data_dir) / st.events_file
    index = SegmentIndex(log_path, state_dir / "segments.json", engine.dtype)
    ports = Ports(
        log_path=log_path,
        dtype=engine.dtype,
        topics=engine.topics,
        offer=offer_until_stored(engine),
        dead_letter=engine.drop,
        state_dir=state_dir,
        index=index,
        payloads=engine.payloads,
        wait_stored=_progress_wait(engine.stored),
    )
    settings = FlowSettings(
        parallelism=cfg.parallelism,
        cpus=tuple(cfg.cpus),
        snapshot_interval_s=cfg.snapshot_interval_s,
        chunk_bytes=cfg.chunk_bytes,
    )
    runners = [FlowRunner(f, ports, settings) for f in all_flows]
    started = []
    try:
        for r in runners:
            started.append(r.start())
    except BaseException:
        for r in started:
            r.stop()
        raise
    fs = FlowSet(runners)
    metrics = getattr(engine, "metrics", None)
    if metrics is not None:
        register_metrics(metrics, fs)
    return fs


def _progress_wait(progress) -> Callable[[float], None]:
    ev = threading.Event()
    progress.register(ev)

    def wait(timeout: float) -> None:
        ev.wait(timeout)
        ev.clear()

    return wait


OPERATOR_METRICS = (
    ("flow_operator_in", "in", "counter", "events into a flow operator"),
    ("flow_operator_out", "out", "counter", "events out of a flow operator"),
    ("flow_operator_late", "late", "counter", "late events (side output or DLQ reason late)"),
    ("flow_operator_errors", "errors", "counter", "events an operator raised on (DLQ flow_error)"),
    ("flow_operator_state_keys", "state_keys", "gauge", "keys (x windows) holding state"),
)


def register_metrics(metrics, fs: FlowSet) -> None:
    """Per operator: in, out, late, errors, state keys and watermark lag; labels {flow, operator} only
    (operator names are declared in code, never taken from events: a fixed set)."""
    for r in fs.runners:
        for n in r.flow.nodes:
            labels = {"flow": r.flow.name, "operator": n.name}

            def value(key, r=r, name=n.name):
                for o in r.executor.operators():
                    if o["operator"] == name:
                        return o[key]
                return 0

            for metric, key, kind, doc in OPERATOR_METRICS:
                if kind == "counter":
                    metrics.counter_fn(metric, lambda key=key, value=value: value(key), labels, doc=doc)
                else:
                    metrics.gauge_fn(metric, labels, lambda key=key, value=value: value(key), doc=doc)
            if n.kind in ("window", "session", "join"):

                def lag(value=value):
                    wm = value("watermark")
                    return 0.0 if not wm else max(0.0, (time.time_ns() - wm) / 1e9)

                metrics.gauge_fn(
                    "flow_operator_watermark_lag_seconds",
                    labels,
                    lag,
                    doc="wall clock minus the operator's event-time watermark",
                )
        metrics.gauge_fn(
            "flow_offset",
            {"flow": r.flow.name},
            lambda r=r: r.offset,
            doc="first log offset the flow has not processed",
        )
