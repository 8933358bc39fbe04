"""Wait strategies: how a blocked producer or consumer passes time until a condition holds.

Why strategies instead of a Condition: the rings are lock-free, and a Condition needs a mutex on both
sides of every handoff. A waiter here just re-checks a cheap predicate (a cursor load) with a
strategy-specific pause between checks. Every wait has a deadline: the callers turn an expired
deadline into a timeout result (BLOCK_PRODUCER returns the rest of the batch; poll returns nothing).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def _deadline(timeout: float) -> float | None:
    """The monotonic deadline of a wait of `timeout` seconds; None for 0 (do not wait)."""
    if timeout is None or timeout != timeout or timeout < 0:
        raise ValueError(f"wait timeout={timeout!r} is not allowed; allowed: a number of seconds >= 0")
    return None if timeout == 0 else time.monotonic() + timeout


class WaitStrategy:
    """Base: `wait_for(ready, timeout)` returns True as soon as `ready()` does, False at the deadline."""

    name = "base"
    signals = False  # True: the ring must call signal() after it publishes or releases

    def signal(self) -> None:
        """The other side made progress (published or released). Only parking strategies care."""

    def pause(self, attempt: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def first_attempt(self) -> int:
        """Where the backoff of a new wait starts (0: from the beginning)."""
        return 0

    def finished(self, attempt: int, ok: bool) -> None:
        """Told how a wait ended; adaptive strategies remember it."""

    def wait_for(self, ready: Callable[[], bool], timeout: float) -> bool:
        if ready():
            return True
        deadline = _deadline(timeout)
        if deadline is None:
            return False
        attempt = self.first_attempt()
        while True:
            self.pause(attempt)
            attempt += 1
            if ready():
                self.finished(attempt, True)
                return True
            if time.monotonic() >= deadline:
                ok = ready()
                self.finished(attempt, ok)
                return ok

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class BusySpin(WaitStrategy):
    """Re-check immediately: lowest latency, burns a whole CPU (only with a CPU to spare)."""

    name = "spin"

    def pause(self, attempt: int) -> None:
        return None


class Yield(WaitStrategy):
    """Give the CPU to another runnable thread between checks."""

    name = "yield"

    def pause(self, attempt: int) -> None:
        os.sched_yield()


class SleepBackoff(WaitStrategy):
    """Spin a little, then yield, then sleep with exponential backoff up to `max_sleep` seconds.

    Adaptive per thread: a wait that ran out of time means the other side is idle, so the next wait
    of the same thread starts in the sleeping phase where that one ended (an idle consumer polling
    with short timeouts then costs ~1000 cheap wakeups/s instead of spinning and yielding on every
    call). The first wait that succeeds resets it to spinning.
    """

    name = "sleep"

    def __init__(self, spins: int = 16, yields: int = 16, min_sleep: float = 20e-6, max_sleep: float = 1e-3):
        if not (0 < min_sleep <= max_sleep):
            raise ValueError(
                f"SleepBackoff min_sleep={min_sleep!r}, max_sleep={max_sleep!r} are not allowed; "
                "allowed: 0 < min_sleep <= max_sleep"
            )
        self.spins = spins
        self.yields = yields
        self.min_sleep = min_sleep
        self.max_sleep = max_sleep
        self._start = threading.local()

    def first_attempt(self) -> int:
        return getattr(self._start, "attempt", 0)

    def finished(self, attempt: int, ok: bool) -> None:
        self._start.attempt = 0 if ok else min(attempt, self.spins + self.yields + 40)

    def pause(self, attempt: int) -> None:
        if attempt < self.spins:
            return
        if attempt < self.spins + self.yields:
            os.sched_yield()
            return
        k = attempt - self.spins - self.yields
        time.sleep(min(self.min_sleep * (1 << min(k, 20)), self.max_sleep))


class Blocking(WaitStrategy):
    """Spin briefly, yield a little, then park until the other side signals progress.

    The Disruptor's BlockingWaitStrategy without its lock on the hot path: the ring calls `signal()`
    after every publish and release, which is one attribute read unless a waiter is parked; only
    then does it set the Event (and take the Event's internal lock). So under load, when nobody
    parks, signalling costs nothing; when idle, a waiter sleeps in the kernel and wakes within
    microseconds of new data instead of a backoff sleep's granularity.

    No lost wakeup (Dekker): the waiter stores `parked` and then loads the cursor (in `ready()`); the
    producer stores the cursor and then loads `parked`. Each side puts a full barrier between its
    store and its load: both touch `parked` only under `_fence` (a lock acquire is a locked
    compare-exchange: a full barrier on x86-64; ~0.1 µs uncontended, against µs for an atomic from
    Python). So at least one side sees the other's store: the producer sets the Event, or the waiter
    sees the data and does not park. The producer tests and resets `parked` in one step, and the
    waiter clears the Event *before* announcing its park, so a late set() from a signaller of an
    earlier park can only end a park early, never be erased after `parked` was reset.
    Parking still happens in slices of `park_slice` seconds, as a safety net only (50 ms: an idle
    thread wakes 20 times a second; with 2 ms slices five idle processors cost ~6 % of a CPU each).
    """

    name = "block"
    signals = True

    def __init__(self, spins: int = 32, yields: int = 4, park_slice: float = 0.05):
        if not park_slice > 0:
            raise ValueError(f"Blocking park_slice={park_slice!r} is not allowed; allowed: seconds > 0")
        self.spins = spins
        self.yields = yields
        self.park_slice = park_slice
        self.parked = False
        self._event = threading.Event()
        self._fence = threading.Lock()
        self.late_wakeups = 0  # parks that ended by time with data there (a signal was missed)

    def signal(self) -> None:
        with self._fence:  # full barrier: the caller's cursor store before the load of `parked`
            if not self.parked:
                return
            self.parked = False  # test and clear under the fence: one signaller takes each park
        self._event.set()

    def wait_for(self, ready: Callable[[], bool], timeout: float) -> bool:
        if ready():
            return True
        deadline = _deadline(timeout)
        if deadline is None:
            return False
        for _ in range(self.spins):
            if ready():
                return True
        for _ in range(self.yields):
            os.sched_yield()
            if ready():
                return True
        event = self._event
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ready()
            # clear first, then announce: a signaller that saw an earlier park may still be about to
            # set the Event; its set() then lands after this clear() and only makes the wait below
            # return early (announcing first, that set could be cleared here after the signaller had
            # already reset `parked`, and nobody would set the Event again: a lost wakeup)
            event.clear()
            with self._fence:  # full barrier between the store of `parked` and the loads in ready()
                self.parked = True
            if ready():  # checked after announcing the park: a publish before this point is seen here
                return True
            woken = event.wait(min(left, self.park_slice))
            if ready():
                if not woken:
                    self.late_wakeups += 1  # the data came without a signal: a lost wakeup
                return True


WAIT_NAMES = ("spin", "yield", "sleep", "block")


def make_wait(name: str | WaitStrategy) -> WaitStrategy:
    """A wait strategy from its config name ("spin" | "yield" | "sleep" | "block"), or pass one through."""
    if isinstance(name, WaitStrategy):
        return name
    if name == "spin":
        return BusySpin()
    if name == "yield":
        return Yield()
    if name == "sleep":
        return SleepBackoff()
    if name == "block":
        return Blocking()
    raise ValueError(f"wait strategy {name!r} is not allowed; allowed: {', '.join(WAIT_NAMES)}")
