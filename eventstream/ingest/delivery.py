"""Hand decoded batches to the engine: placement, holding, shedding, counters, NACKs.

Shared by the TCP readers and the UDP reader. Each reader thread owns one IngestStats and is its only
writer; statistics() sums them (plain int reads, no locks on the hot path).

The sink is the engine: ``offer(records, stamp=, shed_all=) -> Offer`` (engine/engine.py: the control
plane's admission, then the processor queues, without waiting; completion marks come back) and its
``admission`` (what the readers ask before offering held records again).

TCP never sheds what the engine could take later: records the queues cannot take now, or that the
control plane does not admit now, are *held* by the reader (which stops reading that connection, so
TCP flow control pushes back on the client) and offered again later. Only a queue configured to shed
(DROP_NEW) refuses them at the edge (NACK + dead-letter log). UDP has no flow control: there the
same cases are shed, counted and dead-lettered.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import structlog

from eventstream.core.payloads import release_records
from eventstream.ingest.admission import Rejection
from eventstream.protocol.decoder import FrameError
from eventstream.protocol.frames import encode_nack, encode_nacks

log = structlog.get_logger("eventstream.ingest")


class IngestStats:
    """Counters of one reader thread (single writer)."""

    __slots__ = (
        "frames_accepted",
        "frames_rejected",
        "backpressure_drops",
        "bytes_received",
        "connections_closed",
        "datagrams",
        "datagrams_bad",
        "holds",
        "limit_closes",
    )

    def __init__(self):
        self.frames_accepted = 0
        self.frames_rejected: Counter[str] = Counter()
        self.backpressure_drops = 0
        self.bytes_received = 0
        self.connections_closed = 0
        self.datagrams = 0
        self.datagrams_bad = 0
        self.holds = 0  # times a connection's records were held (pushed back) instead of shed
        self.limit_closes: Counter[str] = Counter()  # connections closed for a limit (limits.CLOSE_REASONS)


def merge_stats(parts: list[IngestStats]) -> dict:
    rejected: Counter[str] = Counter()
    limited: Counter[str] = Counter()
    for p in parts:
        rejected.update(dict(p.frames_rejected))
        limited.update(dict(p.limit_closes))
    return {
        "frames_accepted": sum(p.frames_accepted for p in parts),
        "frames_rejected": dict(rejected),
        "backpressure_drops": sum(p.backpressure_drops for p in parts),
        "bytes_received": sum(p.bytes_received for p in parts),
        "holds": sum(p.holds for p in parts),
        "connections_limited": dict(limited),
    }


class Delivered:
    """Result of one `Delivery.deliver`: how many records went in, their completion marks, the
    records held back (with their frame indices) and the NACK bytes for what was refused."""

    __slots__ = ("accepted", "marks", "held", "held_indices", "nacks", "blocked")

    def __init__(self, accepted: int, marks: list, held, held_indices, nacks: bytes, blocked=()):
        self.accepted = accepted
        self.marks = marks
        self.held = held
        self.held_indices = held_indices
        self.nacks = nacks
        self.blocked = blocked  # full rings that held records back (empty: admission, or unknown)


class Delivery:
    """Deliver decoded batches of one reader thread to the sink."""

    def __init__(self, sink, on_reject, stats: IngestStats, *, udp: bool = False):
        self.sink = sink
        self.admission = sink.admission  # the control plane's level (set by engine/levels.py)
        self.on_reject = on_reject
        self.stats = stats
        self.udp = udp
        self._offer = sink.offer
        # priorities whose frames a read offers before the rest of it is decoded (256 bytes, non-zero
        # at those: the engine's realtime queue, whose lane may run on the reader); None: read order
        self.urgent: bytes | None = None if udp else getattr(sink, "realtime_priorities", None)

    def admitted_below(self) -> int:
        """First priority the control plane admits now (0 = all; paused: only CRITICAL). UDP sheds
        below `min_priority`; TCP holds below `tcp_min_priority` (full queues push TCP back anyway)."""
        adm = self.admission
        if adm.paused:
            return 4
        return adm.min_priority if self.udp else adm.tcp_min_priority

    def deliver(
        self,
        records: np.ndarray,
        indices: np.ndarray,
        errors: list[FrameError],
        conn_id: int,
        *,
        want_nacks: bool,
        retry: bool = False,
        report_errors: int | None = None,
    ) -> Delivered:
        """Offer `records` (frame `indices`); TCP holds what cannot go in now, UDP sheds it.

        `retry`: these are held records offered again (already stamped, already counted).
        `report_errors`: how many of `errors` go to on_reject one by one (the rest are counted and
        NACKed, and summarised later by report_suppressed; None = all)."""
        stats = self.stats
        dropped: list[tuple[np.ndarray, np.ndarray, str]] = []  # (records, indices, reason)
        marks: list = []
        blocked: list = []
        held = held_idx = None
        accepted = 0
        if len(records):
            try:
                off = self._offer(records, stamp=not retry, shed_all=self.udp)
            except Exception as exc:  # noqa: BLE001 - a broken sink must not kill the reader
                log.error("sink_failed", error=repr(exc), records=len(records))
                off = None
                dropped.append((records, indices, "sink_failed"))
            if off is not None and off.held is None and not off.refused and not errors:  # all went in (the usual)
                stats.frames_accepted += off.placed
                return Delivered(off.placed, off.marks, None, None, b"")
            if off is not None:
                accepted = off.placed
                marks = off.marks
                for pos, reason in off.refused:
                    dropped.append((records[pos], indices[pos], reason))
                if off.held is not None:
                    held, held_idx = records[off.held], indices[off.held]
                blocked = off.blocked
            if held is not None and not retry:  # a retry still held is the same hold going on
                stats.holds += 1
            stats.frames_accepted += accepted
        for recs, _idx, reason in dropped:
            stats.backpressure_drops += len(recs)
            stats.frames_rejected[reason] += len(recs)
        for e in errors:
            stats.frames_rejected[e.error_class] += 1
        reported = errors if report_errors is None else errors[:report_errors]
        if (dropped or reported) and self.on_reject is not None:
            self._report(dropped, reported, conn_id)
        for recs, _idx, _reason in dropped:  # dead-lettered (their payloads copied out): slots back
            release_records(recs)
        nacks = _nacks(dropped, errors) if want_nacks and (dropped or errors) else b""
        return Delivered(accepted, marks, held, held_idx, nacks, blocked)

    def report_suppressed(self, conn_id: int, n: int, limit_key: str, limit: int) -> None:
        """One summary line for `n` rejected frames not reported one by one (limits.RejectMeter)."""
        if not n or self.on_reject is None:
            return
        what = f"connection {conn_id}" if not self.udp else "the UDP socket"
        reason = (
            f"rejects_limited: {n} more rejected frames from {what} within one second, not written "
            f"one by one ({limit_key}={limit})"
        )
        try:
            self.on_reject(None, "", [Rejection(conn_id, 0, 0, "", -1, reason, False, 0, n)])
        except Exception as exc:  # noqa: BLE001 - a failing reject hook must not kill the reader
            log.error("on_reject_failed", error=repr(exc))

    def _report(self, dropped, errors, conn_id) -> None:
        rejections = [
            Rejection(conn_id, e.index, e.event_id, e.topic, e.priority, e.reason, e.fatal, e.version) for e in errors
        ]
        try:
            if not dropped:
                self.on_reject(None, "", rejections)
            for k, (recs, _idx, reason) in enumerate(dropped):
                self.on_reject(recs, reason, rejections if k == 0 else [])
        except Exception as exc:  # noqa: BLE001 - a failing reject hook must not kill the reader
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
