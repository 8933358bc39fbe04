"""A real Engine for ingest, client and connector tests: servers offer to it (`Engine.offer`, the
production path: admission, the queues, holding, completion marks, ACKs on `stored`) and the tests
read back what it stored in events.bin.

    sink = EngineSink(tmp_path)               # opened and started; close() at the end
    srv = TcpServer(cfg, sink.engine, sink.engine.topics, **sink.server_kwargs()).start()
    sink.follow(srv)                          # ACK writers wake on `stored`, as service.py wires them
    sink.wait_for(10, 10.0); sink.records()["event_id"]; sink.payloads()

`gate()` makes every handler wait until the returned Event is set: records are then accepted (in the
rings) but not stored, so nothing is ACKed and, once the small rings are full, TCP holds the rest.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np

from eventstream.config import load_config
from eventstream.engine.engine import Engine
from eventstream.metrics.registry import MetricsRegistry
from eventstream.storage.reader import EventLogReader, StoredBatch

_dirs = itertools.count()


class EngineSink:
    def __init__(
        self,
        tmp: Path,
        *,
        payload_bytes: int = 448,
        capacity: int = 1024,
        gated: bool = False,
        handlers: dict | None = None,
        **overrides,
    ):
        """`capacity`: each queue's ring (a power of two); `handlers`: tier -> handler (as Service takes them);
        `overrides`: config keys (dotted)."""
        self.data = Path(tmp) / f"engine-sink-{next(_dirs)}"
        keys = {
            "records.payload_bytes": payload_bytes,
            "storage.data_dir": str(self.data),
            "metrics.enabled": False,
            "queues.realtime.capacity": capacity,
            "queues.transactional.capacity": capacity,
            "queues.batch.capacity": capacity,
            "processors.transactional.retry_backoff_ms": 1.0,
        }
        if gated:  # the realtime lane would run the gated handler on the reader thread itself
            keys["processors.realtime.inline"] = False
        keys.update(overrides)
        self.cfg = load_config(environ={}, overrides=keys)
        self.release = threading.Event()
        if not gated:
            self.release.set()
        if gated:
            handlers = {tier: self._gated for tier in ("realtime", "transactional", "batch")}
        self.engine = Engine(self.cfg, MetricsRegistry(), handlers=handlers)
        try:
            self.engine.open().start()
        except BaseException:
            self.engine.close()
            raise
        self._cond = threading.Condition()
        self.engine.stored.follow(self._advanced, self)
        self._closed = False

    def _gated(self, batch) -> None:
        self.release.wait(60.0)

    def _advanced(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- wiring ---------------------------------------------------------------------------------------
    def server_kwargs(self) -> dict:
        """What service.py gives an ingest server besides the engine and its topics."""
        e = self.engine
        return {"on_reject": e.reject, "payload_bytes": self.cfg.records.payload_bytes, "payloads": e.payloads}

    def follow(self, server) -> None:
        """An ingest server's ACK writers wake after every advance of `stored` (service.py does this)."""
        progress = getattr(server, "progress", None)
        if progress is not None:
            self.engine.stored.follow(progress)

    @property
    def admission(self):
        """The engine's admission (what the control plane sets): paused, min_priority, ..."""
        return self.engine.admission

    # -- what was stored -------------------------------------------------------------------------------
    def stored(self) -> StoredBatch:
        path = self.data / self.cfg.storage.events_file
        return EventLogReader(path).read()

    def records(self) -> np.ndarray:
        """Every stored record, in the order stored (file topic ids)."""
        return self.stored().records

    def payloads(self) -> list[bytes]:
        return self.stored().payloads()

    @property
    def count(self) -> int:
        return len(self.stored())

    def wait_for(self, n: int, timeout: float) -> bool:
        """True once at least `n` records are stored; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))  # woken by every advance; the slice bounds a missed one
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.release.set()
        self.engine.stored.unfollow(self)
        finished = self.engine.stop(drain=True, timeout=30.0)
        self.engine.close(finished)
