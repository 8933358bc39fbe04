"""Connectors: bridges between the engine and other systems (NATS JetStream today).

The service sees one object, `Connectors` (see `build`), with a tiny surface:

    wrap_store(append) -> store   the sink's hook: after a processed batch is stored, a copy is queued
                                   for the connector thread (never waits, never awaits)
    start()                        after the processors (connect, stream, consumer; StartupError)
    progress()                     a processor released a batch: wake a source waiting for marks
    stop_intake()                  with ingest: the source stops pulling
    close(drain, timeout)          after the processors drained: remaining acks, sink flush, disconnect

`build(cfg, service)` returns None when every connector is disabled, and imports nothing optional then.
"""

from __future__ import annotations


def build(cfg, service):
    """The service's connectors, or None when all are disabled (nats-py is imported lazily)."""
    n = cfg.connectors.nats
    if not n.enabled or not (n.sink.enabled or n.source.enabled):
        return None
    from eventstream.connectors.jetstream import NatsConnector

    return NatsConnector(n, service)
