"""`Engine.stored`: the one sequence barrier every follower of "stored" waits on.

Disruptor style: the sequences are the rings' `completed()` counts (a ring's records up to
`completed()` are handled and stored, or dead-lettered, and released); an offer returns completion
marks `(ring, end)`, and a batch is stored once every one of its marks is passed (`done`). Processors
call `advance()` after each release (and a lane after each batch it stored on the offering thread):
one wake-up fan-out to every follower. Followers are ACK writers (TCP readers), subscribe tails,
flows and the NATS sink (they then read events.bin), the NATS source (JetStream acks) and anything
waiting in `wait`.

A follower's wake-up must be cheap and never block (set an Event, write a wake byte, schedule a
call on an event loop): it runs on the processor thread, between two batches. Followers are kept in
a copy-on-write tuple, so `advance` reads one attribute and takes no lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable


def done(marks: Iterable) -> bool:
    """Every completion mark (ring, end) is passed: those records are stored (or dead-lettered)."""
    return all(ring.completed() >= end for ring, end in marks)


class Stored:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[object, Callable[[], None]] = {}
        self._wakes: tuple[Callable[[], None], ...] = ()
        self.advances = 0  # releases seen (a statistic; single writers per processor, approximate)

    def advance(self) -> None:
        """Sequences moved: wake every follower (processor and lane threads, after each release)."""
        self.advances += 1
        for wake in self._wakes:
            wake()

    def follow(self, wake: Callable[[], None], key: object = None) -> None:
        """Call `wake()` after every advance until `unfollow(key)` (key: `wake` itself by default)."""
        with self._lock:
            self._by_key[wake if key is None else key] = wake
            self._wakes = tuple(self._by_key.values())

    def unfollow(self, key: object) -> None:
        with self._lock:
            if self._by_key.pop(key, None) is not None:
                self._wakes = tuple(self._by_key.values())

    # storage/tail.py's Progress interface (subscribe sessions, flows): an Event set on every advance
    def register(self, ev: threading.Event) -> None:
        self.follow(ev.set, ev)

    def unregister(self, ev: threading.Event) -> None:
        self.unfollow(ev)

    def bump(self) -> None:
        self.advance()

    done = staticmethod(done)

    def wait(self, marks: list, timeout: float | None = None) -> bool:
        """Block until every mark is passed (True) or `timeout` seconds went by (False)."""
        if done(marks):
            return True
        ev = threading.Event()
        self.register(ev)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not done(marks):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                # the wake-up comes from advance(); the slice only bounds a missed one (none is lost:
                # the Event is registered before the check above)
                ev.wait(0.05 if left is None else min(left, 0.05))
                ev.clear()
            return True
        finally:
            self.unregister(ev)
