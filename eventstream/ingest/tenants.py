"""Tenant bounds (`server.tenants.*`): no client can fill a shared table for the others.

A *tenant* is a named principal (server.auth.principals, ingest/auth.py), or, for connections without
one (no tokens, or a shared token), the client's IP address. Each tenant has, across all of its
connections:

* new topics: at most `max_new_topics` topics it named first since the server started. The shared
  topic table (server.max_topics) is rebuilt from the log at start, but these counts are not: a
  tenant that reached its quota is not locked out after a restart, and no tenant can fill the table
  for the others (topics the server already knows are always allowed);
* TCP connections: at most `max_connections` for a principal (per IP: server.tcp.max_connections_per_ip);
* subscriber connections: at most `max_subscribers` (server.subscribe.max_subscribers overall);
* events per second: `max_events_per_s` over all of its TCP connections together (0 = no bound), a
  token bucket shared by the reader threads; a connection past it is not read until the bucket has
  refilled (TCP flow control slows the client; nothing is dropped).

TopicGate stands between a connection's decoder and the shared topic table: the principal's produce
rights (auth.py) first, then this quota. The decoder asks it once per distinct topic per connection.

The table of tenants is bounded (MAX_TENANTS): tenants with no connection are forgotten first (their
topic counts with them: a bounded table cannot remember every address forever).
"""

from __future__ import annotations

import threading
import time

from eventstream.core.topics import TopicLimitError
from eventstream.ingest.auth import Forbidden, Principal

MAX_TENANTS = 65536


class TopicQuota(TopicLimitError):
    """A tenant's new-topic quota is used up (rejected like a full topic table: too_many_topics)."""

    error_class = "too_many_topics"

    def __init__(self, reason: str):
        self.limit = 0
        OverflowError.__init__(self, reason)


class Tenant:
    __slots__ = ("key", "new_topics", "connections", "subscribers", "tokens", "stamp", "lock")

    def __init__(self, key: str, burst: float):
        self.key = key
        self.new_topics = 0
        self.connections = 0
        self.subscribers = 0
        self.tokens = burst
        self.stamp = time.monotonic()
        self.lock = threading.Lock()


class Tenants:
    def __init__(self, config):
        """`config`: a TenantsConfig."""
        self.config = config
        self.rate = float(config.max_events_per_s)
        self.burst = max(self.rate * 0.1, 1.0) if self.rate else 0.0
        self._lock = threading.Lock()
        self._tenants: dict[str, Tenant] = {}
        self.refused = {"topics": 0, "connections": 0, "subscribers": 0}
        self.throttled = 0  # times a connection waited for its tenant's events/s bucket

    @classmethod
    def unbounded(cls) -> Tenants:
        """No tenant bounds (servers built without a configuration, e.g. in tests)."""
        from eventstream.config.schema import TenantsConfig

        return cls(TenantsConfig(max_new_topics=0, max_connections=0, max_subscribers=0, max_events_per_s=0.0))

    @staticmethod
    def key(principal: Principal | None, ip: str) -> str:
        if principal is not None and principal.id:
            return f"principal:{principal.name}"
        return f"ip:{ip}"

    def get(self, key: str) -> Tenant:
        t = self._tenants.get(key)
        if t is not None:
            return t
        with self._lock:
            t = self._tenants.get(key)
            if t is None:
                if len(self._tenants) >= MAX_TENANTS:
                    self._forget_idle_locked()
                t = self._tenants[key] = Tenant(key, self.burst)
            return t

    def _forget_idle_locked(self) -> None:
        idle = [k for k, t in self._tenants.items() if not t.connections and not t.subscribers]
        for k in idle[: max(1, len(idle) // 2)]:
            del self._tenants[k]

    def __len__(self) -> int:
        return len(self._tenants)

    # ------------------------------------------------------------------------------ connections
    def connect(self, t: Tenant, principal: Principal | None) -> str:
        """Count a TCP connection of `t`; a refusal reason ("" = admitted). Only named principals are
        bounded here (an address is bounded by server.tcp.max_connections_per_ip at accept)."""
        limit = self.config.max_connections
        with t.lock:
            if principal is not None and principal.id and limit and t.connections >= limit:
                self.refused["connections"] += 1
                return (
                    f"limit: principal {principal.name!r} has {t.connections} connections open; allowed: at most "
                    f"server.tenants.max_connections={limit}"
                )
            t.connections += 1
        return ""

    def disconnect(self, t: Tenant) -> None:
        with t.lock:
            t.connections = max(0, t.connections - 1)

    def subscribe(self, t: Tenant) -> str:
        limit = self.config.max_subscribers
        with t.lock:
            if limit and t.subscribers >= limit:
                self.refused["subscribers"] += 1
                who = t.key.replace("principal:", "principal ").replace("ip:", "address ")
                return (
                    f"too many subscribers: {who} has {t.subscribers} subscriber connections; allowed: at most "
                    f"server.tenants.max_subscribers={limit}"
                )
            t.subscribers += 1
        return ""

    def unsubscribe(self, t: Tenant) -> None:
        with t.lock:
            t.subscribers = max(0, t.subscribers - 1)

    # ------------------------------------------------------------------------------ events/s
    def take(self, t: Tenant, n: int, now: float) -> float:
        """Charge `n` events to `t`'s bucket; seconds its connections must wait (0: none)."""
        if not self.rate or n <= 0:
            return 0.0
        with t.lock:
            t.tokens = min(self.burst, t.tokens + (now - t.stamp) * self.rate) - n
            t.stamp = now
            if t.tokens >= 0:
                return 0.0
            self.throttled += 1
            return -t.tokens / self.rate

    def statistics(self) -> dict:
        return {"tenants": len(self._tenants), "refused": dict(self.refused), "throttled": self.throttled}


def admit(conn, principal: Principal | None, ip: str, tenants: Tenants) -> str:
    """A connection's HELLO (or its first frame, without tokens) was accepted: remember its principal
    (conn.principal, conn.principal_id; the decoder's principal_id and principal_key, which it puts
    into every record) and its tenant, count the connection, and put a TopicGate between its decoder and the
    topic table. Returns a refusal reason ("" = admitted; the caller refuses the connection)."""
    conn.principal = principal
    conn.principal_id = 0 if principal is None else principal.id
    dec = conn.decoder
    dec.principal_id = conn.principal_id
    dec.principal_key = 0 if principal is None else principal.key  # into the records (dedup key, log)
    t = tenants.get(Tenants.key(principal, ip))
    why = tenants.connect(t, principal)
    if why:
        return why
    conn.tenant = t
    dec.topics = TopicGate(dec.topics, principal, t, tenants)
    return ""


class TopicGate:
    """The topic table as one connection sees it: produce rights (auth.py), then the tenant's quota."""

    __slots__ = ("table", "principal", "tenant", "tenants")

    def __init__(self, table, principal: Principal | None, tenant: Tenant, tenants: Tenants):
        self.table, self.principal, self.tenant, self.tenants = table, principal, tenant, tenants

    def intern(self, name: bytes | str) -> int:
        p = self.principal
        if p is not None and not p.unrestricted:
            text = name if isinstance(name, str) else bytes(name).decode("utf-8")  # (a memoryview has no decode)
            if not p.may_produce(text):
                raise Forbidden(p.refuse_produce(text))
        key = name.encode("utf-8") if isinstance(name, str) else bytes(name)
        tid = self.table._ids.get(key)
        if tid is not None:
            return tid
        limit = self.tenants.config.max_new_topics
        t = self.tenant
        if limit and t.new_topics >= limit:
            self.tenants.refused["topics"] += 1
            who = t.key.replace("principal:", "principal ").replace("ip:", "address ")
            raise TopicQuota(
                f"too_many_topics: {who} named {t.new_topics} new topics since the server started; "
                f"allowed: topics the server already knows, or at most server.tenants.max_new_topics="
                f"{limit} new ones"
            )
        tid = self.table.intern(key)
        with t.lock:
            t.new_topics += 1
        return tid

    def __getattr__(self, attr):  # name(), names(), limit, ... of the real table
        return getattr(self.table, attr)
