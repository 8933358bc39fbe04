"""Control plane: the transition table (strictness, jumps, hysteresis, warm-up) and the control thread."""

from __future__ import annotations

import queue
import threading

import pytest

from eventstream.config import BackpressureConfig
from eventstream.engine.control import Backpressure, ControlThread, Level, Sample

H, E, D, C, X = Level.HEALTHY, Level.ELEVATED, Level.DEGRADED, Level.CRITICAL, Level.EMERGENCY
MAXQ = 5000


def s(depth_frac=0.0, drop=0.0, processed=10_000):
    return Sample(depth=round(depth_frac * MAXQ) / MAXQ, drop_rate=drop, processed=processed)


def machine(level=H, **cfg):
    cfg.setdefault("min_dwell_ms", 0.0)
    bp = Backpressure(BackpressureConfig(**cfg))
    bp.level = level
    return bp


@pytest.mark.parametrize("sample, expected", [
    # drop-rate thresholds: >1 %, >2 %, >=4 %, >=10 %
    (s(drop=0.01), H), (s(drop=0.0101), E),
    (s(drop=0.02), E), (s(drop=0.0201), D),
    (s(drop=0.0399), D), (s(drop=0.04), C),
    (s(drop=0.0999), C), (s(drop=0.10), X),
    # depth thresholds: >50 %, >75 %, >=100 %, >150 %
    (s(0.50), H), (s(0.5002), E),
    (s(0.75), E), (s(0.7502), D),
    (s(0.9998), D), (s(1.00), C),
    (s(1.50), C), (s(1.5002), X),
    # either metric is enough; the higher level wins
    (s(0.6, drop=0.05), C), (s(1.6, drop=0.0), X),
])
def test_from_healthy_steps_up_one_level_per_evaluation_to_the_highest_exceeded(sample, expected):
    bp = machine()
    steps = [bp.evaluate(sample) for _ in range(5)]
    climbed = [t.level for t in steps if t is not None]
    assert climbed == [E, D, C, X][:int(expected)]  # one step at a time, never past `expected`
    assert bp.level == expected
    assert all(t.reason.startswith("up: ") and t.level == t.previous + 1 for t in steps if t is not None)


def test_steps_up_from_intermediate_level():
    bp = machine(E)
    t = bp.evaluate(s(drop=0.05))
    assert (t.previous, t.level) == (E, D)
    assert bp.evaluate(s(drop=0.05)).level == C
    assert bp.evaluate(s(drop=0.05)) is None  # stays


@pytest.mark.parametrize("level, stays, leaves", [
    # recovery needs BOTH metrics below threshold x 0.8 of the level being left
    (E, s(0.40, drop=0.0), s(0.3998, drop=0.0079)),
    (E, s(0.1, drop=0.008), s(0.1, drop=0.0079)),
    (D, s(0.60, drop=0.0), s(0.5998, drop=0.0)),
    (D, s(0.1, drop=0.016), s(0.1, drop=0.0159)),
    (C, s(0.80, drop=0.0), s(0.7998, drop=0.0)),
    (C, s(0.1, drop=0.032), s(0.1, drop=0.0319)),
    (X, s(1.20, drop=0.0), s(1.1998, drop=0.0)),
    (X, s(0.1, drop=0.08), s(0.1, drop=0.0799)),
])
def test_hysteresis_holds_level_until_below_threshold_times_recovery_factor(level, stays, leaves):
    bp = machine(level)
    assert bp.evaluate(stays) is None and bp.level == level
    t = bp.evaluate(leaves)
    assert (t.previous, t.level) == (level, Level(level - 1)) and t.reason.startswith("down: ")


def test_steps_down_one_level_per_evaluation():
    bp = machine()
    assert [bp.evaluate(s(2.0)).level for _ in range(4)] == [E, D, C, X]
    seen = [bp.evaluate(s()).level for _ in range(4)]
    assert seen == [C, D, E, H]
    assert bp.evaluate(s()) is None
    assert bp.transitions[(X, C)] == 1 and bp.transitions[(H, E)] == 1


def test_a_step_down_needs_min_dwell_of_calm_in_a_row():
    now = [100.0]
    bp = Backpressure(BackpressureConfig(min_dwell_ms=1000.0), clock=lambda: now[0])
    assert bp.evaluate(s(0.6)).level == E
    for k in range(40):  # a load flapping around the threshold every 100 ms for 4 s
        now[0] += 0.1
        assert bp.evaluate(s(0.6 if k % 2 else 0.1)) is None  # no flapping: the level holds
    for _ in range(10):  # calm, but not yet for 1 s
        now[0] += 0.1
        assert bp.evaluate(s(0.1)) is None
    now[0] += 0.1
    assert bp.evaluate(s(0.1)).level == H  # 1 s of calm in a row


def test_hovering_at_threshold_does_not_flap():
    bp = machine()
    levels = [bp.evaluate(x) for x in (s(0.51), s(0.49), s(0.51), s(0.45), s(0.52), s(0.41))]
    assert [t and t.level for t in levels] == [E, None, None, None, None, None]
    assert bp.evaluate(s(0.39)).level == H


def test_no_decision_during_warm_up():
    bp = machine()
    assert bp.evaluate(s(2.0, drop=0.5, processed=999)) is None and bp.level == H
    assert bp.evaluate(s(2.0, drop=0.5, processed=1000)).level == E
    assert bp.evaluate(s(0.0, processed=10)) is None and bp.level == E  # no decision either way


def test_thresholds_come_from_config():
    cfg = BackpressureConfig(min_events_for_evaluation=0, recovery_factor=0.5, min_dwell_ms=0.0)
    cfg.elevated.depth = 0.1
    bp = Backpressure(cfg)
    assert bp.evaluate(Sample(depth=0.11, drop_rate=0.0, processed=0)).level == E
    assert bp.evaluate(Sample(depth=0.06, drop_rate=0.0, processed=0)) is None
    assert bp.evaluate(Sample(depth=0.04, drop_rate=0.0, processed=0)).level == H


class RecordingActions:
    def __init__(self, expected: int):
        self.calls: list[tuple[Level, Level]] = []
        self.expected = expected
        self.done = threading.Event()

    def on_level(self, level, previous):
        self.calls.append((previous, level))
        if level == D and len(self.calls) == 2:
            raise RuntimeError("action failed")  # must not stop the thread
        if len(self.calls) >= self.expected:
            self.done.set()


def test_control_thread_drives_actions_from_a_sample_source():
    samples: queue.Queue = queue.Queue()
    script = [s(0.1), s(0.6), s(0.8), s(0.8), s(0.1), s(0.1), s(0.1)]
    for x in script:
        samples.put(x)
    exhausted = threading.Event()

    def source():
        try:
            return samples.get_nowait()
        except queue.Empty:
            exhausted.set()
            return s(0.1)

    seen = []
    actions = RecordingActions(expected=4)
    bp = Backpressure(BackpressureConfig())
    thread = ControlThread(bp, source, actions, interval_ms=1, on_transition=seen.append)
    thread.start()
    try:
        assert actions.done.wait(30), f"only {actions.calls} after 30 s"
        assert exhausted.wait(30)
    finally:
        thread.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert actions.calls == [(H, E), (E, D), (D, E), (E, H)]
    assert [(t.previous, t.level) for t in seen] == actions.calls
    assert thread.failures == 1 and bp.level == H


def test_control_thread_survives_a_failing_sample_source():
    calls = {"n": 0}
    done = threading.Event()

    def source():
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("metrics unavailable")
        if calls["n"] == 5:  # the failure, then 4 evaluations: one step up each
            done.set()
        return s(2.0)

    bp = Backpressure(BackpressureConfig())
    thread = ControlThread(bp, source, None, interval_ms=1)
    thread.start()
    try:
        assert done.wait(30)
    finally:
        thread.stop()
        thread.join(10)
    assert not thread.is_alive() and thread.failures == 1 and bp.level >= C
