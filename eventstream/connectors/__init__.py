"""Connectors: bridges between the engine and other systems (NATS JetStream today).

The service sees one object (see `build`), built on the engine before its processors start: the sink
follows `engine.stored` and reads what is stored from events.bin (from the log's end at that point),
the source offers through `engine.offer` and follows `engine.stored`. Then:

    start()                        after the processors (connect, stream, consumer; StartupError)
    stop_intake()                  with ingest: the source stops pulling
    close(drain, timeout)          after the processors drained: remaining acks, sink flush, disconnect

`build(cfg, engine)` returns None when every connector is disabled, and imports nothing optional then.
"""

from __future__ import annotations


def build(cfg, engine):
    """The engine's connectors, or None when all are disabled (nats-py is imported lazily)."""
    n = cfg.connectors.nats
    if not n.enabled or not (n.sink.enabled or n.source.enabled):
        return None
    from eventstream.connectors.jetstream import NatsConnector

    return NatsConnector(n, engine)
