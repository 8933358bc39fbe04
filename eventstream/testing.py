"""Unit-testing flows: run a Flow over a list of events with a controlled clock, get its outputs.

    from eventstream.testing import FlowTest, Event, run_flow

    out = run_flow(flow, [Event({"user": "a", "amount": 3}, time=60.5), ...])
    assert out["totals"] == [...]             # values sent to the topic "totals", in order
    out.ids("totals")                          # their event ids (deterministic)
    out.late, out.dead_letters                 # late events sent to the DLQ, failed events: (value, reason)

`run_flow` feeds the events in batches (batch_size) through the same executor the engine runs
(eventstream/flow/plan.py), on `partitions` partitions one after another, then ends the input: every
window still open fires (as if time ran on forever). `FlowTest` gives the steps by hand: send(),
advance() the processing-time clock, tick(), finish().

Event values are encoded with the flow's serde first (bytes as they are), so decoding is tested too.
Times are seconds since the epoch (float) or ns (int >= 1e15).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from eventstream.flow import serde as serdes
from eventstream.flow.batch import Batch
from eventstream.flow.flow import Flow
from eventstream.flow.plan import Executor

__all__ = ["Event", "FlowTest", "ManualClock", "Outputs", "run_flow"]


def _ns(t) -> int:
    if isinstance(t, int) and not isinstance(t, bool) and abs(t) >= 10**15:
        return t
    return int(round(float(t) * 1e9))


class ManualClock:
    """A clock that moves only when told (ns since the epoch)."""

    def __init__(self, start=0.0):
        self.now_ns = _ns(start)

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(round(seconds * 1e9))

    def set(self, t) -> None:
        self.now_ns = _ns(t)


@dataclass
class Event:
    """One input event: its value, event time (default: the clock's now) and topic."""

    value: Any
    time: float | int | None = None
    topic: str | None = None


class Outputs:
    """What a run produced, by target name (topic, callable or NATS subject)."""

    def __init__(self):
        self.values: dict[str, list] = defaultdict(list)
        self.event_ids: dict[str, list[int]] = defaultdict(list)
        self.late: list[tuple[Any, str]] = []  # (value, reason) of late events sent to the DLQ
        self.dead_letters: list[tuple[Any, str]] = []  # (value, reason) of events an operator failed on

    def __getitem__(self, target: str) -> list:
        return self.values[target]

    def __contains__(self, target: str) -> bool:
        return target in self.values

    def ids(self, target: str) -> list[int]:
        return self.event_ids[target]

    def __repr__(self) -> str:
        parts = {k: len(v) for k, v in self.values.items()}
        return f"Outputs({parts}, late={len(self.late)}, dead_letters={len(self.dead_letters)})"


class FlowTest:
    """A flow run by hand: send events, move the clock, look at the outputs."""

    def __init__(
        self,
        flow: Flow,
        *,
        partitions: int = 1,
        clock: ManualClock | None = None,
        batch_size: int = 1024,
        deliver: bool = False,
    ):
        """`deliver`: also call the flow's callables (to(fn)); outputs are recorded either way."""
        self.flow = flow
        self.clock = clock or ManualClock()
        self.batch_size = batch_size
        self.deliver = deliver
        self.executor = Executor(flow, partitions, clock=self.clock)
        self.outputs = Outputs()
        self.topics: list[str] = []
        self._offset = 0

    def send(self, events) -> Outputs:
        """Feed events (Event, or bare values at the clock's time) in batches of batch_size."""
        events = list(events)
        for lo in range(0, len(events), self.batch_size):
            self._step(self._batch(events[lo : lo + self.batch_size]))
        return self.outputs

    def advance(self, seconds: float) -> Outputs:
        """Move the processing-time clock, then let timers fire (processing-time windows)."""
        self.clock.advance(seconds)
        return self.tick()

    def tick(self) -> Outputs:
        self._step(Batch.empty())
        return self.outputs

    def finish(self) -> Outputs:
        """End of input: every window and final reduce emits."""
        self.executor.set_final(True)
        try:
            self._step(Batch.empty())
        finally:
            self.executor.set_final(False)
        return self.outputs

    def snapshot(self) -> dict:
        return self.executor.snapshot()

    def _batch(self, events: list) -> Batch:
        encode = self.flow.serde.encode if not isinstance(self.flow.serde, serdes.Bytes) else None
        payloads, ts, topic = [], [], []
        for e in events:
            if not isinstance(e, Event):
                e = Event(e)
            v = e.value
            if isinstance(v, (bytes, bytearray)):
                payloads.append(bytes(v))
            elif encode is not None:
                payloads.append(encode([v])[0])
            else:
                payloads.append(serdes.encode_any(v))
            ts.append(self.clock.now_ns if e.time is None else _ns(e.time))
            name = e.topic or self.flow.topics[0]
            if name not in self.topics:
                self.topics.append(name)
            topic.append(self.topics.index(name))
        n = len(events)
        seq = np.arange(self._offset, self._offset + n, dtype=np.int64)
        self._offset += n
        return Batch(
            payloads, np.array(ts, dtype=np.int64), seq, seq.astype(np.uint64), None, np.array(topic, dtype=np.int32)
        )

    def _step(self, batch: Batch) -> None:
        ex = self.executor
        ex.load(batch)
        ex.run_serial()
        emitted, dead = ex.collect()
        out = self.outputs
        for target, b in emitted:
            values = (
                b.values.tolist()
                if isinstance(b.values, np.ndarray) and b.values.dtype.names is None
                else list(b.values)
            )
            if hasattr(target, "encode"):
                target.encode(values)  # outputs must encode: the engine would refuse them otherwise
            out.values[target.name].extend(values)
            out.event_ids[target.name].extend(b.origin.tolist())
            if self.deliver and hasattr(target, "deliver"):
                target.deliver(values)
        for b, reason in dead:
            reasons = [reason] * len(b) if isinstance(reason, str) else reason
            values = list(b.values)
            for v, r in zip(values, reasons, strict=True):
                (out.late if r.startswith("late") else out.dead_letters).append((v, r))


def run_flow(
    flow: Flow,
    events,
    *,
    partitions: int = 1,
    clock: ManualClock | None = None,
    batch_size: int = 1024,
    finish: bool = True,
) -> Outputs:
    """Run `flow` over `events` and return its outputs (see the module doc)."""
    t = FlowTest(flow, partitions=partitions, clock=clock, batch_size=batch_size)
    t.send(events)
    if finish:
        t.finish()
    return t.outputs
