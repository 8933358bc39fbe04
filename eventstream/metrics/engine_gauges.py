"""Gauges and counters read from the running engine's objects when the exposition is scraped
(queue depths, failed threads, topics, the payload arena, the TCP per-client limits)."""

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
