"""Admission: the engine's backpressure signals as plain attributes, and the rejection record.

The control thread writes the attributes; ingest readers only read them (a plain attribute read is
atomic on free-threaded CPython and costs nothing compared with a lock or an atomics call). A reader
may act on a value one batch late; that is fine for flow control.

* ``min_priority``: UDP events with a lower priority are not admitted now: UDP, which has no flow
  control, sheds them with reason "backpressure" (counted in backpressure_drops, sent to on_reject
  for the dead-letter log), so queue room is left for what matters.
* ``tcp_min_priority``: TCP events with a lower priority are not admitted now: TCP readers hold them
  (and stop reading that connection until they are admitted: TCP flow control pushes the client
  back, nothing is dropped). Full queues push TCP clients back by themselves, tier by tier, so the
  control plane sets this only at its last level (only CRITICAL admitted).
* ``paused``: as min_priority 4 (only CRITICAL admitted), with reason "paused" on UDP. The service's
  control plane uses min_priority; `paused` is kept for embedders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from eventstream.core.records import PRIORITY_NAMES

REASON_BACKPRESSURE = "backpressure"
REASON_PAUSED = "paused"


class Admission:
    """Signals from the control thread to ingest readers (plain attributes; see module docstring)."""

    def __init__(self, *, paused: bool = False, min_priority: int = 0, tcp_min_priority: int = 0):
        self.paused = paused
        self.min_priority = min_priority
        self.tcp_min_priority = tcp_min_priority

    def __repr__(self) -> str:
        return (
            f"Admission(paused={self.paused}, min_priority={self.min_priority}, "
            f"tcp_min_priority={self.tcp_min_priority})"
        )


class Rejection(NamedTuple):
    """A frame that did not decode (content or framing error), with what could be parsed."""

    conn_id: int
    # index and count shadow tuple.index() and tuple.count(): read as attributes, never called
    index: int  # type: ignore[assignment]  # 1-based frame number on the connection (or UDP socket)
    event_id: int
    topic: str
    priority: int  # -1 = not parsed
    reason: str
    fatal: bool = False
    version: int = 0
    # frames this line stands for (a summary of rejects not reported one by one: more)
    count: int = 1  # type: ignore[assignment]


# on_reject(records, reason, rejections): records = decoded records refused as a group (reason says
# why: "backpressure", "paused", or "sink full"), None when there are none; rejections = frames that
# failed to decode. Called once per batch by the reader thread that saw them; must not block long.
RejectCallback = Callable[[np.ndarray | None, str, list[Rejection]], None]


def dead_letter_lines(
    records: np.ndarray | None, reason: str, rejections: list[Rejection], topic_names: Callable[[np.ndarray], list[str]]
) -> list[str]:
    """Dead-letter log lines ``id=<id> topic=<topic> priority=<n> reason=<reason>`` for one callback.

    `topic_names` is TopicTable.names. Records without an idempotency key (v1) show id=0.
    """
    lines = []
    if records is not None and len(records):
        names = topic_names(records["topic_id"])
        for eid, topic, prio in zip(records["event_id"].tolist(), names, records["priority"].tolist(), strict=True):
            lines.append(f"id={eid} topic={topic} priority={prio} reason={reason}")
    for r in rejections:
        lines.append(f"id={r.event_id} topic={r.topic} priority={r.priority} reason={r.reason}")
    return lines


def priority_name(p: int) -> str:
    return PRIORITY_NAMES[p] if 0 <= p < len(PRIORITY_NAMES) else str(p)
