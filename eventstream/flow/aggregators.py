"""Aggregators: what a window (or a join) computes per key.

Two kinds, usable in the same windows:

* Whole-batch (numpy) aggregators, `Count()`, `Sum(col)`, `Min(col)`, `Max(col)`, or any
  `Vector(ufunc, col, dtype, identity)`: per batch, the column is computed once (`col` is a field
  name of a numpy structured value column, a whole-batch function values -> array, or None for
  numeric values) and folded into one accumulator array per window with one `ufunc.at` call. No
  per-event Python: this is the fast path.
* Per-event Python aggregators, `Fold(init, add)` (and `Collect()`): `add(acc, value)` is called for
  every event, in the order of the partition's events.

`col` may also be given as `each=fn` (a per-event function whose results are then folded with numpy).
Session windows merge accumulators (`merge`); Fold needs `merge=` for that (Collect has one).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np

_SCALAR = {np.add: operator.add, np.minimum: min, np.maximum: max}


class Aggregator:
    vectorized = False
    name = "aggregate"

    # per-event interface (every aggregator has it: session windows use it)
    def create(self) -> Any:
        raise NotImplementedError

    def add(self, acc, value) -> Any:
        raise NotImplementedError

    def merge(self, a, b) -> Any:
        raise NotImplementedError(
            f"{self.name} cannot merge accumulators (session windows need it); allowed: pass merge= to Fold"
        )

    def result(self, acc) -> Any:
        return acc


class Vector(Aggregator):
    """A numpy ufunc folded over a per-event numeric column (np.add, np.minimum, np.maximum...)."""

    vectorized = True

    def __init__(
        self, ufunc, col=None, *, dtype=np.float64, identity=0, each: Callable | None = None, name: str = "vector"
    ):
        self.ufunc = ufunc
        self.col = col
        self.each = each
        self.dtype = np.dtype(dtype)
        self.identity = identity
        self.name = name
        self._scalar = _SCALAR.get(ufunc, lambda a, b: ufunc(a, b).item())
        if col is not None and not (isinstance(col, str) or callable(col)):
            raise ValueError(
                f"{name}: col={col!r} is not allowed; allowed: a field name, a whole-batch "
                "function (values -> numpy array) or None (the values are numbers)"
            )

    def column(self, values) -> np.ndarray:
        """The numbers to fold, one per event, for a whole batch."""
        if self.each is not None:
            seq = values.tolist() if isinstance(values, np.ndarray) and values.dtype.names is None else values
            return np.fromiter((self.each(v) for v in seq), dtype=self.dtype, count=len(values))
        if self.col is None:
            return np.asarray(values, dtype=self.dtype)
        if isinstance(self.col, str):
            if isinstance(values, np.ndarray) and values.dtype.names:
                return values[self.col].astype(self.dtype, copy=False)
            return np.fromiter((v[self.col] for v in values), dtype=self.dtype, count=len(values))
        out = np.asarray(self.col(values), dtype=self.dtype)
        if out.shape != (len(values),):
            raise ValueError(
                f"{self.name}: the whole-batch function returned shape {out.shape}; allowed: one "
                f"number per event, shape ({len(values)},)"
            )
        return out

    def fold(self, acc: np.ndarray, rows: np.ndarray, col: np.ndarray) -> None:
        self.ufunc.at(acc, rows, col)

    def new(self, n: int) -> np.ndarray:
        return np.full(n, self.identity, dtype=self.dtype)

    def create(self):
        return self.dtype.type(self.identity).item()

    def add(self, acc, value):
        return self._scalar(acc, self.column([value])[0].item())

    def merge(self, a, b):
        return self._scalar(a, b)


class Count(Vector):
    def __init__(self):
        super().__init__(np.add, None, dtype=np.int64, identity=0, name="count")

    def column(self, values) -> np.ndarray:
        return np.ones(len(values), dtype=np.int64)

    def fold(self, acc, rows, col) -> None:
        acc += np.bincount(rows, minlength=len(acc))


class Sum(Vector):
    def __init__(self, col=None, *, each=None, dtype=np.float64):
        super().__init__(np.add, col, dtype=dtype, identity=0, each=each, name="sum")

    def fold(self, acc, rows, col) -> None:
        if acc.dtype.kind == "f":
            acc += np.bincount(rows, weights=col, minlength=len(acc))
        else:
            np.add.at(acc, rows, col)


class Min(Vector):
    def __init__(self, col=None, *, each=None, dtype=np.float64):
        super().__init__(
            np.minimum,
            col,
            dtype=dtype,
            identity=np.inf if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max,
            each=each,
            name="min",
        )


class Max(Vector):
    def __init__(self, col=None, *, each=None, dtype=np.float64):
        super().__init__(
            np.maximum,
            col,
            dtype=dtype,
            identity=-np.inf if np.dtype(dtype).kind == "f" else np.iinfo(dtype).min,
            each=each,
            name="max",
        )


class Fold(Aggregator):
    """Per-event Python: acc = add(acc, value), starting from init() (a fresh value per key and window)."""

    def __init__(
        self,
        init: Callable[[], Any],
        add: Callable[[Any, Any], Any],
        *,
        merge: Callable[[Any, Any], Any] | None = None,
        result: Callable[[Any], Any] | None = None,
        name: str = "fold",
    ):
        if not callable(init) or not callable(add):
            raise ValueError(
                f"{name}: init and add must be callables (init() -> accumulator, add(acc, value) -> accumulator)"
            )
        self.init = init
        self._add = add
        self._merge = merge
        self._result = result
        self.name = name

    def create(self):
        return self.init()

    def add(self, acc, value):
        return self._add(acc, value)

    def merge(self, a, b):
        if self._merge is None:
            return super().merge(a, b)
        return self._merge(a, b)

    def result(self, acc):
        return acc if self._result is None else self._result(acc)


def _append(acc: list, v) -> list:
    acc.append(v)
    return acc


class Collect(Fold):
    """Every value of the window, in arrival order (a list)."""

    def __init__(self):
        super().__init__(list, _append, merge=lambda a, b: a + b, name="collect")


def resolve(agg) -> Aggregator:
    if isinstance(agg, Aggregator):
        return agg
    if isinstance(agg, str) and agg in ("count",):
        return Count()
    raise ValueError(
        f"aggregator {agg!r} is not allowed; allowed: Count(), Sum(), Min(), Max(), Vector(...), "
        "Fold(init, add), Collect() (eventstream.flow)"
    )
