"""Gauges and counters read from the running engine's objects when the exposition is scraped
(queue depths, failed threads, topics, the payload arena, the dedup tables, the TCP per-client limits)."""

from __future__ import annotations


def register_engine_gauges(m, bus, queue_names, topics, payloads, failures) -> None:
    """`m`: the MetricsRegistry; `failures`: a callable listing the engine threads that died."""
    for name in queue_names:
        m.gauge_fn("queue_depth", {"queue": name}, lambda q=bus[name]: q.depth)
    m.gauge_fn("threads_failed", {}, lambda: len(failures()),
               doc="engine threads that died with an error (any: the service is unhealthy and stops)")
    m.gauge_fn("topics", {}, lambda: len(topics), doc="distinct topics known (bound: server.max_topics)")
    m.gauge_fn("payload_arena_used_bytes", {}, lambda: payloads.statistics()["used_bytes"],
               doc="bytes of payloads over records.payload_bytes in flight (bound: payloads.arena_bytes)")
    m.counter_fn("payload_arena_full", lambda: payloads.statistics()["full"],
                 doc="claims the full payload arena cut short (the producer was pushed back; UDP: shed)")


def register_tcp_limits(m, tcp, close_reasons) -> None:
    """Per-client limits of the TCP ingest (ingest/limits.py): closes by reason, partial bytes."""
    for reason in close_reasons:
        m.counter_fn("connections_limited", lambda r=reason: tcp.statistics()["connections_limited"].get(r, 0),
                     {"reason": reason}, doc="TCP connections refused or closed for a per-client limit")
    m.gauge_fn("partial_frame_bytes", {}, tcp.budget.total,
               doc="bytes held in partial frames over all TCP connections (bound: server.tcp.max_partial_bytes)")


def register_dedup(m, dedups: dict) -> None:
    """The dedup tables of each tier (core/dedup.py): ids held, memory, evictions, the window held."""
    def total(tier, key):
        return lambda: sum(d.statistics()[key] for d in dedups[tier])

    def held(tier):
        return lambda: min(d.window_held_s() for d in dedups[tier])

    for tier in dedups:
        lab = {"tier": tier}
        m.gauge_fn("dedup_entries", lab, total(tier, "entries"),
                   doc="ids held in the dedup tables (expired ones until the next rebuild)")
        m.gauge_fn("dedup_table_bytes", lab, total(tier, "bytes"),
                   doc="memory of the dedup tables (all tiers share dedup.max_bytes)")
        m.counter_fn("dedup_evicted", total(tier, "evicted"), lab,
                     doc="ids evicted before their window ended because dedup.max_bytes was reached")
        m.gauge_fn("dedup_window_held_seconds", lab, held(tier),
                   doc="the window the dedup tables still answer for (dedup.window_s unless ids were evicted)")
