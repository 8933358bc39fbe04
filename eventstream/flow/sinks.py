"""Where a flow's outputs go: `to(topic)`, `to(callable)`, `to(NatsSubject(...))`.

Topic(name)        back into the engine: stored in events.bin, deduplicated by (topic, event id),
                   subscribable like any event. Event ids are deterministic (ids.py), so outputs
                   replayed after a crash are stored once. Values are encoded by the sink's serde
                   (default: bytes as they are, str as UTF-8, anything else as JSON).
Call(fn)           a Python callable: fn(value) per output, or fn(list of values) per batch with
                   batch=True. At-least-once after a crash (a replay calls it again).
NatsSubject(s)     a NATS subject (core NATS publish over a plain socket, PUB with the event id in
                   a header-less message); at-least-once like a callable.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from eventstream.core.records import Priority
from eventstream.flow import ids
from eventstream.flow import serde as serdes


class Target:
    name = "target"
    hash = 0
    kind = "target"


class Topic(Target):
    kind = "topic"

    def __init__(self, name: str, *, serde=None, priority: str | int = "MEDIUM"):
        if not isinstance(name, str) or not name or len(name.encode()) > 255:
            raise ValueError(f"to(topic): {name!r} is not allowed; allowed: a topic name of 1..255 UTF-8 bytes")
        self.name = name
        self.serde = None if serde is None else serdes.resolve(serde)
        try:
            self.priority = int(Priority[priority]) if isinstance(priority, str) else int(Priority(priority))
        except (KeyError, ValueError):
            raise ValueError(
                f"to({name!r}, priority={priority!r}) is not allowed; allowed: {', '.join(p.name for p in Priority)}"
            ) from None
        self.hash = ids.name_hash(f"topic/{name}")

    def encode(self, values) -> list[bytes]:
        if self.serde is None:
            return [serdes.encode_any(v) for v in (values if isinstance(values, list) else list(values))]
        return self.serde.encode(values)

    def __repr__(self) -> str:
        return f"Topic({self.name!r})"


class Call(Target):
    kind = "call"

    def __init__(self, fn: Callable, *, batch: bool = False, name: str | None = None):
        if not callable(fn):
            raise ValueError(f"to({fn!r}) is not allowed; allowed: a topic name, a callable, or a NatsSubject")
        self.fn = fn
        self.batch = batch
        self.name = name or getattr(fn, "__qualname__", None) or type(fn).__name__
        self.hash = ids.name_hash(f"call/{self.name}")

    def deliver(self, values: list) -> None:
        if self.batch:
            self.fn(values)
        else:
            fn = self.fn
            for v in values:
                fn(v)

    def __repr__(self) -> str:
        return f"Call({self.name})"


class NatsSubject(Target):
    """Publish each output to a NATS subject (core NATS; one connection per flow run, made lazily)."""

    kind = "nats"

    def __init__(self, subject: str, *, server: str = "nats://127.0.0.1:4222", serde=None, timeout_s: float = 5.0):
        if not subject or any(c in subject for c in " \t\r\n*>"):
            raise ValueError(
                f"NatsSubject({subject!r}) is not allowed; allowed: a NATS subject without spaces or wildcards"
            )
        self.subject = subject
        self.server = server
        self.name = f"nats:{subject}"
        self.serde = None if serde is None else serdes.resolve(serde)
        self.timeout_s = timeout_s
        self.hash = ids.name_hash(f"nats/{subject}")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        hostport = self.server.split("://", 1)[-1]
        host, _, port = hostport.rpartition(":")
        sock = socket.create_connection((host or "127.0.0.1", int(port or 4222)), timeout=self.timeout_s)
        f = sock.makefile("rb")
        info = f.readline()
        if not info.startswith(b"INFO"):
            sock.close()
            raise ConnectionError(f"{self.server}: not a NATS server (first line {info[:40]!r})")
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"eventstream-flow"}\r\nPING\r\n')
        line = f.readline()
        while line.startswith(b"INFO"):
            line = f.readline()
        if not line.startswith(b"PONG"):
            sock.close()
            raise ConnectionError(f"{self.server}: NATS refused the connection ({line[:80]!r})")
        self._file = f
        return sock

    def publish(self, payloads: list[bytes]) -> None:
        """Publish, then PING/PONG: when this returns, the server has every message."""
        subj = self.subject.encode()
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
            parts: list[bytes] = []
            for p in payloads:
                parts += (b"PUB ", subj, b" ", str(len(p)).encode(), b"\r\n", p, b"\r\n")
            parts.append(b"PING\r\n")
            try:
                self._sock.sendall(b"".join(parts))
                while True:
                    line = self._file.readline()
                    if not line:
                        raise ConnectionError(f"{self.server}: connection closed")
                    if line.startswith(b"PONG"):
                        break
                    if line.startswith(b"-ERR"):
                        raise ConnectionError(f"{self.server}: {line.strip().decode(errors='replace')}")
            except OSError:
                self.close()
                raise

    def encode(self, values) -> list[bytes]:
        if self.serde is None:
            return [serdes.encode_any(v) for v in values]
        return self.serde.encode(values)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock = None

    def __repr__(self) -> str:
        return f"NatsSubject({self.subject!r})"


def resolve(target) -> Target:
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return Topic(target)
    if callable(target):
        return Call(target)
    raise ValueError(
        f"to({target!r}) is not allowed; allowed: a topic name, a callable, Topic(...), Call(...) or NatsSubject(...)"
    )
