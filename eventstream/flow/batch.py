"""Batch: the unit every flow operator takes and returns.

A flow never moves events one by one between operators: it moves a `Batch`, a set of columns of the
same length.

    values  the events' values: a Python list (per-event objects: bytes, dicts, tuples...) or a numpy
            array (a structured array decoded at once by serde.Dtype, or any 1-d array)
    keys    None before key_by; then a list or numpy array of keys (one per event)
    ts      int64 event time in ns (the producer's timestamp_ns unless a window says otherwise)
    seq     int64 position of the source event in the log (its offset): events derived from one event
            share it. Where streams merge, events are put back in `seq` order, so what a stateful
            operator sees never depends on how the log was cut into batches.
    origin  uint64 identity of each event, deterministic: the log offset of a source event, then mixed
            with the operator that derived it (ids.py). Output event ids are made from it, so the same
            input replayed after a crash makes the same ids (exactly-once outputs, docs/flows.md).
    topic   int32 index of the source topic (Batch.topics names them), for dead letters

Per-event operators iterate `values`; whole-batch operators receive the column itself.

A batch read from the log carries its payloads as a `Payloads` column (the bytes read and each
payload's start and length, no object per event) until the source's serde decodes them: Dtype with
one numpy.frombuffer over the joined block, the other serdes from one bytes object per payload.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_EMPTY_I64 = np.zeros(0, dtype=np.int64)


class Payloads:
    """The payloads of events read from the log: `data` (the bytes read) with each payload's `starts`
    and `lens` (int64 arrays). Slicing and take() make new columns over the same bytes; one bytes
    object per payload exists only once something iterates or indexes them (tolist())."""

    __slots__ = ("data", "starts", "lens")

    def __init__(self, data: bytes, starts: np.ndarray, lens: np.ndarray):
        self.data = data
        self.starts = starts
        self.lens = lens

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Payloads(self.data, self.starts[i], self.lens[i])
        s = int(self.starts[i])
        return self.data[s : s + int(self.lens[i])]

    def __iter__(self):
        return iter(self.tolist())

    def take(self, idx: np.ndarray) -> Payloads:
        return Payloads(self.data, self.starts[idx], self.lens[idx])

    def tolist(self) -> list[bytes]:
        return list(map(self.data.__getitem__, map(slice, self.starts.tolist(), (self.starts + self.lens).tolist())))

    def joined(self) -> bytes:
        """Every payload, in order, back to back (one slice when they lie so in `data`, as a batch
        entry's do)."""
        n = len(self.starts)
        if n == 0:
            return b""
        ends = self.starts + self.lens
        if n == 1 or bool((self.starts[1:] == ends[:-1]).all()):
            return self.data[int(self.starts[0]) : int(ends[-1])]
        return b"".join(self.tolist())


class Batch:
    __slots__ = ("values", "keys", "ts", "seq", "origin", "topic")

    def __init__(
        self, values, ts: np.ndarray, seq: np.ndarray, origin: np.ndarray, keys=None, topic: np.ndarray | None = None
    ):
        self.values = values
        self.keys = keys
        self.ts = ts
        self.seq = seq
        self.origin = origin
        self.topic = topic if topic is not None else np.zeros(len(ts), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.ts)

    def __repr__(self) -> str:
        return f"Batch({len(self)} events, keyed={self.keys is not None})"

    @classmethod
    def empty(cls) -> Batch:
        return cls([], _EMPTY_I64, _EMPTY_I64, np.zeros(0, dtype=np.uint64))

    def replace(self, *, values=None, keys=None, ts=None, origin=None) -> Batch:
        """The same events with some columns replaced (same length)."""
        return Batch(
            self.values if values is None else values,
            self.ts if ts is None else ts,
            self.seq,
            self.origin if origin is None else origin,
            self.keys if keys is None else keys,
            self.topic,
        )

    def take(self, idx: np.ndarray) -> Batch:
        """The events at positions `idx` (an int array, or a bool mask), in that order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.all():
                return self
            idx = np.flatnonzero(idx)
        return Batch(
            take(self.values, idx),
            self.ts[idx],
            self.seq[idx],
            self.origin[idx],
            None if self.keys is None else take(self.keys, idx),
            self.topic[idx],
        )

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        batches = [b for b in batches if len(b)]
        if not batches:
            return Batch.empty()
        if len(batches) == 1:
            return batches[0]
        keyed = [b.keys is not None for b in batches]
        keys = concat_column([b.keys for b in batches]) if all(keyed) else None
        return Batch(
            concat_column([b.values for b in batches]),
            np.concatenate([b.ts for b in batches]),
            np.concatenate([b.seq for b in batches]),
            np.concatenate([b.origin for b in batches]),
            keys,
            np.concatenate([b.topic for b in batches]),
        )


def merge_in_order(batches: Sequence[Batch]) -> Batch:
    """Several streams' batches as one, in source-log order (a stable sort by `seq`)."""
    parts = [b for b in batches if len(b)]
    out = Batch.concat(parts)
    if len(parts) > 1:
        order = np.argsort(out.seq, kind="stable")
        out = out.take(order)
    return out


def take(column, idx: np.ndarray):
    """column[idx] for a numpy column or Payloads, a list comprehension for a list."""
    if isinstance(column, np.ndarray):
        return column[idx]
    if isinstance(column, Payloads):
        return column.take(idx)
    return [column[i] for i in idx.tolist()]


def concat_column(columns: list):
    """One column from several: numpy if all are arrays of one dtype, else a list."""
    if all(isinstance(c, np.ndarray) for c in columns) and len({c.dtype for c in columns}) == 1:
        return np.concatenate(columns)
    out: list = []
    for c in columns:
        out.extend(c.tolist() if isinstance(c, np.ndarray) and c.dtype.names is None else list(c))
    return out


def as_list(column) -> list:
    """A column as a list of per-event values (rows of a structured array stay np.void rows)."""
    if isinstance(column, list):
        return column
    if isinstance(column, np.ndarray) and column.dtype.names is None:
        return column.tolist()
    return list(column)
