"""Flow: a dataflow declared in plain Python, built from the topics it reads.

    flow = Flow("totals", ["orders.*"], serde=Json())
    (flow.key_by(lambda o: o["customer"])
         .window(Tumbling(60), Sum(each=lambda o: o["amount"]), max_out_of_orderness=5, late="orders.late")
         .map(lambda r: {"customer": r.key, "minute": r.start, "total": r.value})
         .to("totals.per_minute"))

A Flow is the source stream; every operator returns a new Stream, so a flow is a graph (branch gives
two streams, merge and join take two). Building only declares: the graph runs in eventstream.testing
(a list of events, a controlled clock) or in the engine (Service(cfg, flows=[...]) or YAML `flows:`).

Per-event functions take a value and return one; the `*_batch` variants take the whole column of a
batch (a list, or a numpy array when the serde is a numpy dtype) and return a column. Keys must be
ints, floats, str, bytes, bool, None or tuples of them (stable hashing across runs).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from eventstream.flow import aggregators, sinks
from eventstream.flow import serde as serdes
from eventstream.flow.windows import Hopping, Session, Tumbling, Window, to_ns

EMITS = ("each", "final")
JOIN_HOW = ("inner", "left")


class FlowError(ValueError):
    """A flow is declared wrongly; the message says what and what is allowed."""


class Node:
    __slots__ = ("id", "kind", "name", "parents", "params", "stage", "keyed")

    def __init__(self, nid: int, kind: str, name: str, parents: list[Node], params: dict, keyed: bool):
        self.id, self.kind, self.name, self.parents, self.params = nid, kind, name, parents, params
        self.keyed = keyed
        self.stage = 0

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"


class Stream:
    """One stream of a flow; its methods add an operator and return the stream it produces."""

    def __init__(self, flow: Flow, node: Node):
        self.flow = flow
        self.node = node

    def _add(self, kind: str, params: dict, *, name: str | None = None, parents=None, keyed=None) -> Stream:
        parents = parents or [self.node]
        keyed = all(p.keyed for p in parents) if keyed is None else keyed
        return Stream(self.flow, self.flow._node(kind, name, parents, params, keyed))

    def _need_keys(self, what: str) -> None:
        if not self.node.keyed:
            raise FlowError(
                f"flow {self.flow.name!r}: {what} needs a keyed stream; allowed: call key_by(...) "
                "before it (stateful operators keep state per key)"
            )

    # ------------------------------------------------------------------ stateless
    def map(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """fn(value) -> new value, per event."""
        return self._add("map", {"fn": _callable(fn, "map"), "batch": False}, name=name)

    def map_batch(self, fn: Callable, *, name: str | None = None) -> Stream:
        """fn(values column) -> new column of the same length, once per batch."""
        return self._add("map", {"fn": _callable(fn, "map_batch"), "batch": True}, name=name)

    def filter(self, fn: Callable[[Any], bool], *, name: str | None = None) -> Stream:
        return self._add("filter", {"fn": _callable(fn, "filter"), "batch": False}, name=name)

    def filter_batch(self, fn: Callable, *, name: str | None = None) -> Stream:
        """fn(values column) -> bool mask, once per batch."""
        return self._add("filter", {"fn": _callable(fn, "filter_batch"), "batch": True}, name=name)

    def flat_map(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """fn(value) -> iterable of values (0, 1 or more outputs per event)."""
        return self._add("flat_map", {"fn": _callable(fn, "flat_map")}, name=name)

    def key_by(
        self,
        fn: Callable[[Any], Any] | None = None,
        *,
        field: str | None = None,
        batch: bool = False,
        name: str | None = None,
    ) -> Stream:
        """Key each event: fn(value) -> key, or field= (a numpy field or dict key), or batch=True
        (fn(values column) -> keys column). What follows is partitioned by key."""
        if (fn is None) == (field is None):
            raise FlowError(f"flow {self.flow.name!r}: key_by needs exactly one of a function or field=")
        return self._add("key_by", {"fn": fn, "field": field, "batch": batch}, name=name, keyed=True)

    def branch(self, fn: Callable[[Any], bool], *, name: str | None = None) -> tuple[Stream, Stream]:
        """(the events where fn(value) is true, the others)."""
        b = self._add("branch", {"fn": _callable(fn, "branch")}, name=name)
        return (
            b._add("select", {"which": 0}, name=f"{b.node.name}.true"),
            b._add("select", {"which": 1}, name=f"{b.node.name}.false"),
        )

    def merge(self, *others: Stream, name: str | None = None) -> Stream:
        """One stream of this one and `others`, in source-log order."""
        for o in others:
            if not isinstance(o, Stream) or o.flow is not self.flow:
                raise FlowError(f"flow {self.flow.name!r}: merge takes streams of the same flow")
        return self._add("merge", {}, name=name, parents=[self.node, *(o.node for o in others)])

    # ------------------------------------------------------------------ stateful
    def reduce(self, fn: Callable[[Any, Any], Any], *, emit: str = "each", name: str | None = None) -> Stream:
        """A running value per key: the first value, then fn(acc, value). Emits each update (id: key,
        sequence), or with emit="final" only at the end of a finite input."""
        self._need_keys("reduce")
        return self._add("reduce", {"fn": _callable(fn, "reduce"), "init": None, "emit": _emit(emit)}, name=name)

    def aggregate(
        self, init: Callable[[], Any], fn: Callable[[Any, Any], Any], *, emit: str = "each", name: str | None = None
    ) -> Stream:
        """Like reduce, from init() per key."""
        self._need_keys("aggregate")
        return self._add(
            "reduce",
            {"fn": _callable(fn, "aggregate"), "init": _callable(init, "aggregate init"), "emit": _emit(emit)},
            name=name,
        )

    def window(
        self,
        window: Window,
        agg=None,
        *,
        max_out_of_orderness=0,
        allowed_lateness=0,
        late=None,
        time=None,
        name: str | None = None,
    ) -> Stream:
        """Windowed aggregation per key; emits a WindowResult(key, start, end, value) per key and window
        when the watermark passes the window's end + allowed_lateness. `late`: a topic for late events
        (default: the dead-letter log, reason `late`). `time`: event time from a function or field
        (ns since the epoch) instead of the producer's timestamp_ns."""
        self._need_keys("window")
        if not isinstance(window, Window):
            raise FlowError(
                f"flow {self.flow.name!r}: window({window!r}) is not allowed; allowed: Tumbling(...), "
                "Hopping(...), Sliding(...), Session(...)"
            )
        agg = aggregators.resolve(agg if agg is not None else aggregators.Count())
        kind = "session" if isinstance(window, Session) else "window"
        return self._add(
            kind, self._window_params(window, agg, max_out_of_orderness, allowed_lateness, late, time), name=name
        )

    def join(
        self,
        other: Stream,
        window: Window,
        *,
        how: str = "inner",
        max_out_of_orderness=0,
        allowed_lateness=0,
        late=None,
        time=None,
        name: str | None = None,
    ) -> Stream:
        """A windowed join with another keyed stream: Joined(key, start, end, left, right) per pair of
        values with the same key in the same window."""
        self._need_keys("join")
        other._need_keys("join")
        if how not in JOIN_HOW:
            raise FlowError(f"flow {self.flow.name!r}: join how={how!r} is not allowed; allowed: {', '.join(JOIN_HOW)}")
        if not isinstance(window, (Tumbling, Hopping)):
            raise FlowError(
                f"flow {self.flow.name!r}: join window {window!r} is not allowed; allowed: Tumbling, Hopping/Sliding"
            )
        left = self._add("tag", {"side": 0})
        right = other._add("tag", {"side": 1})
        params = self._window_params(window, None, max_out_of_orderness, allowed_lateness, late, time)
        from eventstream.flow.operators import JoinCollect

        params["agg"] = JoinCollect()
        params["how"] = how
        return self._add("join", params, name=name, parents=[left.node, right.node])

    def _window_params(self, window, agg, ooo, lateness, late, time) -> dict:
        if time is not None and not (callable(time) or isinstance(time, str)):
            raise FlowError(
                f"flow {self.flow.name!r}: time={time!r} is not allowed; allowed: a function "
                "value -> ns since the epoch, or a field name"
            )
        return {
            "window": window,
            "agg": agg,
            "max_out_of_orderness_ns": to_ns(ooo, "max_out_of_orderness"),
            "allowed_lateness_ns": to_ns(lateness, "allowed_lateness"),
            "late": None if late in (None, "dlq") else sinks.resolve(late),
            "time": time,
        }

    # ------------------------------------------------------------------ outputs
    def to(self, target, *, serde=None, priority: str = "MEDIUM", name: str | None = None) -> Stream:
        """Send every value to a topic (back into the engine), a callable, or a NatsSubject."""
        if isinstance(target, str):
            target = sinks.Topic(target, serde=serde, priority=priority)
        target = sinks.resolve(target)
        self._add("sink", {"target": target}, name=name or f"to:{target.name}")
        return self


class Flow(Stream):
    """The source stream of a dataflow: events of `topics` (globs, as in handler subscriptions)."""

    def __init__(self, name: str, topics, *, serde="bytes"):
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise FlowError(f"flow name {name!r} is not allowed; allowed: letters, digits, '-', '_', '.'")
        if isinstance(topics, str):
            topics = [topics]
        topics = list(topics)
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise FlowError(
                f"flow {name!r}: topics={topics!r} is not allowed; allowed: a non-empty list of topic globs"
            )
        self.name = name
        self.topics = topics
        self.serde = serdes.resolve(serde)
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._counts: dict[str, int] = {}
        super().__init__(self, self._node("source", "source", [], {"serde": self.serde}, False))

    def _node(self, kind: str, name: str | None, parents: list[Node], params: dict, keyed: bool) -> Node:
        if name is None:
            n = self._counts.get(kind, 0) + 1
            self._counts[kind] = n
            name = kind if kind == "source" else f"{kind}{n}"
        if name in self._names:
            raise FlowError(f"flow {self.name!r}: operator name {name!r} is used twice; allowed: unique names")
        self._names.add(name)
        node = Node(len(self.nodes), kind, name, parents, params, keyed)
        self.nodes.append(node)
        return node

    def matches(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, g) for g in self.topics)

    def outputs(self) -> list[sinks.Target]:
        """Every target the flow writes to (sinks and late side outputs)."""
        out = [n.params["target"] for n in self.nodes if n.kind == "sink"]
        out += [n.params["late"] for n in self.nodes if n.params.get("late") is not None]
        return out

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, {self.topics!r}, {len(self.nodes)} operators)"


def _callable(fn, what: str):
    if not callable(fn):
        raise FlowError(f"{what}({fn!r}) is not allowed; allowed: a function")
    return fn


def _emit(emit: str) -> str:
    if emit not in EMITS:
        raise FlowError(f"emit={emit!r} is not allowed; allowed: {', '.join(EMITS)}")
    return emit
