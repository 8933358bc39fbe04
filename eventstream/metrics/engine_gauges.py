"""Gauges and counters read from the running engine's objects when the exposition is scraped
(queue depths, failed threads, topics, the payload arena, the dedup tables, the TCP per-client limits)."""

from __future__ import annotations


def register_engine_gauges(m, bus, queue_names, topics, payloads) -> None:
    """`m`: the MetricsRegistry."""
    for name in queue_names:
        m.gauge_fn("queue_depth", {"queue": name}, lambda q=bus[name]: q.depth)
    m.gauge_fn("topics", {}, lambda: len(topics), doc="distinct topics known (bound: server.max_topics)")
    m.gauge_fn(
        "payload_arena_used_bytes",
        {},
        lambda: payloads.statistics()["used_bytes"],
        doc="bytes of payloads over records.payload_bytes in flight (bound: payloads.arena_bytes)",
    )
    m.counter_fn(
        "payload_arena_full",
        lambda: payloads.statistics()["full"],
        doc="claims the full payload arena cut short (the producer was pushed back; UDP: shed)",
    )


def register_failures(m, failures) -> None:
    """`failures`: a callable listing the threads (engine and edges) that died."""
    m.gauge_fn(
        "threads_failed",
        {},
        lambda: len(failures()),
        doc="engine threads that died with an error (any: the service is unhealthy and stops)",
    )


def register_tcp_limits(m, tcp, close_reasons) -> None:
    """Per-client limits of the TCP ingest (ingest/limits.py): closes by reason, partial bytes."""
    for reason in close_reasons:
        m.counter_fn(
            "connections_limited",
            lambda r=reason: tcp.statistics()["connections_limited"].get(r, 0),
            {"reason": reason},
            doc="TCP connections refused or closed for a per-client limit",
        )
    m.gauge_fn(
        "partial_frame_bytes",
        {},
        tcp.budget.total,
        doc="bytes held in partial frames over all TCP connections (bound: server.tcp.max_partial_bytes)",
    )


def register_dedup(m, dedups: dict) -> None:
    """The dedup tables of each tier (core/dedup.py): ids held, memory, evictions, the window held."""

    def total(tier, key):
        return lambda: sum(d.statistics()[key] for d in dedups[tier])

    def held(tier):
        return lambda: min(d.window_held_s() for d in dedups[tier])

    for tier in dedups:
        lab = {"tier": tier}
        m.gauge_fn(
            "dedup_entries",
            lab,
            total(tier, "entries"),
            doc="ids held in the dedup tables (expired ones until the next rebuild)",
        )
        m.gauge_fn(
            "dedup_table_bytes",
            lab,
            total(tier, "bytes"),
            doc="memory of the dedup tables (all tiers share dedup.max_bytes)",
        )
        m.counter_fn(
            "dedup_evicted",
            total(tier, "evicted"),
            lab,
            doc="ids evicted before their window ended because dedup.max_bytes was reached",
        )
        m.gauge_fn(
            "dedup_window_seconds",
            lab,
            lambda t=tier: max(d.statistics()["window_s"] for d in dedups[t]),
            doc="the window the dedup tables are configured to answer for (dedup.window_s)",
        )
        m.gauge_fn(
            "dedup_window_held_seconds",
            lab,
            held(tier),
            doc="the window the dedup tables still answer for (dedup.window_s unless ids were evicted)",
        )


def register_storage(m, event_log, dlq) -> None:
    """Retention of the event log and the DLQ: segments deleted."""
    m.counter_fn(
        "log_segments_deleted",
        lambda: event_log.statistics().get("segments_deleted", 0),
        {},
        doc="closed events.bin segments deleted by retention (storage.events_max_segments/_age_s)",
    )
    m.counter_fn(
        "log_segments_deleted_unread",
        lambda: event_log.statistics().get("segments_deleted_unread", 0),
        {},
        doc="closed events.bin segments deleted before every named consumer group committed past them "
        "(storage.retention_respects_groups: false)",
    )
    m.gauge_fn(
        "log_segments_kept_unread",
        {},
        lambda: event_log.statistics().get("segments_kept_unread", 0),
        doc="closed events.bin segments retention would delete but keeps for a named group that has not "
        "committed past them (delete subscribe/groups/<name>.json to release them)",
    )
    m.counter_fn(
        "dlq_segments_deleted",
        lambda: dlq.statistics().get("segments_deleted", 0),
        {},
        doc="closed DLQ segments deleted by retention (storage.dlq_max_segments/_age_s)",
    )


def register_subscribe(m, sub) -> None:
    """Subscribers (subscribe/server.py): sessions by kind, credit, refusals, deliveries, group lag.
    Lag per group (subscribe_lag_events/_seconds{group}): group names come from clients, so at most
    server.subscribe.lag_group_series groups get a series each and the rest are folded into
    group="_other" (subscribe/lag.py); subscribe_group_lag_* are the worst case over every group."""
    for kind in ("handshake", "solo", "group"):
        m.gauge_fn(
            "subscribe_sessions",
            {"kind": kind},
            lambda k=kind: sub.sessions_by_kind()[k],
            doc="subscriber connections by kind: in the handshake, solo tail, group member "
            "(bound: server.subscribe.max_subscribers together)",
        )
    m.gauge_fn(
        "subscribers",
        {},
        lambda: sub.statistics()["subscribers"],
        doc="subscriber connections (bound: server.subscribe.max_subscribers)",
    )
    m.gauge_fn(
        "subscribe_credit_outstanding",
        {},
        lambda: sub.credit()["outstanding"],
        doc="credit granted by subscribers and not yet used, over all sessions",
    )
    m.gauge_fn(
        "subscribe_credit_exhausted",
        {},
        lambda: sub.credit()["exhausted"],
        doc="subscribed sessions with no credit left (waiting for their consumer)",
    )
    m.counter_fn(
        "subscribe_delivered",
        lambda: sub.statistics()["delivered"],
        {},
        doc="events sent to subscribers (DELIVER frames)",
    )
    m.counter_fn(
        "subscribe_refused",
        lambda: sub.statistics()["refused"],
        {},
        doc="subscriber connections refused (server.subscribe.max_subscribers reached)",
    )
    m.counter_fn(
        "subscribe_errors",
        lambda: sub.statistics()["errors"],
        {},
        doc="subscriber sessions ended by a SUB_ERROR (protocol, auth, handshake deadline)",
    )
    m.gauge_fn(
        "subscribe_groups", {}, lambda: sub.lag.lag()["groups"], doc="named consumer groups with a committed offset"
    )
    m.gauge_fn(
        "subscribe_group_lag_events",
        {},
        lambda: sub.lag.lag()["events"],
        doc="events stored after the lowest committed offset of any named group (the group furthest behind)",
    )
    m.gauge_fn(
        "subscribe_group_lag_seconds",
        {},
        lambda: sub.lag.lag()["seconds"],
        doc="age of the oldest event some named group has not committed (0: every group caught up)",
    )
    m.register_callback(
        "subscribe_lag_events",
        "events stored after the group's committed offset, per named group (at most "
        'server.subscribe.lag_group_series groups; the rest summed under group="_other")',
        lambda: {g: v["events"] for g, v in sub.lag.by_group().items()},
        labels=["group"],
    )
    m.register_callback(
        "subscribe_lag_seconds",
        "age of the first event the group has not committed (0: caught up), per named group (at most "
        'server.subscribe.lag_group_series groups; the rest under group="_other": the oldest of theirs)',
        lambda: {g: v["seconds"] for g, v in sub.lag.by_group().items()},
        labels=["group"],
    )


def register_udp(m, udp) -> None:
    """UDP ingest: datagrams received, bad, discarded by the per-source limit, dropped by the kernel."""
    st = udp.stats
    m.counter_fn("udp_datagrams_received", lambda: st.datagrams, {}, doc="datagrams read from the UDP socket")
    m.counter_fn(
        "udp_datagrams_bad",
        lambda: st.datagrams_bad,
        {},
        doc="datagrams that ended inside a frame or carried a framing error (their good frames kept)",
    )
    m.counter_fn(
        "udp_datagrams_rate_limited",
        lambda: udp.source_limit.limited if udp.source_limit is not None else 0,
        {},
        doc="datagrams discarded undecoded: their source was over server.udp.max_datagrams_per_s_per_source",
    )
    m.counter_fn(
        "udp_kernel_drops",
        udp.kernel_drops,
        {},
        doc="datagrams the kernel dropped because the socket's receive buffer was full "
        "(server.udp.rcvbuf_bytes; the reader did not keep up)",
    )


def register_tenants(m, tenants) -> None:
    """Tenant bounds (ingest/tenants.py): refusals by what was bounded, throttling, tenants tracked."""
    for what in ("topics", "connections", "subscribers"):
        m.counter_fn(
            "tenant_refused",
            lambda w=what: tenants.refused[w],
            {"bound": what},
            doc="frames or connections refused for a tenant bound (server.tenants.max_new_topics, "
            "max_connections, max_subscribers)",
        )
    m.counter_fn(
        "tenant_throttled",
        lambda: tenants.throttled,
        {},
        doc="times a connection waited for its tenant's events/s budget (server.tenants.max_events_per_s)",
    )
    m.gauge_fn("tenants", {}, lambda: len(tenants), doc="tenants tracked (principals and client addresses)")


def register_edges(m, *, failures, tenants, tcp=None, udp=None, subscribe=None, close_reasons=()) -> None:
    """The service's edges, once they are up: thread failures, tenant bounds, and each edge that runs."""
    register_failures(m, failures)
    register_tenants(m, tenants)
    if tcp is not None:
        register_tcp_limits(m, tcp, close_reasons)
    if udp is not None:
        register_udp(m, udp)
    if subscribe is not None:
        register_subscribe(m, subscribe)
