"""The operators a flow runs: one instance per operator and partition (its state is that partition's).

Every operator takes a Batch and returns a Batch (branch: two). Per-event functions are applied in one
list comprehension-like loop; a function that raises does not stop the flow: the event goes to the
dead-letter log with reason ``flow_error: <flow>.<operator>: <exception>`` and the others go on.
A whole-batch function that raises sends its whole batch there the same way.

Stateful operators (reduce/aggregate, windows, join) run after key_by, so each key's state lives in
exactly one partition. Their outputs carry deterministic origins (ids.py): (operator, key, window
start) for windows, (operator, key, sequence) for reduce, so the ids of what they write are the same
when the log is replayed after a crash.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from eventstream.flow import ids
from eventstream.flow.aggregators import Aggregator, Fold, Vector
from eventstream.flow.batch import Batch, Payloads, as_list, merge_in_order
from eventstream.flow.watermarks import MIN_TS, BoundedOutOfOrderness
from eventstream.flow.windows import Session, WindowResult

LATE_SALT = ids.name_hash("late")
_MISSING = object()
_SIMPLE_KEYS = frozenset((int, str, bytes, float, bool, type(None)))


class Joined(NamedTuple):
    """What a windowed join emits: one per pair of a left and a right value with the same key and window."""

    key: Any
    start: int
    end: int
    left: Any
    right: Any


_make_result = functools.partial(tuple.__new__, WindowResult)  # WindowResult from a tuple, no Python frame


class Context:
    """What operators of one partition report to: the clock, outputs to sinks, dead letters."""

    def __init__(self, flow: str, partition: int, clock: Callable[[], int], hasher: ids.KeyHasher):
        self.flow = flow
        self.partition = partition
        self.clock = clock
        self.hasher = hasher
        self.final = False  # end of a finite input: stateful operators emit everything they hold
        self.emitted: list[tuple[Any, Batch]] = []  # (sink, batch), in order
        self.dead: list[tuple[Batch, list[str] | str]] = []

    def emit(self, sink, batch: Batch) -> None:
        if len(batch):
            self.emitted.append((sink, batch))

    def dead_letter(self, batch: Batch, reason) -> None:
        if len(batch):
            self.dead.append((batch, reason))

    def take_outputs(self):
        out, dead = self.emitted, self.dead
        self.emitted, self.dead = [], []
        return out, dead


class Op:
    stateful = False
    kind = "op"

    def __init__(self, node, flow: str):
        self.node = node
        self.name = node.name
        self.flow = flow
        self.where = f"{flow}.{node.name}"
        self.hash = ids.name_hash(f"{flow}/{node.name}")
        self.n_in = self.n_out = self.n_late = self.n_errors = 0

    def run(self, inputs: list[Batch], ctx: Context):
        batch = inputs[0] if len(inputs) == 1 else merge_in_order(inputs)
        self.n_in += len(batch)
        out = self.process(batch, ctx)
        if isinstance(out, Batch):
            self.n_out += len(out)
        return out

    def process(self, batch: Batch, ctx: Context):
        return batch

    # per-event functions: the flow keeps running when one raises
    def each(self, fn, values, ctx: Context) -> tuple[list, list[tuple[int, str]]]:
        """[fn(v) for v in values], and (position, reason) of the values fn raised on (their result None)."""
        out: list = []
        append = out.append
        bad: list[tuple[int, str]] = []
        it = iter(as_list(values))
        while True:
            try:
                for v in it:
                    append(fn(v))
                return out, bad
            except Exception as exc:  # noqa: BLE001 - a user's operator: dead-letter the event, keep running
                bad.append((len(out), self.reason(exc)))
                append(None)

    def reason(self, exc: BaseException) -> str:
        return f"flow_error: {self.where}: {type(exc).__name__}: {exc}"[:500]

    def drop_bad(self, batch: Batch, bad: list[tuple[int, str]], ctx: Context) -> np.ndarray:
        """Dead-letter the events at the bad positions; returns the mask of the others."""
        self.n_errors += len(bad)
        pos = np.array([p for p, _ in bad], dtype=np.intp)
        ctx.dead_letter(batch.take(pos), [r for _, r in bad])
        keep = np.ones(len(batch), dtype=bool)
        keep[pos] = False
        return keep

    def whole(self, fn, batch: Batch, ctx: Context):
        """fn(values) for a whole-batch function; None (and the batch dead-lettered) if it raised."""
        try:
            return fn(batch.values)
        except Exception as exc:  # noqa: BLE001
            self.n_errors += len(batch)
            ctx.dead_letter(batch, self.reason(exc))
            return None

    # state (stateful operators override)
    def snapshot(self):
        return None

    def restore(self, state) -> None:
        pass

    def state_keys(self) -> int:
        return 0

    def watermark(self) -> int | None:
        return None


# ---------------------------------------------------------------------------------------- stateless
class Source(Op):
    """Decodes the payloads of the events the flow reads (serde, once per batch)."""

    kind = "source"

    def __init__(self, node, flow):
        super().__init__(node, flow)
        self.serde = node.params["serde"]

    def process(self, batch, ctx):
        if not len(batch):
            return Batch.empty()
        values = batch.values
        if isinstance(values, Payloads) and not self.serde.takes_payloads:
            values = values.tolist()
        values, bad = self.serde.decode(values)
        out = batch.replace(values=values)
        if bad:
            self.n_errors += len(bad)
            pos = np.array([p for p, _ in bad], dtype=np.intp)
            ctx.dead_letter(batch.take(pos), [f"flow_error: {self.where}: {r}" for _, r in bad])
            keep = np.ones(len(batch), dtype=bool)
            keep[pos] = False
            out = out.take(keep)
        return out


class Map(Op):
    kind = "map"

    def process(self, batch, ctx):
        if not len(batch):
            return batch
        p = self.node.params
        if p["batch"]:
            values = self.whole(p["fn"], batch, ctx)
            if values is None:
                return Batch.empty()
            if len(values) != len(batch):
                self.n_errors += len(batch)
                ctx.dead_letter(
                    batch,
                    f"flow_error: {self.where}: the whole-batch function returned "
                    f"{len(values)} values for {len(batch)} events (allowed: one per event)",
                )
                return Batch.empty()
            return batch.replace(values=values)
        values, bad = self.each(p["fn"], batch.values, ctx)
        out = batch.replace(values=values)
        if bad:
            out = out.take(self.drop_bad(batch, bad, ctx))
        return out


class Filter(Op):
    kind = "filter"

    def process(self, batch, ctx):
        if not len(batch):
            return batch
        p = self.node.params
        if p["batch"]:
            mask = self.whole(p["fn"], batch, ctx)
            if mask is None:
                return Batch.empty()
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (len(batch),):
                self.n_errors += len(batch)
                ctx.dead_letter(
                    batch,
                    f"flow_error: {self.where}: the whole-batch predicate returned shape "
                    f"{mask.shape} (allowed: one bool per event)",
                )
                return Batch.empty()
            return batch.take(mask)
        keep, bad = self.each(p["fn"], batch.values, ctx)
        mask = np.fromiter((bool(k) for k in keep), dtype=bool, count=len(keep))
        if bad:
            mask &= self.drop_bad(batch, bad, ctx)
        return batch.take(mask)


class FlatMap(Op):
    kind = "flat_map"

    def process(self, batch, ctx):
        if not len(batch):
            return batch
        outs, bad = self.each(self.node.params["fn"], batch.values, ctx)
        if bad:
            self.drop_bad(batch, bad, ctx)
        values: list = []
        counts = np.zeros(len(batch), dtype=np.int64)
        for i, o in enumerate(outs):
            if o is None:
                continue
            o = list(o)
            counts[i] = len(o)
            values.extend(o)
        rows = np.repeat(np.arange(len(batch)), counts)
        # j-th output of an event: origin mixed with j (deterministic)
        first = np.cumsum(counts) - counts
        j = np.arange(len(rows)) - np.repeat(first, counts)
        src = batch.take(rows)
        return Batch(
            values,
            src.ts,
            src.seq,
            ids.mix(src.origin ^ np.uint64(self.hash), j.astype(np.uint64)),
            src.keys,
            src.topic,
        )


class KeyBy(Op):
    """Sets each event's key; the partition of everything stateful after it."""

    kind = "key_by"

    def process(self, batch, ctx):
        if not len(batch):
            return batch
        p = self.node.params
        if p["field"] is not None:
            vals = batch.values
            if isinstance(vals, np.ndarray) and vals.dtype.names:
                return batch.replace(keys=vals[p["field"]])
            keys, bad = self.each(lambda v: v[p["field"]], vals, ctx)
        elif p["batch"]:
            keys = self.whole(p["fn"], batch, ctx)
            if keys is None:
                return Batch.empty()
            if len(keys) != len(batch):
                self.n_errors += len(batch)
                ctx.dead_letter(
                    batch,
                    f"flow_error: {self.where}: the whole-batch key function returned "
                    f"{len(keys)} keys for {len(batch)} events (allowed: one per event)",
                )
                return Batch.empty()
            return batch.replace(keys=keys)
        else:
            keys, bad = self.each(p["fn"], batch.values, ctx)
        if not set(map(type, keys)) <= _SIMPLE_KEYS:  # tuples, or keys that cannot be hashed stably
            try:
                ctx.hasher.hashes(keys)
            except TypeError:
                bad = sorted(bad + self._bad_keys(keys, {p for p, _ in bad}, ctx))
        out = batch.replace(keys=keys)
        if bad:
            out = out.take(self.drop_bad(batch, bad, ctx))
        return out

    def _bad_keys(self, keys, skip: set, ctx) -> list[tuple[int, str]]:
        bad = []
        for i, k in enumerate(keys):
            if i in skip:
                continue
            try:
                ctx.hasher.hashes([k])
            except TypeError as exc:
                bad.append((i, self.reason(exc)))
        return bad


class Merge(Op):
    kind = "merge"


class Branch(Op):
    """(events where the predicate holds, the others)."""

    kind = "branch"

    def run(self, inputs, ctx):
        batch = inputs[0]
        self.n_in += len(batch)
        if not len(batch):
            return batch, batch
        keep, bad = self.each(self.node.params["fn"], batch.values, ctx)
        mask = np.fromiter((bool(k) for k in keep), dtype=bool, count=len(keep))
        ok = np.ones(len(batch), dtype=bool)
        if bad:
            ok = self.drop_bad(batch, bad, ctx)
        self.n_out += int(ok.sum())
        return batch.take(mask & ok), batch.take(~mask & ok)


class Select(Op):
    kind = "select"

    def run(self, inputs, ctx):
        return inputs[0]


class Tag(Op):
    """Marks a join input's values with its side: (side, value)."""

    kind = "tag"

    def process(self, batch, ctx):
        side = self.node.params["side"]
        return batch.replace(values=[(side, v) for v in as_list(batch.values)])


# ---------------------------------------------------------------------------------------- sinks
class Sink(Op):
    kind = "sink"

    def __init__(self, node, flow):
        super().__init__(node, flow)
        self.target = node.params["target"]

    def process(self, batch, ctx):
        if len(batch):
            ctx.emit(self.target, batch.replace(origin=ids.mix(batch.origin, self.target.hash)))
        return Batch.empty()


# ---------------------------------------------------------------------------------------- stateful
class KeyTable:
    """Keys of one stateful operator in one partition -> dense rows (arrival order), with their hashes.

    Integer key columns (numpy) are looked up without Python per event: a sorted array of the known
    keys and np.searchsorted; only keys seen for the first time go through the dict."""

    def __init__(self, hasher: ids.KeyHasher):
        self.hasher = hasher
        self.rows: dict = {}
        self.keys: list = []
        self.hashes = np.zeros(16, dtype=np.uint64)
        self._sorted = np.zeros(0, dtype=np.int64)  # known integer keys, sorted
        self._sorted_rows = np.zeros(0, dtype=np.intp)

    def __len__(self) -> int:
        return len(self.keys)

    def _add(self, new: list) -> None:
        n0 = len(self.keys)
        for k in new:
            self.rows[k] = len(self.keys)
            self.keys.append(k)
        h = self.hasher.hashes(new)
        if len(self.keys) > len(self.hashes):
            grown = np.zeros(max(len(self.keys), 2 * len(self.hashes)), dtype=np.uint64)
            grown[:n0] = self.hashes[:n0]
            self.hashes = grown
        self.hashes[n0 : len(self.keys)] = h

    def rows_of(self, keys) -> np.ndarray:
        """The row of every key of a key column (new keys are added, in order of first appearance)."""
        if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
            return self._rows_int(keys.astype(np.int64, copy=False))
        if isinstance(keys, np.ndarray):
            keys = keys.tolist()
        rows = list(map(self.rows.get, keys))
        if None in rows:  # new keys, added in order of first appearance
            self._add(list(dict.fromkeys(k for k, r in zip(keys, rows, strict=True) if r is None)))
            rows = list(map(self.rows.get, keys))
        return np.array(rows, dtype=np.intp)

    def _rows_int(self, keys: np.ndarray) -> np.ndarray:
        known = self._sorted
        pos = np.searchsorted(known, keys)
        if len(known):
            hit = known[np.minimum(pos, len(known) - 1)] == keys
        else:
            hit = np.zeros(len(keys), dtype=bool)
        if not hit.all():
            miss = keys[~hit]
            uniq, first = np.unique(miss, return_index=True)
            new = uniq[np.argsort(first, kind="stable")]  # in order of first appearance
            n0 = len(self.keys)
            self._add(new.tolist())
            ks = np.concatenate((self._sorted, new))
            rs = np.concatenate((self._sorted_rows, np.arange(n0, n0 + len(new), dtype=np.intp)))
            order = np.argsort(ks, kind="stable")
            self._sorted, self._sorted_rows = ks[order], rs[order]
            return self._rows_int(keys)
        return self._sorted_rows[pos]

    def _index_ints(self) -> None:
        ints = [(k, r) for k, r in self.rows.items() if isinstance(k, int)]
        ks = np.fromiter((k for k, _ in ints), dtype=np.int64, count=len(ints))
        rs = np.fromiter((r for _, r in ints), dtype=np.intp, count=len(ints))
        order = np.argsort(ks, kind="stable")
        self._sorted, self._sorted_rows = ks[order], rs[order]

    def state(self):
        return self.keys

    def restore(self, keys: list) -> None:
        self.rows, self.keys = {}, []
        self.hashes = np.zeros(16, dtype=np.uint64)
        if keys:
            self._add(list(keys))
        self._index_ints()


class Reduce(Op):
    """A running value per key: acc = fn(acc, value). emit="each": every update (id: key, sequence);
    emit="final": only at the end of a finite input (eventstream.testing, benchmarks)."""

    kind = "reduce"
    stateful = True

    def __init__(self, node, flow):
        super().__init__(node, flow)
        p = node.params
        self.fn, self.init, self.emit = p["fn"], p["init"], p["emit"]
        self.state: dict = {}  # key -> [acc, count]
        self.hasher: ids.KeyHasher | None = None

    def process(self, batch, ctx):
        self.hasher = ctx.hasher
        out = Batch.empty()
        if len(batch):
            keys = batch.keys.tolist() if isinstance(batch.keys, np.ndarray) else batch.keys
            values = as_list(batch.values)
            state, fn, init = self.state, self.fn, self.init
            accs: list = []
            counts: list = []
            bad: list[tuple[int, str]] = []
            for i, (k, v) in enumerate(zip(keys, values, strict=True)):
                st = state.get(k)
                try:
                    if st is None:
                        acc = v if init is None else fn(init(), v)
                        st = state[k] = [acc, 1]
                    else:
                        st[0] = fn(st[0], v)
                        st[1] += 1
                except Exception as exc:  # noqa: BLE001
                    bad.append((i, self.reason(exc)))
                    accs.append(None)
                    counts.append(0)
                    continue
                accs.append(st[0])
                counts.append(st[1])
            keep = self.drop_bad(batch, bad, ctx) if bad else None
            if self.emit == "each":
                h = ctx.hasher.hashes(keys) ^ np.uint64(self.hash)
                out = Batch(accs, batch.ts, batch.seq, ids.mix(h, np.array(counts, dtype=np.uint64)), keys, batch.topic)
                if keep is not None:
                    out = out.take(keep)
        if ctx.final and self.emit == "final" and self.state:
            keys = list(self.state)
            h = ctx.hasher.hashes(keys) ^ np.uint64(self.hash)
            counts = np.array([self.state[k][1] for k in keys], dtype=np.uint64)
            n = len(keys)
            out = Batch(
                [self.state[k][0] for k in keys],
                np.zeros(n, dtype=np.int64),
                np.full(n, -1, dtype=np.int64),
                ids.mix(h, counts),
                keys,
            )
        return out

    def snapshot(self):
        return self.state

    def restore(self, state) -> None:
        self.state = dict(state)

    def state_keys(self) -> int:
        return len(self.state)


class Windowed(Op):
    """Shared by window and session operators: event time, lateness, the late side output."""

    stateful = True

    def __init__(self, node, flow):
        super().__init__(node, flow)
        p = node.params
        self.window = p["window"]
        self.agg: Aggregator = p["agg"]
        self.lateness = p["allowed_lateness_ns"]
        self.late_target = p["late"]  # a Sink target, or None: the dead-letter log
        self.time_fn = p["time"]
        self.processing = self.window.time == "processing"
        self.wm = BoundedOutOfOrderness(p["max_out_of_orderness_ns"])
        self.keys: KeyTable | None = None

    def event_time(self, batch: Batch, ctx: Context) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Each event's time, or (times, keep) when events whose time failed were dead-lettered."""
        if self.processing:
            return np.full(len(batch), ctx.clock(), dtype=np.int64)
        if self.time_fn is None:
            return batch.ts
        vals = batch.values
        if isinstance(self.time_fn, str):
            if isinstance(vals, np.ndarray) and vals.dtype.names:
                return vals[self.time_fn].astype(np.int64)
            fn = self.time_fn
            times, bad = self.each(lambda v: v[fn], vals, ctx)
        else:
            times, bad = self.each(self.time_fn, vals, ctx)
        if bad:
            keep = self.drop_bad(batch, bad, ctx)
            times = [t if k else 0 for t, k in zip(times, keep.tolist(), strict=True)]
            return np.array(times, dtype=np.int64), keep
        return np.array(times, dtype=np.int64)

    def route_late(self, batch: Batch, ctx: Context, where: str) -> None:
        if not len(batch):
            return
        self.n_late += len(batch)
        if self.late_target is None:
            ctx.dead_letter(
                batch, f"late: {self.where}: event time behind the watermark of {where} by more than allowed_lateness"
            )
        else:
            ctx.emit(self.late_target, batch.replace(origin=ids.mix(batch.origin, LATE_SALT ^ self.late_target.hash)))

    def bind(self, hasher: ids.KeyHasher) -> None:
        """The key table (with the keys of a restored snapshot, in their rows)."""
        self.keys = KeyTable(hasher)
        pending = getattr(self, "_pending_keys", None)
        if pending:
            self.keys.restore(pending)
        self._pending_keys = None

    @property
    def table(self) -> KeyTable:
        """The key table, bound by the first process() call."""
        if self.keys is None:
            raise RuntimeError(f"{self.where}: key table used before the first batch bound it")
        return self.keys

    def watermark(self) -> int | None:
        if self.processing:
            return None
        wm = self.wm.watermark
        return None if wm == MIN_TS else wm


class WindowAgg(Windowed):
    """Tumbling and hopping windows: one accumulator per (window start, key)."""

    kind = "window"

    def __init__(self, node, flow):
        super().__init__(node, flow)
        self.open: dict[int, Any] = {}  # start -> accumulator array (vectorized) or {row: acc}
        self.touched: dict[int, np.ndarray] = {}  # start -> rows that have events (vectorized)
        self.vector = isinstance(self.agg, Vector)

    def process(self, batch, ctx):
        if self.keys is None:
            self.bind(ctx.hasher)
        if len(batch):
            self.add(batch, ctx)
        return self.fire(ctx)

    def add(self, batch: Batch, ctx: Context) -> None:
        got = self.event_time(batch, ctx)
        if isinstance(got, tuple):
            ts, keep = got
            batch, ts = batch.take(keep), ts[keep]
        else:
            ts = got
        if not len(batch):
            return
        wm = ts if self.processing else self.wm.advance(ts)
        pos, starts = self.window.assign(ts)
        size = self.window.size_ns
        if not self.processing:
            wm_pair = wm if pos is None else wm[pos]
            late = starts + (size + self.lateness) <= wm_pair
            if late.any():
                if pos is None:
                    late_ev = late
                else:  # late for every window it belongs to (later windows may still take it)
                    late_ev = np.bincount(pos[late], minlength=len(batch)) == self.window.per_event
                self.route_late(batch.take(late_ev), ctx, self.window)
                keep = ~late
                starts = starts[keep]
                pos = np.flatnonzero(keep) if pos is None else pos[keep]
        ev = np.arange(len(batch)) if pos is None else pos
        if not len(ev):
            return
        rows = self.table.rows_of(batch.keys)[ev]
        if self.vector:
            col = self._column(batch, ctx)
            if col is None:
                return
            col = col[ev]
            uniq = np.unique(starts)
            for s in uniq.tolist():
                sel = slice(None) if len(uniq) == 1 else starts == s
                self._fold(s, rows[sel], col[sel])
        else:
            self._fold_each(batch, ev, starts, rows, ctx)

    def _column(self, batch: Batch, ctx: Context) -> np.ndarray | None:
        assert isinstance(self.agg, Vector)
        try:
            return self.agg.column(batch.values)
        except Exception as exc:  # noqa: BLE001
            self.n_errors += len(batch)
            ctx.dead_letter(batch, self.reason(exc))
            return None

    def _fold(self, start: int, rows: np.ndarray, col: np.ndarray) -> None:
        assert isinstance(self.agg, Vector)
        n = len(self.table)
        acc = self.open.get(start)
        if acc is None or len(acc) < n:
            cap = max(n, 64) if acc is None else max(n, 2 * len(acc))
            grown = self.agg.new(cap)
            touched = np.zeros(cap, dtype=bool)
            if acc is not None:
                grown[: len(acc)] = acc
                touched[: len(acc)] = self.touched[start]
            acc = self.open[start] = grown
            self.touched[start] = touched
        self.agg.fold(acc, rows, col)
        self.touched[start][rows] = True

    def _fold_each(self, batch, ev, starts, rows, ctx) -> None:
        values = as_list(batch.values)
        agg, open_ = self.agg, self.open
        add = agg._add if isinstance(agg, Fold) else agg.add  # skip a wrapper call per event
        create = agg.create
        bad: list[tuple[int, str]] = []
        uniq = np.unique(starts)
        for s in uniq.tolist():
            sel = None if len(uniq) == 1 else np.flatnonzero(starts == s)
            evs = ev if sel is None else ev[sel]
            rs = rows if sel is None else rows[sel]
            d = open_.get(s)
            if d is None:
                d = open_[s] = {}
            get = d.get
            pairs = zip(rs.tolist(), evs.tolist(), strict=True)
            while True:  # resumes after an event add() raised on (dead-lettered below)
                try:
                    for r, i in pairs:
                        acc = get(r, _MISSING)
                        d[r] = add(create() if acc is _MISSING else acc, values[i])
                    break
                except Exception as exc:  # noqa: BLE001
                    bad.append((i, self.reason(exc)))
        if bad:  # an event of several (hopping) windows is dead-lettered once
            self.drop_bad(batch, sorted(dict(bad).items()), ctx)

    def due(self, ctx: Context) -> list[int]:
        if ctx.final:
            return sorted(self.open)
        size = self.window.size_ns
        if self.processing:
            now = ctx.clock()
            return sorted(s for s in self.open if s + size <= now)
        limit = self.wm.watermark - size - self.lateness
        return sorted(s for s in self.open if s <= limit)

    def fire(self, ctx: Context) -> Batch:
        if not self.open:
            return Batch.empty()
        due = self.due(ctx)
        if not due:
            return Batch.empty()
        size = self.window.size_ns
        keys = self.table.keys
        values: list = []
        out_keys: list = []
        parts_rows, parts_start = [], []
        result = self.agg.result
        identity = type(self.agg).result is Aggregator.result
        for s in due:
            acc = self.open.pop(s)
            if self.vector:
                rows = np.flatnonzero(self.touched.pop(s))
                vals = acc[rows].tolist()
            else:
                rows = np.fromiter(acc.keys(), dtype=np.intp, count=len(acc))
                vals = list(acc.values())
            ks = [keys[r] for r in rows.tolist()]
            if not identity:
                vals = list(map(result, vals))
            values.extend(map(_make_result, zip(ks, repeat(s), repeat(s + size), vals)))
            out_keys.extend(ks)
            parts_rows.append(rows)
            parts_start.append(np.full(len(rows), s, dtype=np.int64))
        rows = np.concatenate(parts_rows)
        starts = np.concatenate(parts_start)
        origin = ids.mix(self.table.hashes[rows] ^ np.uint64(self.hash), starts.view(np.uint64))
        n = len(values)
        return self.expand(Batch(values, starts + size - 1, np.full(n, -1, dtype=np.int64), origin, out_keys), ctx)

    def expand(self, batch: Batch, ctx: Context) -> Batch:
        return batch

    def snapshot(self):
        return {
            "max_ts": self.wm.state(),
            "keys": None if self.keys is None else self.keys.state(),
            "open": self.open,
            "touched": self.touched,
        }

    def restore(self, state) -> None:
        self.wm.restore(state["max_ts"])
        self._pending_keys = state["keys"]
        self.open = dict(state["open"])
        self.touched = dict(state["touched"])

    def state_keys(self) -> int:
        if self.vector:
            return int(sum(int(t.sum()) for t in list(self.touched.values())))
        return sum(len(d) for d in list(self.open.values()))


class JoinCollect(Aggregator):
    """The accumulator of a windowed join: the left and the right values of a key and window."""

    name = "join"

    def create(self):
        return ([], [])

    def add(self, acc, value):
        acc[value[0]].append(value[1])
        return acc

    def merge(self, a, b):
        return (a[0] + b[0], a[1] + b[1])


class Join(WindowAgg):
    """A windowed join of two keyed streams: per key and window, every (left, right) pair (inner), and
    with how="left" also each left value without a right one (right None)."""

    kind = "join"

    def expand(self, batch: Batch, ctx: Context) -> Batch:
        how = self.node.params["how"]
        values: list[Joined] = []
        keys: list = []
        rows: list[int] = []
        j: list[int] = []
        for i, w in enumerate(batch.values):
            left, right = w.value
            if not right and how == "left":
                right = [None]
            n = 0
            for lv in left:
                for rv in right:
                    values.append(Joined(w.key, w.start, w.end, lv, rv))
                    keys.append(w.key)
                    n += 1
            rows.extend([i] * n)
            j.extend(range(n))
        rows_a = np.array(rows, dtype=np.intp)
        src = batch.take(rows_a)
        return Batch(values, src.ts, src.seq, ids.mix(src.origin, np.array(j, dtype=np.uint64)), keys)


class SessionAgg(Windowed):
    """Session windows per key: an event within `gap` of a session joins it (bridging two merges them);
    a session closes when the watermark passes its last event + gap + allowed_lateness."""

    kind = "session"

    def __init__(self, node, flow):
        super().__init__(node, flow)
        assert isinstance(self.window, Session)
        self.sessions: dict[int, list[list]] = {}  # row -> [[start, last, acc], ...]
        self.heap: list[tuple[int, int]] = []  # (last + gap, row): candidates to close

    def process(self, batch, ctx):
        if self.keys is None:
            self.bind(ctx.hasher)
        if len(batch):
            self.add(batch, ctx)
        return self.fire(ctx)

    def add(self, batch, ctx) -> None:
        got = self.event_time(batch, ctx)
        if isinstance(got, tuple):
            ts, keep = got
            batch, ts = batch.take(keep), ts[keep]
        else:
            ts = got
        if not len(batch):
            return
        wm = ts if self.processing else self.wm.advance(ts)
        gap, lat = self.window.gap_ns, self.lateness
        if not self.processing:
            late = ts + (gap + lat) <= wm
            if late.any():
                self.route_late(batch.take(late), ctx, self.window)
                batch, ts = batch.take(~late), ts[~late]
        rows = self.table.rows_of(batch.keys)
        agg, sessions, heap = self.agg, self.sessions, self.heap
        values = as_list(batch.values)
        bad: list[tuple[int, str]] = []
        for i, (t, r) in enumerate(zip(ts.tolist(), rows.tolist(), strict=True)):
            ss = sessions.get(r)
            if ss is None:
                ss = sessions[r] = []
            try:
                hit = [s for s in ss if s[0] - gap <= t <= s[1] + gap]
                if not hit:
                    s = [t, t, agg.add(agg.create(), values[i])]
                    ss.append(s)
                else:
                    s = hit[0]
                    for o in hit[1:]:
                        s[2] = agg.merge(s[2], o[2])
                        s[0], s[1] = min(s[0], o[0]), max(s[1], o[1])
                        ss.remove(o)
                    s[2] = agg.add(s[2], values[i])
                    s[0], s[1] = min(s[0], t), max(s[1], t)
            except Exception as exc:  # noqa: BLE001
                bad.append((i, self.reason(exc)))
                continue
            heapq.heappush(heap, (s[1] + gap, r))
        if bad:
            self.drop_bad(batch, bad, ctx)

    def fire(self, ctx) -> Batch:
        gap = self.window.gap_ns
        if ctx.final:
            limit = None
        elif self.processing:
            limit = ctx.clock()
        else:
            limit = self.wm.watermark - self.lateness
        out: list[tuple[int, int, int, Any]] = []  # (row, start, end, acc)
        heap = self.heap
        while heap and (limit is None or heap[0][0] <= limit):
            _, r = heapq.heappop(heap)
            ss = self.sessions.get(r)
            if not ss:
                continue
            for s in [s for s in ss if limit is None or s[1] + gap <= limit]:
                ss.remove(s)
                out.append((r, s[0], s[1] + gap, s[2]))
            if not ss:
                del self.sessions[r]
        if not out:
            return Batch.empty()
        out.sort(key=lambda o: (o[2], o[0], o[1]))  # by end, then key row, then start
        keys = self.table.keys
        result = self.agg.result
        values = [WindowResult(keys[r], s, e, result(a)) for r, s, e, a in out]
        rows = np.array([o[0] for o in out], dtype=np.intp)
        starts = np.array([o[1] for o in out], dtype=np.int64)
        ends = np.array([o[2] for o in out], dtype=np.int64)
        origin = ids.mix(self.table.hashes[rows] ^ np.uint64(self.hash), starts.view(np.uint64))
        return Batch(values, ends - 1, np.full(len(out), -1, dtype=np.int64), origin, [v.key for v in values])

    def snapshot(self):
        return {
            "max_ts": self.wm.state(),
            "keys": None if self.keys is None else self.keys.state(),
            "sessions": self.sessions,
            "heap": self.heap,
        }

    def restore(self, state) -> None:
        self.wm.restore(state["max_ts"])
        self._pending_keys = state["keys"]
        self.sessions = state["sessions"]
        self.heap = state["heap"]

    def state_keys(self) -> int:
        return len(self.sessions)


OPS = {
    cls.kind: cls
    for cls in (
        Source,
        Map,
        Filter,
        FlatMap,
        KeyBy,
        Merge,
        Branch,
        Select,
        Tag,
        Sink,
        Reduce,
        WindowAgg,
        Join,
        SessionAgg,
    )
}
