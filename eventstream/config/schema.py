"""The configuration schema: one typed dataclass per section, with the defaults the service runs on
when there is no file at all. Field metadata carries what validation allows ("range", "pow2",
"cpus", "handler"); eventstream.config.loader applies files, environment and flags onto these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# No DROP_OLD for the engine's queues: it would evict events already accepted. BLOCK_PRODUCER pushes
# back on TCP clients; DROP_NEW sheds at the edge.
OverflowName = Literal["BLOCK_PRODUCER", "DROP_NEW"]
AckName = Literal["accepted", "stored", "synced"]
WaitName = Literal["spin", "yield", "sleep", "block"]


class ConfigError(ValueError):
    """A configuration value is wrong. The message says where, what, and what is allowed."""

    def __init__(self, source: str, path: str, value: Any, allowed: str):
        self.source, self.path, self.value, self.allowed = source, path, value, allowed
        super().__init__(f"{source}: {path}: {value!r} is not allowed; allowed: {allowed}")


# ---------------------------------------------------------------------------------------- sections
@dataclass
class TlsConfig:
    """TLS on every TCP port: ingest, subscribe and metrics/health (stdlib ssl, TLS 1.2+); off while
    cert_file is empty; both files or neither (eventstream/ingest/tls.py)."""

    cert_file: str = ""  # PEM certificate chain
    key_file: str = ""  # PEM private key


@dataclass
class PrincipalConfig:
    """One client identity (server.auth.principals): where its token is, what it may do. The token
    itself is never in the configuration (so never in a config dump or a log): it is read at start
    from the environment variable `token_env` or the file `token_file` (its first line that is not
    blank or a # comment). Rights are topic globs (fnmatch: `*` matches dots too); none = nothing."""

    name: str = ""  # letters, digits, '.', '_', '-'; named in NACKs, SUB_ERRORs and logs
    token_env: str = ""
    token_file: str = ""
    produce: list[str] = field(default_factory=list)  # topics it may send to
    consume: list[str] = field(default_factory=list)  # topics it may subscribe to (the SUBSCRIBE glob)


@dataclass
class AuthConfig:
    """Client tokens: with any configured (shared tokens or principals), a TCP connection must open
    with a HELLO frame carrying one of them (docs/protocol.md, HELLO) or it is refused (NACK reason
    `auth`, closed). A shared token may produce and consume every topic; a principal's token only what
    its globs allow (ingest/auth.py)."""

    tokens: list[str] = field(default_factory=list)
    tokens_file: str = ""  # one token per line (blank lines and lines starting with # ignored)
    principals: list[PrincipalConfig] = field(default_factory=list)


@dataclass
class TcpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9000, metadata={"range": (0, 65535)})
    max_connections: int = field(default=1000, metadata={"range": (1, 1_000_000)})
    # reader threads; 0 = one per CPU the readers may run on (affinity.ingest, else the process's
    # CPUs), at most 4: more readers than CPUs only take turns on them and split the realtime lane
    readers: int = field(default=0, metadata={"range": (0, 256)})
    idle_timeout_s: float = field(default=300.0, metadata={"range": (0.0, 86400.0)})
    max_frame_bytes: int = field(default=1 << 20, metadata={"range": (64, 64 << 20)})
    recv_bytes: int = field(default=256 << 10, metadata={"range": (4096, 64 << 20)})
    rate_limit_events_per_s: float = field(default=0.0, metadata={"range": (0.0, 1e12)})
    backlog: int = field(default=1024, metadata={"range": (1, 65535)})
    # per-client limits (eventstream/ingest/limits.py): connections from one IP address; a partial frame
    # that does not complete within frame_timeout_s closes its connection (0 = never; a connection the
    # engine pushes back is not timed out for that); bytes in partial frames over all connections
    # (past it the connection with the largest partial frame is closed; 0 = no bound)
    max_connections_per_ip: int = field(default=64, metadata={"range": (1, 1_000_000)})
    frame_timeout_s: float = field(default=30.0, metadata={"range": (0.0, 86400.0)})
    # a turn of a reader's loop longer than this (a normal one takes ms) was the reader's own stall (it
    # waited for a lock or the CPU, or a handler ran long on it): that time is not charged to frame_timeout_s
    stall_credit_s: float = field(default=0.5, metadata={"range": (0.01, 3600.0)})
    max_partial_bytes: int = field(default=64 << 20, metadata={"range": (0, 1 << 40)})
    # rejected frames per connection and second written to the DLQ one by one; past it they are
    # counted and summarised in one line, and a connection sending nothing valid is closed
    max_rejects_per_s: int = field(default=100, metadata={"range": (1, 1_000_000_000)})
    # at max_connections a new connection is still accepted when some connection has sent nothing for
    # this long: the idlest one is closed to make room (else the newcomer is refused)
    evict_idle_s: float = field(default=1.0, metadata={"range": (0.0, 86400.0)})
    # a connection that delivers fewer than min_bytes_per_s bytes a second over a window of
    # min_rate_window_s is closed (min_rate; 0 = off). Not judged while the engine pushes it back
    # or it is throttled (we do not read it then). Off by default: idle clients are legitimate
    min_bytes_per_s: float = field(default=0.0, metadata={"range": (0.0, 1e12)})
    min_rate_window_s: float = field(default=30.0, metadata={"range": (0.1, 86400.0)})


@dataclass
class UdpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9001, metadata={"range": (0, 65535)})
    rcvbuf_bytes: int = field(default=4 << 20, metadata={"range": (4096, 1 << 30)})
    batch_datagrams: int = field(default=64, metadata={"range": (1, 1024)})
    max_datagram_bytes: int = field(default=65535, metadata={"range": (64, 65535)})
    # rejected frames per second (whole socket) written to the DLQ one by one; the rest are counted
    # and summarised in one line per second
    max_rejects_per_s: int = field(default=1000, metadata={"range": (1, 1_000_000_000)})
    # datagrams per second from one source address (0 = no bound): past it that source's datagrams
    # are discarded before decoding (counted: udp_datagrams_rate_limited_total), so one flooding
    # sender cannot take the reader from the others; sources tracked at once (oldest forgotten)
    max_datagrams_per_s_per_source: float = field(default=0.0, metadata={"range": (0.0, 1e9)})
    max_sources: int = field(default=65536, metadata={"range": (16, 1 << 24)})


@dataclass
class SubscribeConfig:
    """Subscribers over the wire (eventstream/subscribe, docs/protocol.md "Subscribe"): on by default,
    on loopback like ingest (anyone who reaches it can read every stored event: bind it elsewhere only
    with TLS and tokens, see config/exposure.py)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9002, metadata={"range": (0, 65535)})
    max_subscribers: int = field(default=64, metadata={"range": (1, 100_000)})  # more are refused (SUB_ERROR)
    max_credit: int = field(default=65536, metadata={"range": (1, 1 << 30)})  # outstanding credit per subscriber
    handshake_timeout_s: float = field(default=10.0, metadata={"range": (0.0, 3600.0)})  # HELLO/SUBSCRIBE within
    group_dir: str = ""  # committed group offsets and the segment index; "" = <storage.data_dir>/subscribe
    # consumer groups with their own lag series (metrics subscribe_lag_*{group}); the rest are summed
    # under group="_other" (group names come from clients: each series is kept until restart)
    lag_group_series: int = field(default=100, metadata={"range": (0, 10_000)})


@dataclass
class TenantsConfig:
    """Bounds per tenant: a named principal (server.auth.principals), else a client IP address
    (eventstream/ingest/tenants.py). None survives a restart."""

    # topics one tenant may name first (new to the server) since start; known topics are always allowed
    max_new_topics: int = field(default=4096, metadata={"range": (0, 16_000_000)})  # 0 = no bound
    # TCP connections of one principal (an address: server.tcp.max_connections_per_ip)
    max_connections: int = field(default=256, metadata={"range": (0, 1_000_000)})  # 0 = no bound
    # subscriber connections of one principal or address (all: server.subscribe.max_subscribers)
    max_subscribers: int = field(default=16, metadata={"range": (0, 100_000)})  # 0 = no bound
    # events per second over all of one tenant's TCP connections (0 = no bound); past it its
    # connections are not read until the budget refills (flow control, nothing dropped)
    max_events_per_s: float = field(default=0.0, metadata={"range": (0.0, 1e12)})


@dataclass
class ServerConfig:
    # what a v2 ACK promises for frames that ask for nothing else (docs/protocol.md): "accepted" (in
    # a processor queue), "stored" (in events.bin or the DLQ, written to the OS: survives kill -9),
    # "synced" (and fsynced: survives a power cut)
    ack: AckName = "stored"
    # distinct topics the engine accepts (TCP and UDP together); a frame naming one more is rejected
    # with reason class too_many_topics. Each topic costs roughly 0.2-1 KiB (topic table, event log id
    # map, processor state) until restart: topics are never evicted (docs/protocol.md)
    max_topics: int = field(default=65536, metadata={"range": (1, 16_000_000)})
    # a stop drains: engine workers get this long to finish what was accepted; past it `serve` exits 1
    # (drain_timed_out; what they held is not stored, the next start recovers the log)
    drain_timeout_s: float = field(default=60.0, metadata={"range": (0.1, 86400.0)})
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)  # one section for every TCP port
    tcp: TcpConfig = field(default_factory=TcpConfig)
    udp: UdpConfig = field(default_factory=UdpConfig)
    subscribe: SubscribeConfig = field(default_factory=SubscribeConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)


@dataclass
class RecordsConfig:
    payload_bytes: int = field(default=448, metadata={"range": (0, 1 << 20)})


@dataclass
class PayloadsConfig:
    # payloads larger than records.payload_bytes (up to server.tcp.max_frame_bytes) live in one arena
    # of this many bytes in NUMA memory (size-class slabs, core/payloads.py); when it is full the
    # producer is pushed back like a full queue. At least two chunks (the largest payload rounded up
    # to a power of two, at least 64 KiB): 2 MiB with the default 1 MiB frames
    arena_bytes: int = field(default=128 << 20, metadata={"range": (1 << 17, 1 << 40)})


@dataclass
class NumaConfig:
    node: int = field(default=-1, metadata={"range": (-1, 4095), "doc": "-1 = local node"})
    bind_memory: bool = field(default=True, metadata={"doc": "false: plain memory, libnuma not asked"})


@dataclass
class QueueConfig:
    capacity: int = field(default=65536, metadata={"pow2": True, "range": (2, 1 << 26)})
    overflow: OverflowName = "BLOCK_PRODUCER"


@dataclass
class QueuesConfig:
    realtime: QueueConfig = field(default_factory=lambda: QueueConfig(16384))
    transactional: QueueConfig = field(default_factory=lambda: QueueConfig(65536))
    batch: QueueConfig = field(default_factory=lambda: QueueConfig(65536))
    wait_strategy: WaitName = "block"
    max_batch: int = field(default=4096, metadata={"range": (1, 1 << 20)})


@dataclass
class AffinityConfig:
    """CPU list per thread role; empty = not pinned (any allowed CPU)."""

    acceptor: list[int] = field(default_factory=list, metadata={"cpus": True})
    ingest: list[int] = field(default_factory=list, metadata={"cpus": True})
    udp: list[int] = field(default_factory=list, metadata={"cpus": True})
    realtime: list[int] = field(default_factory=list, metadata={"cpus": True})
    transactional: list[int] = field(default_factory=list, metadata={"cpus": True})
    batch: list[int] = field(default_factory=list, metadata={"cpus": True})
    storage: list[int] = field(default_factory=list, metadata={"cpus": True})
    control: list[int] = field(default_factory=list, metadata={"cpus": True})


@dataclass
class SchedulingConfig:
    """OS scheduling policy per thread role (Linux; eventstream/runtime/scheduling.py): 'normal',
    'normal:N', 'batch', 'batch:N', 'idle', 'fifo:P', 'rr:P'. The bulk tiers' workers run at
    'batch:10' so that an ingest reader (which runs the realtime lane) woken on a CPU they share
    preempts them at once; a policy the OS refuses is logged, not fatal."""

    ingest: str = field(default="normal", metadata={"sched": True})  # TCP readers: they run the realtime lane
    realtime: str = field(default="normal", metadata={"sched": True})  # es-realtime
    transactional: str = field(default="batch:10", metadata={"sched": True})  # es-transactional-*
    batch: str = field(default="batch:10", metadata={"sched": True})  # es-batch-*


@dataclass
class RealtimeConfig:
    handler: str = field(default="eventstream.engine.handlers:noop", metadata={"handler": True})
    topics: list[str] = field(default_factory=lambda: ["*"])
    sla_us: float = field(default=100.0, metadata={"range": (0.0, 1e9)})
    # caller runs: an ingest reader handles realtime events itself when the realtime queue is idle
    # (no thread handoff before the handler or the ACK); the handler then runs on ingest threads
    inline: bool = True


@dataclass
class TransactionalConfig:
    handler: str = field(default="eventstream.engine.handlers:noop", metadata={"handler": True})
    topics: list[str] = field(default_factory=lambda: ["*"])
    max_retries: int = field(default=3, metadata={"range": (0, 100)})
    retry_backoff_ms: float = field(default=10.0, metadata={"range": (0.0, 60_000.0)})
    workers: int = field(default=1, metadata={"range": (1, 64)})
    max_workers: int = field(default=2, metadata={"range": (1, 64)})
    # caller runs: an ingest reader handles this tier's events itself when their queue partition is idle
    # (no thread handoff, no wake-up: less CPU per event). Off by default: the handler then runs on
    # ingest threads, so a slow or blocking handler stalls that reader, realtime events included (with
    # the stock noop handler, reads of a few events are handled on the reader anyway: ProcessManager.lanes)
    inline: bool = False  # a batch whose handler raises is queued (retries run on the tier's workers)


@dataclass
class BatchConfig:
    handler: str = field(default="eventstream.engine.handlers:noop", metadata={"handler": True})
    topics: list[str] = field(default_factory=lambda: ["*"])
    aggregate: str = field(default="", metadata={"handler": True, "doc": "module:function or empty"})
    window_s: float = field(default=5.0, metadata={"range": (0.001, 86400.0)})
    workers: int = field(default=1, metadata={"range": (1, 64)})
    max_workers: int = field(default=2, metadata={"range": (1, 64)})
    # caller runs: an ingest reader handles this tier's events itself when their queue partition is idle
    # (no thread handoff, no wake-up: less CPU per event). Off by default: the handler then runs on
    # ingest threads, so a slow or blocking handler stalls that reader, realtime events included (with
    # the stock noop handler, reads of a few events are handled on the reader anyway: ProcessManager.lanes)
    inline: bool = False


@dataclass
class ProcessorsConfig:
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    transactional: TransactionalConfig = field(default_factory=TransactionalConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)


@dataclass
class DedupConfig:
    """Idempotency: an event with an id is stored once per (topic, event id) within the window, in
    every tier; the tables are rebuilt at start from the tail of events.bin."""

    window_s: float = field(default=3600.0, metadata={"range": (0.0, 30 * 86400.0)})  # 0 = off
    buckets: int = field(default=4096, metadata={"pow2": True, "range": (16, 1 << 26)})  # initial, grows
    # memory all dedup tables share (24 bytes a bucket; 32-64 bytes per id held); past it the oldest
    # ids are evicted and the window actually held shrinks (exported, counted)
    max_bytes: int = field(default=1 << 30, metadata={"range": (1 << 16, 1 << 40)})
    # the tables saved to <data_dir>/dedup.snap this often while the log grows (and at a clean stop),
    # so a start reads only the log after it (engine/dedup_snapshot.py); 0 = off: every start reads
    # the whole window from the log
    snapshot_interval_s: float = field(default=60.0, metadata={"range": (0.0, 86400.0)})


@dataclass
class LevelThresholds:
    drop_rate: float = field(default=0.01, metadata={"range": (0.0, 1.0)})
    depth: float = field(default=0.5, metadata={"range": (0.0, 100.0)})


@dataclass
class BackpressureConfig:
    interval_ms: float = field(default=100.0, metadata={"range": (1.0, 60_000.0)})
    # queued events (all queues) that count as depth 1.0 for the thresholds below
    max_queue_depth: int = field(default=65536, metadata={"range": (1, 1 << 30)})
    min_events_for_evaluation: int = field(default=1000, metadata={"range": (0, 1 << 40)})
    recovery_factor: float = field(default=0.8, metadata={"range": (0.0, 1.0)})
    min_dwell_ms: float = field(default=1000.0, metadata={"range": (0.0, 3_600_000.0)})  # held before a step down
    elevated: LevelThresholds = field(default_factory=lambda: LevelThresholds(0.01, 0.50))
    degraded: LevelThresholds = field(default_factory=lambda: LevelThresholds(0.02, 0.75))
    critical: LevelThresholds = field(default_factory=lambda: LevelThresholds(0.04, 1.00))
    emergency: LevelThresholds = field(default_factory=lambda: LevelThresholds(0.10, 1.50))


@dataclass
class StorageConfig:
    data_dir: str = "data"
    events_file: str = "events.bin"
    dlq_file: str = "dlq_log.txt"
    # events.bin in segments: past this size the file becomes events.bin.<n> and a new one starts
    # (0 = one file forever); keep at most this many closed segments (0 = all) / this old (0 = any age)
    events_max_bytes: int = field(default=1 << 30, metadata={"range": (0, 1 << 50)})
    events_max_segments: int = field(default=0, metadata={"range": (0, 1_000_000)})
    events_max_age_s: float = field(default=0.0, metadata={"range": (0.0, 100 * 365 * 86400.0)})
    # retention keeps a segment (and every newer one) until every named consumer group has committed
    # past it (false: delete anyway; each such segment is counted in log_segments_deleted_unread_total)
    retention_respects_groups: bool = True
    dlq_max_bytes: int = field(default=64 << 20, metadata={"range": (4096, 1 << 40)})  # then a new segment
    dlq_max_segments: int = field(default=8, metadata={"range": (0, 100_000)})  # old segments kept
    dlq_max_age_s: float = field(default=0.0, metadata={"range": (0.0, 10 * 365 * 86400.0)})  # 0 = no age limit
    # every processed batch is written to the OS before it is released (the `stored` ACK promise);
    # fsync: background policy for events whose ACK does not ask for one ("synced" ACKs always do)
    fsync: Literal["none", "interval", "always"] = "interval"
    fsync_interval_ms: float = field(default=1000.0, metadata={"range": (0.0, 3_600_000.0)})


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9100, metadata={"range": (0, 65535)})
    path: str = "/metrics"
    # with server.tls configured, this port speaks HTTPS too (false: plain HTTP, e.g. a scraper on loopback)
    tls: bool = True
    # with server.auth tokens configured, `path` needs "Authorization: Bearer <token>"; /healthz and
    # /readyz stay open (they tell only ok / not ok and the names of dead threads)
    auth: bool = True


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    file: str = ""


# ---------------------------------------------------------------------------------------- connectors
# (eventstream/connectors: NATS JetStream sink and source; validated by config.subjects.check_config)
PriorityName = Literal["BATCH", "LOW", "MEDIUM", "HIGH", "CRITICAL"]


@dataclass
class NatsSinkConfig:
    enabled: bool = False
    topics: list[str] = field(default_factory=lambda: [">"])  # topic globs forwarded (NATS token semantics)
    max_in_flight: int = field(default=512, metadata={"range": (1, 1 << 20)})  # publishes awaiting their ack
    max_attempts: int = field(default=5, metadata={"range": (1, 1000)})  # then our DLQ (category "connector")
    ack_timeout_s: float = field(default=5.0, metadata={"range": (0.01, 3600.0)})
    max_pending: int = field(default=200_000, metadata={"range": (1, 1 << 30)})  # events taken from the log per step


@dataclass
class NatsSourceConfig:
    enabled: bool = False
    durable: str = "eventstream"
    subjects: list[str] = field(default_factory=lambda: [">"])  # topic globs under subject_prefix
    batch: int = field(default=256, metadata={"range": (1, 1 << 16)})
    max_deliver: int = field(default=5, metadata={"range": (1, 1 << 20)})  # a later delivery goes to our DLQ
    ack_wait_s: float = field(default=30.0, metadata={"range": (0.1, 86400.0)})
    max_ack_pending: int = field(default=4096, metadata={"range": (1, 1 << 24)})
    default_priority: PriorityName = "MEDIUM"


@dataclass
class NatsConfig:
    enabled: bool = False
    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    stream: str = "EVENTS"
    subject_prefix: str = "events"
    create_stream: bool = True  # create `stream` on `<subject_prefix>.>` if it does not exist
    duplicate_window_s: float = field(default=120.0, metadata={"range": (0.0, 86400.0)})
    connect_timeout_s: float = field(default=5.0, metadata={"range": (0.1, 600.0)})
    sink: NatsSinkConfig = field(default_factory=NatsSinkConfig)
    source: NatsSourceConfig = field(default_factory=NatsSourceConfig)


@dataclass
class ConnectorsConfig:
    nats: NatsConfig = field(default_factory=NatsConfig)


@dataclass
class FlowsConfig:
    # dataflows run inside the engine (eventstream/flow, docs/flows.md): each entry 'module:function'
    # names a function returning a Flow (or a list of them)
    builders: list[str] = field(default_factory=list)
    parallelism: int = field(default=1, metadata={"range": (1, 64)})  # partition threads per flow
    cpus: list[int] = field(default_factory=list, metadata={"cpus": True})  # CPUs of the flow threads
    snapshot_interval_s: float = field(default=5.0, metadata={"range": (0.0, 86400.0)})  # state + offset
    chunk_bytes: int = field(default=1 << 20, metadata={"range": (4096, 1 << 30)})  # log read per step
    state_dir: str = ""  # snapshots and status files; '' = <storage.data_dir>/flows


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    payloads: PayloadsConfig = field(default_factory=PayloadsConfig)
    numa: NumaConfig = field(default_factory=NumaConfig)
    queues: QueuesConfig = field(default_factory=QueuesConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    processors: ProcessorsConfig = field(default_factory=ProcessorsConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    backpressure: BackpressureConfig = field(default_factory=BackpressureConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    connectors: ConnectorsConfig = field(default_factory=ConnectorsConfig)
    flows: FlowsConfig = field(default_factory=FlowsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)
