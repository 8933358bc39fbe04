"""Turning flow outputs and dead letters into engine records (core/records.py layout).

Outputs get the event id their origin gives them (ids.py), the producer timestamp = the output's event
time, and no ACK flags (nobody waits for an ACK of a flow output: the flow waits for `stored` itself).
A payload larger than records.payload_bytes goes to the payload arena like a large ingest payload; if
there is no arena (or it is full for longer than the caller waits) the output cannot be written.
"""

from __future__ import annotations

import time

import numpy as np

from eventstream.core.records import HEADER_BYTES


def build(
    dtype: np.dtype,
    topic_id: int | np.ndarray,
    payloads: list[bytes],
    event_ids: np.ndarray,
    ts: np.ndarray,
    priority: int,
    arena=None,
) -> np.ndarray:
    """Records for `payloads` (inline, or in `arena` when larger than the inline capacity)."""
    n = len(payloads)
    rec = np.zeros(n, dtype=dtype)
    if n == 0:
        return rec
    cap = dtype.itemsize - HEADER_BYTES
    rec["event_id"] = event_ids
    rec["producer_ts"] = np.maximum(ts, 0).astype(np.uint64)
    rec["ingest_ts"] = time.monotonic_ns()
    rec["topic_id"] = topic_id
    rec["priority"] = priority
    lens = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=n)
    rec["payload_len"] = lens
    big = lens > cap
    if cap:
        small = np.flatnonzero(~big & (lens > 0))
        if len(small):
            width = int(lens[small].max())
            block = np.zeros((len(small), width), dtype=np.uint8)
            for j, i in enumerate(small.tolist()):
                p = payloads[i]
                block[j, : len(p)] = np.frombuffer(p, dtype=np.uint8)
            rec["payload"][small, :width] = block
    if big.any():
        idx = np.flatnonzero(big)
        if arena is None:
            raise ValueError(
                f"a flow output of {int(lens[idx[0]])} bytes exceeds records.payload_bytes={cap} "
                "and there is no payload arena; allowed: outputs of at most records.payload_bytes"
            )
        offs, cls = arena.claim(lens[idx])
        if len(offs) < len(idx):
            arena.release(offs, cls)
            raise BufferError("payload arena full")
        rec["ext_off"][idx] = offs
        rec["ext_class"][idx] = cls
        rec["ext_arena"][idx] = arena.id
        dst = memoryview(arena.buf)
        for o, i in zip(offs.tolist(), idx.tolist(), strict=True):
            p = payloads[i]
            dst[o : o + len(p)] = p
        dst.release()
    return rec
