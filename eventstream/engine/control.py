"""Control plane: the backpressure state machine and the thread that drives it.

Levels and the thresholds that raise them (defaults; all in YAML under `backpressure`), exactly as the
issue states them — note which comparisons are strict::

    ELEVATED   drop_rate >  1 %   or depth >  50 %
    DEGRADED   drop_rate >  2 %   or depth >  75 %
    CRITICAL   drop_rate >= 4 %   or depth >= 100 %
    EMERGENCY  drop_rate >= 10 %  or depth >  150 %

A Sample's `depth` is already a fraction: queued events / `max_queue_depth` (Engine.sample divides);
`drop_rate` is overload drops / offered over the last interval.

The level moves one step per evaluation, in both directions: each level's action is applied and
undone separately (workers, then the TCP pause, then UDP shedding ...), and the next interval shows
whether the system copes with it. Up: one level, when a higher level's thresholds are exceeded.
Down: one level, only when *both* metrics are below the thresholds of the level being left ×
`recovery_factor` (hysteresis), and only once that has held for `min_dwell_ms` in a row (so a load
that hovers around a threshold does not flap: it stays at the higher level). No decision at all
before `min_events_for_evaluation`
events have been processed (warm-up: rates over a handful of events mean nothing).
"""

from __future__ import annotations

import enum
import operator
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from eventstream.config import BackpressureConfig
from eventstream.runtime.affinity import pin_current_thread

log = structlog.get_logger("eventstream.control")


class Level(enum.IntEnum):
    HEALTHY = 0
    ELEVATED = 1
    DEGRADED = 2
    CRITICAL = 3
    EMERGENCY = 4


# (drop_rate comparison, depth comparison) per level, as written in the issue
COMPARISONS = {
    Level.ELEVATED: (operator.gt, operator.gt),
    Level.DEGRADED: (operator.gt, operator.gt),
    Level.CRITICAL: (operator.ge, operator.ge),
    Level.EMERGENCY: (operator.ge, operator.gt),
}
_SYMBOL = {operator.gt: ">", operator.ge: ">="}


@dataclass(frozen=True)
class Sample:
    """What the control plane looks at, once per interval."""

    depth: float  # events queued now as a fraction of max_queue_depth (1.0 = max_queue_depth events)
    drop_rate: float  # dropped / offered during the last interval, 0..1
    processed: int  # events processed since start (cumulative: gates the warm-up)
    p99_ns: float = 0.0  # handling latency p99 (logged with transitions; no threshold)


@dataclass(frozen=True)
class Transition:
    previous: Level
    level: Level
    sample: Sample
    depth_fraction: float
    reason: str


class Backpressure:
    """Pure state machine: evaluate(sample) -> Transition | None. Not thread-safe (one control thread)."""

    def __init__(self, config: BackpressureConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.level = Level.HEALTHY
        self.calm_since: float | None = None  # since when every sample allowed a step down
        self.transitions: Counter[tuple[Level, Level]] = Counter()
        self.thresholds = {
            Level.ELEVATED: config.elevated,
            Level.DEGRADED: config.degraded,
            Level.CRITICAL: config.critical,
            Level.EMERGENCY: config.emergency,
        }

    def exceeded(self, level: Level, drop_rate: float, depth: float) -> str | None:
        """Why `level`'s thresholds are exceeded (text), or None."""
        t = self.thresholds[level]
        drop_op, depth_op = COMPARISONS[level]
        if drop_op(drop_rate, t.drop_rate):
            return f"drop_rate {drop_rate:.4f} {_SYMBOL[drop_op]} {t.drop_rate} ({level.name})"
        if depth_op(depth, t.depth):
            return f"depth {depth:.3f} {_SYMBOL[depth_op]} {t.depth} ({level.name})"
        return None

    def recovered_from(self, level: Level, drop_rate: float, depth: float) -> bool:
        t = self.thresholds[level]
        rf = self.config.recovery_factor
        # rounded so that 0.5 x 0.8 is 0.4, not 0.4000000000000001: the boundary is as configured
        return drop_rate < round(t.drop_rate * rf, 12) and depth < round(t.depth * rf, 12)

    def evaluate(self, sample: Sample) -> Transition | None:
        """Decide the level for this interval; a Transition when it changed."""
        if sample.processed < self.config.min_events_for_evaluation:
            return None
        depth = sample.depth
        drop = sample.drop_rate
        for level in (Level.EMERGENCY, Level.CRITICAL, Level.DEGRADED, Level.ELEVATED):
            why = self.exceeded(level, drop, depth)
            if why is not None:
                break
        else:
            level, why = Level.HEALTHY, None
        current = self.level
        if level > current:
            return self._move(current, Level(current + 1), sample, depth, f"up: {why}")
        if level >= current or not self.recovered_from(current, drop, depth):
            self.calm_since = None
            return None
        now = self.clock()
        if self.calm_since is None:
            self.calm_since = now
        if round((now - self.calm_since) * 1000.0, 6) >= self.config.min_dwell_ms:
            t = self.thresholds[current]
            rf = self.config.recovery_factor
            return self._move(
                current,
                Level(current - 1),
                sample,
                depth,
                f"down: drop_rate {drop:.4f} < {t.drop_rate * rf:.4f} and depth {depth:.3f} < "
                f"{t.depth * rf:.3f} ({current.name} x recovery_factor {rf})",
            )
        return None

    def _move(self, previous: Level, level: Level, sample: Sample, depth: float, reason: str) -> Transition:
        self.level = level
        self.calm_since = None  # the next step down needs its own calm period
        self.transitions[(previous, level)] += 1
        return Transition(previous, level, sample, depth, reason)


class Actions(Protocol):
    def on_level(self, level: Level, previous: Level) -> None: ...


class ControlThread(threading.Thread):
    """Every `interval_ms`: sample, evaluate, log a transition with its metrics, call the actions.

    A failing sample source or action is logged and the loop goes on: the control plane must outlive
    the faults it is there to handle.
    """

    def __init__(
        self,
        backpressure: Backpressure,
        sample_fn: Callable[[], Sample],
        actions: Actions | None,
        interval_ms: float,
        cpus=(),
        on_transition: Callable[[Transition], None] | None = None,
    ):
        super().__init__(name="es-control", daemon=True)
        self.backpressure = backpressure
        self.sample_fn = sample_fn
        self.actions = actions
        self.interval = interval_ms / 1000.0
        self.cpus = list(cpus)
        self.on_transition = on_transition
        self.evaluations = 0
        self.failures = 0
        self._stop_requested = threading.Event()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end and wait for it (bounded): the engine frees the rings its sample reads
        right after, and a tick still running then would read freed memory (the process would crash)."""
        self._stop_requested.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)

    def run(self) -> None:
        pin_current_thread(self.cpus, self.name)
        while not self._stop_requested.wait(self.interval):
            self.tick()

    def tick(self) -> Transition | None:
        """One evaluation (the loop body; callable directly for a synchronous step)."""
        try:
            sample = self.sample_fn()
            t = self.backpressure.evaluate(sample)
        except Exception as exc:  # noqa: BLE001 - keep controlling
            self.failures += 1
            log.error("control_sample_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.evaluations += 1
        if t is None:
            return None
        s = t.sample
        (log.warning if t.level > t.previous else log.info)(
            "backpressure_transition",
            previous=t.previous.name,
            level=t.level.name,
            reason=t.reason,
            depth_fraction=round(s.depth, 4),
            drop_rate=round(s.drop_rate, 5),
            processed=s.processed,
            p99_ns=s.p99_ns,
            at_ns=time.time_ns(),
        )
        for fn in (self.on_transition, self.actions and (lambda tr: self.actions.on_level(tr.level, tr.previous))):
            if not fn:
                continue
            try:
                fn(t)
            except Exception as exc:  # noqa: BLE001 - an action failing must not stop the control loop
                self.failures += 1
                log.error("control_action_failed", level=t.level.name, error=f"{type(exc).__name__}: {exc}")
        return t
