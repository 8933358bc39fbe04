"""The sequencer: how producers claim ring slots and make them visible to the consumer.

Sequences are 64-bit counters that only grow; slot = sequence & mask. A producer may claim sequence
`s` only when `s < lowest + capacity`, where `lowest` is the oldest sequence the consumer still needs
(the ring's release cursor). A whole batch is claimed with one atomic operation.

MultiProducerSequencer (Disruptor's MultiProducerSequencer): producers claim with a CAS on the claim
cell (a CAS instead of fetch-add, so a producer never claims slots that are not free and a full ring
can refuse without rolling back). A batch is published by writing its round number (sequence >>
log2(capacity)) into a per-slot availability marker with numpy slice assignment; the consumer accepts
the contiguous prefix whose markers carry the expected round. Producers therefore publish
independently and out of order without any further atomic operation.

Memory ordering of the marker protocol: records are written (one numpy copy), then markers (a second
numpy fill, a separate call the compiler cannot reorder across). On x86 (TSO) stores become visible
in program order and loads are not reordered with older loads, so a consumer that sees the marker sees
the record. On other architectures a full fence (an atomic RMW) is issued between the two writes.
"""

from __future__ import annotations

import platform

import numpy as np

from eventstream.core import atomic

_TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


class MultiProducerSequencer:
    """Several producer threads: CAS on the claim cell + per-slot round markers."""

    def __init__(self, capacity: int, claim: atomic.Cell, markers: np.ndarray, fence: atomic.Cell):
        self.capacity = capacity
        self.mask = capacity - 1
        self.shift = capacity.bit_length() - 1
        self.claim_cell = claim
        self.markers = markers  # int64 per slot: round of the last published sequence there
        markers[:] = -1
        self._fence = fence
        self._hint = claim.load()  # shared hint: some past value of the claim cell (never ahead)

    def claim(self, want: int, limit: int) -> tuple[int, int]:
        cur = self._hint
        cas = atomic.cas
        addr = self.claim_cell.address
        while True:
            k = min(want, limit - cur)
            if k <= 0:
                return cur, 0
            ok, seen = cas(addr, cur, cur + k)
            if ok:
                self._hint = cur + k
                return cur, k
            cur = seen

    def claim_all(self, n: int, limit: int) -> int:
        """Claim exactly `n` sequences below `limit` with one CAS: the first one, or -1."""
        cur = self._hint
        cas = atomic.cas
        addr = self.claim_cell.address
        while n > 0 and cur + n <= limit:
            ok, seen = cas(addr, cur, cur + n)
            if ok:
                self._hint = cur + n
                return cur
            cur = seen
        return -1

    def publish(self, start: int, k: int) -> None:
        if not _TSO:
            self._fence.fetch_add(0)
        idx = start & self.mask
        rnd = start >> self.shift
        first = min(k, self.capacity - idx)
        self.markers[idx : idx + first] = rnd
        if k > first:
            self.markers[: k - first] = rnd + 1

    def claim_position(self) -> int:
        return self.claim_cell.load()

    def _published_prefix(self, lo: int, limit: int) -> int:
        if limit <= 0:
            return 0
        idx = lo & self.mask
        rnd = lo >> self.shift
        first = min(limit, self.capacity - idx)
        ok = self.markers[idx : idx + first] == rnd
        j = int(ok.argmin())
        if not ok[j]:
            return j
        if limit == first:
            return first
        ok = self.markers[: limit - first] == rnd + 1
        j = int(ok.argmin())
        n = first + (j if not ok[j] else limit - first)
        if not _TSO:
            self._fence.load()
        return n

    def consumer_available(self, lo: int, limit: int, cs) -> int:
        if cs.seen - lo < limit:
            cs.seen = self.claim_cell.load(atomic.ACQUIRE)
        return self._published_prefix(lo, min(limit, cs.seen - lo))
