"""What each backpressure level does to the engine (the control thread decides the level)."""

from __future__ import annotations

from eventstream.engine.control import Level


class LevelActions:
    """What each backpressure level does (cumulative as the level rises, undone step by step):

    ELEVATED   add a transactional and a batch worker (up to max_workers)
    DEGRADED   UDP: admit no BATCH-priority events
    CRITICAL   UDP: admit no LOW or BATCH events
    EMERGENCY  admit only CRITICAL events, over UDP and TCP

    Over TCP a full queue already pushes the client back, tier by tier (the reader holds what did not
    fit and stops reading that connection; nothing is dropped), so the levels hold TCP events only at
    EMERGENCY. UDP has no flow control: what it does not admit is shed (reason "backpressure", DLQ),
    leaving queue room for higher priorities. Events already accepted are never shed.
    """

    MIN_PRIORITY = {Level.HEALTHY: 0, Level.ELEVATED: 0, Level.DEGRADED: 1, Level.CRITICAL: 2, Level.EMERGENCY: 4}

    def __init__(self, service):
        """`service`: what the actions act on (its manager, admission and metrics)."""
        self.service = service

    def on_level(self, level: Level, previous: Level) -> None:
        svc = self.service
        if level >= Level.ELEVATED and previous < Level.ELEVATED:
            for tier in ("transactional", "batch"):
                svc.manager.add_worker(tier)
        svc.admission.min_priority = self.MIN_PRIORITY[level]
        svc.admission.tcp_min_priority = 4 if level >= Level.EMERGENCY else 0
        svc.metrics.set_state(int(level), level.name, int(previous), previous.name)
