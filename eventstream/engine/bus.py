"""EventBusMulti: the three processor queues and the routing table from priority to queue.

    priority        queue           ring                     default overflow
    CRITICAL, HIGH  realtime        SpscRing (1 partition)   DROP_OLD
    MEDIUM          transactional   MpscRing x partitions    BLOCK_PRODUCER
    LOW, BATCH      batch           MpscRing x partitions    DROP_NEW

The dispatcher is the only producer. Transactional and batch queues are split into `max_workers`
partitions by topic id (topic_id % partitions), so every topic lives in exactly one ring. Workers share
partitions through a per-partition ownership token: a worker try-acquires a partition's token, drains
one batch, processes it completely, then gives the token back. At most one worker consumes a partition
at a time (the rings keep their single-consumer contract), per-topic order is kept, and the manager
can add a worker at any moment without reassigning anything. The token is taken once per batch, never
per event, and never inside a ring operation.
"""

from __future__ import annotations

import threading

import numpy as np

from eventstream.config import Config, QueueConfig
from eventstream.core.records import Priority
from eventstream.core.ring import MpscRing, Overflow, SpscRing

QUEUE_NAMES = ("realtime", "transactional", "batch")
REALTIME, TRANSACTIONAL, BATCH = 0, 1, 2

# priority value -> queue index
ROUTE = np.zeros(len(Priority), dtype=np.uint8)
ROUTE[Priority.CRITICAL] = REALTIME
ROUTE[Priority.HIGH] = REALTIME
ROUTE[Priority.MEDIUM] = TRANSACTIONAL
ROUTE[Priority.LOW] = BATCH
ROUTE[Priority.BATCH] = BATCH


class Queue:
    """One logical queue: its partition rings and their ownership tokens."""

    def __init__(self, name: str, rings: list, overflow: Overflow):
        self.name = name
        self.rings = rings
        self.tokens = [threading.Lock() for _ in rings]
        self.overflow = overflow

    @property
    def partitions(self) -> int:
        return len(self.rings)

    @property
    def depth(self) -> int:
        return sum(r.depth for r in self.rings)

    @property
    def capacity(self) -> int:
        return sum(r.capacity for r in self.rings)

    def statistics(self) -> dict:
        total: dict[str, int] = {}
        for r in self.rings:
            for k, v in r.statistics().items():
                total[k] = total.get(k, 0) + int(v)
        return total

    def close(self) -> None:
        for r in self.rings:
            r.close()


def _ring(kind, qc: QueueConfig, dtype, wait: str, node: int, name: str):
    return kind(qc.capacity, dtype, overflow=Overflow[qc.overflow], block_timeout=qc.block_timeout_ms / 1000.0,
                wait=wait, node=node, name=name)


class EventBusMulti:
    def __init__(self, cfg: Config, dtype: np.dtype):
        q, node, wait = cfg.queues, cfg.numa.node, cfg.queues.wait_strategy
        self.queues: list[Queue] = []
        try:
            self.queues.append(Queue("realtime", [_ring(SpscRing, q.realtime, dtype, wait, node, "realtime")],
                                     Overflow[q.realtime.overflow]))
            for name, qc, workers in (("transactional", q.transactional, cfg.processors.transactional.max_workers),
                                      ("batch", q.batch, cfg.processors.batch.max_workers)):
                rings = [_ring(MpscRing, qc, dtype, wait, node, f"{name}.{i}") for i in range(workers)]
                self.queues.append(Queue(name, rings, Overflow[qc.overflow]))
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Queue:
        return self.queues[QUEUE_NAMES.index(name)]

    def publish(self, records: np.ndarray) -> list[tuple[np.ndarray, str]]:
        """Route a batch by priority (and topic partition). Returns (records, reason) for whatever the
        queues refused under their overflow policy; nothing is dropped silently."""
        refused: list[tuple[np.ndarray, str]] = []
        if len(records) == 0:
            return refused
        qidx = ROUTE[records["priority"]]
        lo, hi = int(qidx.min()), int(qidx.max())
        for qi in range(lo, hi + 1):
            queue = self.queues[qi]
            sel = records if lo == hi else records[qidx == qi]  # one queue: no mask, no copy
            if len(sel) == 0:
                continue
            if queue.partitions == 1:
                parts = [(queue.rings[0], sel)]
            else:
                pidx = sel["topic_id"] % queue.partitions
                p0 = int(pidx[0])
                if len(sel) == 1 or (pidx == p0).all():
                    parts = [(queue.rings[p0], sel)]
                else:
                    parts = [(queue.rings[p], sel[pidx == p]) for p in range(queue.partitions)]
            for ring, sub in parts:
                if len(sub) == 0:
                    continue
                dropped = ring.put_batch(sub)
                if len(dropped):
                    kind = "timeout" if queue.overflow is Overflow.BLOCK_PRODUCER else "overflow"
                    refused.append((dropped, f"{kind}:{queue.name}"))
        return refused

    def depths(self) -> dict[str, int]:
        return {q.name: q.depth for q in self.queues}

    @property
    def depth(self) -> int:
        return sum(q.depth for q in self.queues)

    def close(self) -> None:
        for q in self.queues:
            q.close()
