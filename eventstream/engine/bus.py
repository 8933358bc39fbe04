"""EventBusMulti: the three processor queues and the routing table from priority to queue.

    priority        queue           ring                     default overflow
    CRITICAL, HIGH  realtime        MpscRing (1 partition)   BLOCK_PRODUCER
    MEDIUM          transactional   MpscRing x partitions    BLOCK_PRODUCER
    LOW, BATCH      batch           MpscRing x partitions    BLOCK_PRODUCER

Ingest readers are the producers: `offer()` routes a decoded batch straight into the queues (no
dispatcher thread between them), so a CRITICAL event never waits behind bulk traffic in a shared
ingest queue. A partition with a lane (`Queue.lanes`, caller runs: Processor.run_inline) whose ring
is idle has its records handled on the offering thread instead of queued. `offer()` never waits:
what does not fit is handed back to the reader, which holds it
and stops reading that connection until there is room (TCP flow control pushes back on the
client); a queue configured DROP_NEW sheds it at the edge instead (NACK + dead-letter log).
Each placement comes back as a completion mark (ring, end): every record of the batch is handled
and stored once `ring.completed() >= end` for each mark; ACK watermarks are built from those.

Transactional and batch queues are split into `max_workers`
partitions by topic id (topic_id % partitions), so every topic lives in exactly one ring. Workers share
partitions through a per-partition ownership token: a worker try-acquires a partition's token, drains
one batch, processes it completely, then gives the token back. At most one worker consumes a partition
at a time (the rings keep their single-consumer contract), per-topic order is kept, and the manager
can add a worker at any moment without reassigning anything. The token is taken once per batch, never
per event, and never inside a ring operation.
"""

from __future__ import annotations

import enum
import threading
import time

import numpy as np

from eventstream.config import Config, QueueConfig
from eventstream.core.arena import memory_node
from eventstream.core.records import SMALL_BATCH, Priority
from eventstream.core.ring import MpscRing
from eventstream.core.wait import Blocking, make_wait

QUEUE_NAMES = ("realtime", "transactional", "batch")
REALTIME, TRANSACTIONAL, BATCH = 0, 1, 2

# priority value -> queue index
ROUTE = np.zeros(len(Priority), dtype=np.uint8)
ROUTE[Priority.CRITICAL] = REALTIME
ROUTE[Priority.HIGH] = REALTIME
ROUTE[Priority.MEDIUM] = TRANSACTIONAL
ROUTE[Priority.LOW] = BATCH
ROUTE[Priority.BATCH] = BATCH
_ROUTE = ROUTE.tolist()


class Overflow(enum.Enum):
    """A queue's policy when its ring is full: hold the rest at the edge (TCP pushes back on its
    client) or shed it there (refused with a NACK, counted)."""

    BLOCK_PRODUCER = "BLOCK_PRODUCER"
    DROP_NEW = "DROP_NEW"


def partition_of(topic_ids, partitions: int):
    """The partition rule, the one place it is written: a topic lives in exactly one partition of
    its queue (per-topic order; idempotency.rebuild finds a topic's dedup table with it too)."""
    return topic_ids % partitions


SMALL = SMALL_BATCH  # up to this many records, routing uses plain ints (core/records.py)


def sequence_base() -> int:
    """First server sequence number of this run: boot time in the high 32 bits, so sequence numbers
    (the ids of v1 events) stay unique across restarts."""
    return (int(time.time()) & 0x7FFFFFFF) << 32


class Queue:
    """One logical queue: its partition rings and their ownership tokens."""

    def __init__(self, name: str, rings: list, overflow: Overflow, wait=None):
        self.name = name
        self.rings = rings
        self.tokens = [threading.Lock() for _ in rings]
        self.overflow = overflow
        self.wait = wait  # the wait strategy all its rings share: a publish to any partition wakes it
        self.partition_of = {id(r): i for i, r in enumerate(rings)}
        # caller runs: per partition, a processor that handles records on the offering thread when
        # the partition is idle (Processor.run_inline; None = always queue); set by the service
        self.lanes: list = [None] * len(rings)

    @property
    def partitions(self) -> int:
        return len(self.rings)

    @property
    def depth(self) -> int:
        return sum(r.depth for r in self.rings)

    def has_work(self) -> bool:
        """Any partition holds records (stops at the first: cheaper than depth)."""
        return any(r.depth for r in self.rings)

    @property
    def capacity(self) -> int:
        return sum(r.capacity for r in self.rings)

    def close(self) -> None:
        for r in self.rings:
            r.close()


def _ring(qc: QueueConfig, dtype, wait, node: int, name: str) -> MpscRing:
    if qc.overflow not in Overflow.__members__:
        raise ValueError(
            f"queues.{name.split('.')[0]}.overflow: {qc.overflow!r} is not allowed (DROP_OLD would evict "
            "events already accepted); allowed: BLOCK_PRODUCER (push back), DROP_NEW (shed at the edge)"
        )
    return MpscRing(qc.capacity, dtype, wait=wait, node=node, name=name)


class Offer:
    """What `EventBusMulti.offer` did with a batch: completion marks (ring, end) of what went in,
    positions (into the offered batch, ascending) of records it could not place now (None when all
    were placed), and positions a shedding queue refused, as (positions, reason)."""

    __slots__ = ("marks", "held", "refused", "placed", "blocked")

    def __init__(self):
        self.marks: list[tuple[object, int]] = []
        self.held: np.ndarray | None = None
        self.refused: list[tuple[np.ndarray, str]] = []
        self.placed = 0
        self.blocked: list = []  # the rings that were full (why `held` is not None)


class EventBusMulti:
    def __init__(self, cfg: Config, dtype: np.dtype, *, seq_base: int = 0):
        q, node = cfg.queues, memory_node(cfg.numa.node, cfg.numa.bind_memory)
        self.queues: list[Queue] = []
        self.dtype = np.dtype(dtype)
        self._seq_lock = threading.Lock()
        self._next_seq = seq_base
        self.received = 0  # events placed in the queues (metrics: events_received reads it at scrape time)
        try:
            for name, qc, parts in (
                ("realtime", q.realtime, 1),
                ("transactional", q.transactional, cfg.processors.transactional.max_workers),
                ("batch", q.batch, cfg.processors.batch.max_workers),
            ):
                # one wait strategy per queue, shared by its partitions: a publish to any of them wakes
                # the queue's idle workers. Few spins: an idle worker should park, not burn a core.
                wait = Blocking(spins=4, yields=1) if q.wait_strategy == "block" else make_wait(q.wait_strategy)
                rings = [_ring(qc, dtype, wait, node, name if parts == 1 else f"{name}.{i}") for i in range(parts)]
                self.queues.append(Queue(name, rings, Overflow[qc.overflow], wait))
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Queue:
        return self.queues[QUEUE_NAMES.index(name)]

    def stamp(self, records: np.ndarray) -> None:
        """Server sequence numbers for a batch (one lock per batch; unique per engine run)."""
        n = len(records)
        with self._seq_lock:
            first = self._next_seq
            self._next_seq = first + n
        records["seq"] = first if n == 1 else np.arange(first, first + n, dtype=np.uint64)

    def _split(self, records: np.ndarray):
        """(queue, ring, selection) per destination; selection is None for 'all of records'."""
        if len(records) <= SMALL:
            return self._split_small(records)
        return self._split_many(records)

    def _split_small(self, records: np.ndarray) -> list:
        """_split for a few records with plain ints (the common read at low load is one event)."""
        queues = self.queues
        if len(records) == 1:  # the usual read at low load: one event, one destination
            queue = queues[_ROUTE[int(records["priority"][0])]]
            return [(queue, queue.rings[partition_of(int(records["topic_id"][0]), queue.partitions)], None)]
        dest = []  # (queue index, partition) per record
        for prio, tid in zip(records["priority"].tolist(), records["topic_id"].tolist(), strict=True):
            q = _ROUTE[prio]
            dest.append((q, partition_of(tid, queues[q].partitions)))
        first = dest[0]
        if all(d == first for d in dest):
            queue = queues[first[0]]
            return [(queue, queue.rings[first[1]], None)]
        out = []
        for d in sorted(set(dest)):
            queue = queues[d[0]]
            out.append((queue, queue.rings[d[1]], np.array([i for i, x in enumerate(dest) if x == d], dtype=np.intp)))
        return out

    def _split_many(self, records: np.ndarray):
        qidx = ROUTE[records["priority"]]
        lo, hi = int(qidx.min()), int(qidx.max())
        for qi in range(lo, hi + 1):
            queue = self.queues[qi]
            sel = None if lo == hi else np.flatnonzero(qidx == qi)
            if sel is not None and len(sel) == 0:
                continue
            if queue.partitions == 1:
                yield queue, queue.rings[0], sel
                continue
            tids = records["topic_id"] if sel is None else records["topic_id"][sel]
            pidx = partition_of(tids, queue.partitions)
            p0 = int(pidx[0])
            if len(pidx) == 1 or (pidx == p0).all():
                yield queue, queue.rings[p0], sel
                continue
            base = np.arange(len(records)) if sel is None else sel
            for p in range(queue.partitions):
                sub = base[pidx == p]
                if len(sub):
                    yield queue, queue.rings[p], sub

    def offer(self, records: np.ndarray, *, stamp: bool = True, shed_all: bool = False) -> Offer:
        """Route a batch into the queues without waiting (see the module docstring), stamping server
        sequence numbers first unless `stamp` is False (a retry of held records). With `shed_all`
        (UDP: no flow control) whatever does not fit is refused instead of held."""
        out = Offer()
        n = len(records)
        if n == 0:
            return out
        if stamp:
            self.stamp(records)
        held: list[np.ndarray] = []
        for queue, ring, sel in self._split(records):
            sub = records if sel is None else records[sel]
            part = queue.partition_of[id(ring)]
            lane = queue.lanes[part]
            if lane is not None and lane.run_inline(sub, part):
                out.placed += len(sub)  # handled and stored already: complete, no mark
                continue
            k, end = ring.try_put(sub)
            if k:
                out.marks.append((ring, end))
                out.placed += k
            if k == len(sub):
                continue
            rest = np.arange(k, n) if sel is None else sel[k:]
            if shed_all or queue.overflow is Overflow.DROP_NEW:
                out.refused.append((rest, f"overflow:{queue.name}"))
            else:
                held.append(rest)
                out.blocked.append(ring)
        if held:
            out.held = held[0] if len(held) == 1 else np.sort(np.concatenate(held))
        if out.placed:  # received = taken in (not what a shedding queue refused or what is held)
            with self._seq_lock:
                self.received += out.placed
        return out

    def depths(self) -> dict[str, int]:
        return {q.name: q.depth for q in self.queues}

    @property
    def depth(self) -> int:
        return sum(q.depth for q in self.queues)

    def close(self) -> None:
        for q in self.queues:
            q.close()
