"""A latency histogram updated a whole numpy batch at a time.

prometheus-client's Histogram.observe() takes one value and a lock per call, ~µs per event on this
build: too slow per event. Here a batch is bucketed with one np.searchsorted + np.bincount outside the
lock, and only the bucket-count addition happens under it. Buckets follow Prometheus `le` semantics
(a value equal to a bound falls in that bucket).

Percentiles come two ways: from the buckets (cheap, bounded error, interpolated inside a bucket) and
from a reservoir of the most recent `reservoir` values (exact over that window; filled with one
vectorized copy per batch).
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

from eventstream.core.records import SMALL_BATCH  # up to this many values: bucketed in Python

# 1 µs .. 10 s in 1-2.5-5 steps (ns)
DEFAULT_LATENCY_BUCKETS_NS: tuple[float, ...] = tuple(float(m * 10**e) for e in range(3, 10) for m in (1, 2.5, 5)) + (
    1e10,
)


class _Octaves:
    """np.searchsorted(bounds, values, side="left") for positive increasing bounds, in a few passes
    instead of a binary search per value (~20 ns a value here): a value's binary exponent (the bits
    of its float64) picks the first bound at or above its octave from a table, and as many steps
    as one octave holds bounds at most move it on (the 1-2.5-5 bounds: one). Values <= 0 and
    below the first bound get 0, as searchsorted gives them."""

    def __init__(self, bounds: np.ndarray):
        self.bounds = bounds
        self.usable = bool(bounds[0] > 0 and np.isfinite(bounds).all())
        if not self.usable:
            return
        exps = np.arange(2048, dtype=np.int64)  # every biased float64 exponent
        with np.errstate(over="ignore"):
            low = np.ldexp(1.0, (exps - 1023).astype(np.int32))  # the smallest value of each octave
        self.first = np.searchsorted(bounds, low, side="left").astype(np.int64)
        # one more bound than any value exceeds (+inf): a step past the last bound stops there
        self.ext = np.append(bounds, np.inf)
        per_octave = np.diff(np.append(self.first, len(bounds)))
        self.steps = max(1, int(per_octave.max()))

    def bucket(self, values: np.ndarray) -> np.ndarray:
        if not self.usable:
            return np.searchsorted(self.bounds, values, side="left")
        v = np.maximum(values, np.finfo(np.float64).tiny)  # <= 0 (and nan): the first octave
        idx = self.first[v.view(np.int64) >> 52]
        for _ in range(self.steps):
            idx += v > self.ext[idx]
        return idx


class VectorHistogram:
    def __init__(self, bounds: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_NS, reservoir: int = 4096):
        b = np.asarray(bounds, dtype=np.float64)
        if b.ndim != 1 or b.size == 0 or np.any(np.diff(b) <= 0):
            raise ValueError(f"histogram bounds {bounds!r} are not allowed; allowed: a non-empty increasing list")
        self.bounds = b
        self._counts = np.zeros(b.size + 1, dtype=np.int64)  # last slot: above the highest bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()
        self._ring = np.zeros(max(reservoir, 1), dtype=np.float64)
        self._ring_pos = 0  # total values ever written to the ring
        self._reservoir = reservoir
        self._bounds_list = b.tolist()
        self._octaves = _Octaves(b)

    def observe_many(self, values: np.ndarray, also: VectorHistogram | None = None) -> None:
        """Add a batch of values (any numeric array; negative values count in the first bucket);
        to `also` too (a histogram with the same bounds: the values are bucketed once)."""
        if also is not None and (also.bounds.shape != self.bounds.shape or (also.bounds != self.bounds).any()):
            also.observe_many(values)
            also = None
        if len(values) <= SMALL_BATCH and self._reservoir:
            few = values.tolist() if isinstance(values, np.ndarray) else list(values)
            self._observe_few(few)
            if also is not None:
                also.observe_many(few)
            return
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        add = np.bincount(self._octaves.bucket(v), minlength=self._counts.size)
        total = float(v.sum())
        self._add(add, total, v)
        if also is not None:
            also._add(add, total, v)

    def _add(self, add: np.ndarray, total: float, v: np.ndarray) -> None:
        """Add bucket counts `add` (summing to `total`) of the values `v` (float64)."""
        tail = v[-self._reservoir :] if self._reservoir else v[:0]
        with self._lock:
            self._counts += add
            self._sum += total
            if tail.size:
                n, cap = tail.size, self._ring.size
                start = self._ring_pos % cap
                first = min(n, cap - start)
                self._ring[start : start + first] = tail[:first]
                self._ring[: n - first] = tail[first:]
                self._ring_pos += n

    def _observe_few(self, values: list) -> None:
        bounds, counts, ring = self._bounds_list, self._counts, self._ring
        slots = [bisect.bisect_left(bounds, x) for x in values]
        total = float(sum(values))
        cap = ring.size
        with self._lock:
            for i in slots:
                counts[i] += 1
            self._sum += total
            pos = self._ring_pos
            for x in values:
                ring[pos % cap] = x
                pos += 1
            self._ring_pos = pos

    def observe(self, value: float) -> None:
        self.observe_many(np.array([value], dtype=np.float64))

    def snapshot(self) -> tuple[np.ndarray, float, int]:
        """(per-bucket counts incl. +Inf, sum, count) — a consistent copy."""
        with self._lock:
            counts = self._counts.copy()
            return counts, self._sum, int(counts.sum())

    @property
    def count(self) -> int:
        with self._lock:
            return int(self._counts.sum())

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100) estimated from the buckets, interpolated linearly inside the
        bucket; the top bound if it falls in +Inf; 0.0 when empty."""
        counts, _, n = self.snapshot()
        if n == 0:
            return 0.0
        rank = q / 100.0 * n
        cum = np.cumsum(counts)
        i = int(np.searchsorted(cum, rank, side="left"))
        if i >= self.bounds.size:
            return float(self.bounds[-1])
        lo = 0.0 if i == 0 else float(self.bounds[i - 1])
        hi = float(self.bounds[i])
        before = 0 if i == 0 else int(cum[i - 1])
        inside = int(counts[i])
        frac = (rank - before) / inside if inside else 1.0
        return lo + (hi - lo) * min(max(frac, 0.0), 1.0)

    def recent(self) -> np.ndarray:
        """The reservoir: up to `reservoir` most recent values (unordered)."""
        with self._lock:
            return self._ring[: min(self._ring_pos, self._ring.size)].copy()

    def recent_percentile(self, q: float) -> float:
        """Exact q-th percentile (0..100) over the reservoir; 0.0 when empty."""
        r = self.recent()
        return float(np.percentile(r, q)) if r.size else 0.0

    def percentiles(self) -> dict[str, float]:
        """p50/p99/p999 from the buckets and (suffix _recent) exact over the reservoir."""
        out = {f"p{k}": self.percentile(q) for k, q in (("50", 50), ("99", 99), ("999", 99.9))}
        r = self.recent()
        for k, q in (("50", 50), ("99", 99), ("999", 99.9)):
            out[f"p{k}_recent"] = float(np.percentile(r, q)) if r.size else 0.0
        return out
