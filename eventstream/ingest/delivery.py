"""Hand decoded batches to the sink: admission, sink refusals, rejection callback, counters, NACKs.

Shared by the TCP readers and the UDP reader. Each reader thread owns one IngestStats and is its only
writer; statistics() sums them (plain int reads, no locks on the hot path).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import structlog

from eventstream.ingest.admission import REASON_BACKPRESSURE, REASON_PAUSED, Admission, Rejection
from eventstream.protocol.decoder import FrameError
from eventstream.protocol.frames import encode_nack, encode_nacks

log = structlog.get_logger("eventstream.ingest")

REASON_SINK_FULL = "backpressure: ingest queue full"
REASON_EVICTED = "evicted: ingest queue overflow (DROP_OLD)"


class IngestStats:
    """Counters of one reader thread (single writer)."""

    __slots__ = ("frames_accepted", "frames_rejected", "backpressure_drops", "bytes_received",
                 "connections_closed", "datagrams", "datagrams_bad")

    def __init__(self):
        self.frames_accepted = 0
        self.frames_rejected: Counter[str] = Counter()
        self.backpressure_drops = 0
        self.bytes_received = 0
        self.connections_closed = 0
        self.datagrams = 0
        self.datagrams_bad = 0


def merge_stats(parts: list[IngestStats]) -> dict:
    rejected: Counter[str] = Counter()
    for p in parts:
        rejected.update(dict(p.frames_rejected))
    return {
        "frames_accepted": sum(p.frames_accepted for p in parts),
        "frames_rejected": dict(rejected),
        "backpressure_drops": sum(p.backpressure_drops for p in parts),
        "bytes_received": sum(p.bytes_received for p in parts),
    }


class Delivery:
    """Deliver one decoded batch; returns (accepted count, NACK bytes in frame-index order)."""

    def __init__(self, sink, admission: Admission | None, on_reject, stats: IngestStats, *, udp: bool = False):
        self.sink = sink
        self.admission = admission if admission is not None else Admission()
        self.on_reject = on_reject
        self.stats = stats
        self.udp = udp

    def deliver(self, records: np.ndarray, indices: np.ndarray, errors: list[FrameError], conn_id: int,
                *, want_nacks: bool) -> tuple[int, bytes]:
        stats = self.stats
        dropped: list[tuple[np.ndarray, np.ndarray, str]] = []  # (records, indices, reason)
        if len(records):
            adm = self.admission
            if self.udp and adm.paused:
                dropped.append((records, indices, REASON_PAUSED))
                records = records[:0]
            else:
                refused = adm.refused_mask(records["priority"])
                if refused is not None:
                    dropped.append((records[refused], indices[refused], REASON_BACKPRESSURE))
                    keep = ~refused
                    records, indices = records[keep], indices[keep]
            if len(records):
                try:
                    left = self.sink.put_batch(records)
                except Exception as exc:  # a broken sink must not kill the reader
                    log.error("sink_failed", error=repr(exc), records=len(records))
                    left = records
                r = len(left) if left is not None else 0
                if r:
                    # Refused records of this batch are its tail (BLOCK_PRODUCER timeout / DROP_NEW). A
                    # DROP_OLD ring may also return older records it evicted: those were accepted and
                    # ACKed before, so they are reported to on_reject but never NACKed.
                    ours = (left["conn_id"] == conn_id) & (left["ingest_ts"] == records["ingest_ts"][0])
                    mine = int(ours.sum())
                    if mine != r:
                        evicted = left[~ours]
                        stats.frames_rejected[REASON_EVICTED] += len(evicted)
                        self._report_evicted(evicted)
                    r = mine
                if r:
                    dropped.append((records[len(records) - r:], indices[len(records) - r:], REASON_SINK_FULL))
                stats.frames_accepted += len(records) - r
                accepted = len(records) - r
            else:
                accepted = 0
        else:
            accepted = 0
        for recs, _idx, reason in dropped:
            stats.backpressure_drops += len(recs)
            stats.frames_rejected[reason] += len(recs)
        for e in errors:
            stats.frames_rejected[e.error_class] += 1
        if (dropped or errors) and self.on_reject is not None:
            self._report(dropped, errors, conn_id)
        if not want_nacks or not (dropped or errors):
            return accepted, b""
        return accepted, _nacks(dropped, errors)

    def _report_evicted(self, evicted: np.ndarray) -> None:
        if self.on_reject is not None:
            try:
                self.on_reject(evicted, REASON_EVICTED, [])
            except Exception as exc:
                log.error("on_reject_failed", error=repr(exc))

    def _report(self, dropped, errors, conn_id) -> None:
        rejections = [Rejection(conn_id, e.index, e.event_id, e.topic, e.priority, e.reason, e.fatal, e.version)
                      for e in errors]
        try:
            if not dropped:
                self.on_reject(None, "", rejections)
            for k, (recs, _idx, reason) in enumerate(dropped):
                self.on_reject(recs, reason, rejections if k == 0 else [])
        except Exception as exc:
            log.error("on_reject_failed", error=repr(exc))


def _nacks(dropped, errors) -> bytes:
    """NACK frames sorted by frame index (clients rely on the order, see docs/protocol.md)."""
    if len(dropped) == 1 and not errors:
        return encode_nacks(dropped[0][1], dropped[0][2])
    items = [(e.index, encode_nack(e.index, e.reason)) for e in errors]
    for _recs, idx, reason in dropped:
        items.extend((i, encode_nack(i, reason)) for i in idx.tolist())
    items.sort(key=lambda t: t[0])
    return b"".join(b for _i, b in items)
