"""What each backpressure level does to the engine (the control thread decides the level)."""

from __future__ import annotations

from eventstream.engine.control import Level


class LevelActions:
    """What each backpressure level does (cumulative as the level rises, undone step by step):

    ELEVATED   add a transactional and a batch worker (up to max_workers)
    DEGRADED   UDP: admit no BATCH-priority events
    CRITICAL   UDP: admit no LOW or BATCH events
    EMERGENCY  admit only CRITICAL events, from every source (TCP, UDP, the NATS source, flows)

    The levels are applied by `Engine.offer`. A source with flow control (TCP, the NATS source, flows)
    is already pushed back tier by tier by a full queue (it holds what did not fit and offers it
    again; nothing is dropped), so the levels hold its events only at EMERGENCY. UDP has no flow
    control: what it does not admit is shed (reason "backpressure", DLQ),
    leaving queue room for higher priorities. Events already accepted are never shed.
    """

    MIN_PRIORITY = {Level.HEALTHY: 0, Level.ELEVATED: 0, Level.DEGRADED: 1, Level.CRITICAL: 2, Level.EMERGENCY: 4}

    def __init__(self, engine):
        """`engine`: what the actions act on (its manager, its admission: every source offers
        through `Engine.offer`, which applies it, and its metrics)."""
        self.engine = engine

    def on_level(self, level: Level, previous: Level) -> None:
        engine = self.engine
        if level >= Level.ELEVATED and previous < Level.ELEVATED:
            for tier in ("transactional", "batch"):
                engine.manager.add_worker(tier)
        engine.admission.min_priority = self.MIN_PRIORITY[level]
        engine.admission.tcp_min_priority = 4 if level >= Level.EMERGENCY else 0
        engine.metrics.set_state(int(level), level.name, int(previous), previous.name)
