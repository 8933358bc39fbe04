"""eventstream: a threaded event-streaming engine for free-threaded CPython 3.13t.

The public API is what `__all__` names; every other module is internal (its names may change):

    Service, StartupError            run the engine and its ports from a Config (service.py)
    Config, ConfigError, load_config the configuration (defaults < YAML file < environment < flags)
    Handler, Batch, Event, HandlerError
                                     what a handler is (a callable taking one Batch) and what it gets
    TcpClient, UdpSender, AsyncSender, subscribe, aio_subscribe, Subscription, ClientError,
    AuthError, SubscribeError        clients of the ingest and subscribe ports

Dataflows have their own public package, `eventstream.flow`, and their test kit `eventstream.testing`.
Names are imported on first use (PEP 562), so `import eventstream` stays cheap and imports no engine
module (nor cffi, which would turn the GIL back on without PYTHON_GIL=0).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Service": "eventstream.service",
    "StartupError": "eventstream.errors",
    "Config": "eventstream.config",
    "ConfigError": "eventstream.config",
    "load_config": "eventstream.config",
    "Handler": "eventstream.engine.handlers",
    "Batch": "eventstream.engine.handlers",
    "Event": "eventstream.engine.handlers",
    "HandlerError": "eventstream.engine.handlers",
    "TcpClient": "eventstream.client",
    "UdpSender": "eventstream.client",
    "AsyncSender": "eventstream.client",
    "subscribe": "eventstream.client",
    "aio_subscribe": "eventstream.client",
    "Subscription": "eventstream.client",
    "ClientError": "eventstream.client",
    "AuthError": "eventstream.client",
    "SubscribeError": "eventstream.client",
}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(
            f"module 'eventstream' has no attribute {name!r}; the public API is "
            f"eventstream.__all__: {', '.join(sorted(_WHERE))}"
        )
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
