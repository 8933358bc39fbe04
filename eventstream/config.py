"""Configuration: typed dataclasses, embedded defaults, YAML file, EVENTSTREAM_* env, CLI overrides.

Precedence: defaults < file < environment < command-line flags.

* Defaults are the dataclass defaults below; the service runs with no file at all.
* A file is YAML with the same nesting (see config/eventstream.yaml, which documents every key).
* Environment: ``EVENTSTREAM_<SECTION>__<KEY>...`` with ``__`` between levels, e.g.
  ``EVENTSTREAM_SERVER__TCP__PORT=9005``; values are parsed as YAML scalars/lists.
* Flags: ``--set server.tcp.port=9005`` (repeatable) and the few shortcuts each command offers.

Every error names the source (file or env var or flag), the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

OverflowName = Literal["DROP_OLD", "BLOCK_PRODUCER", "DROP_NEW"]
WaitName = Literal["spin", "yield", "sleep", "block"]


class ConfigError(ValueError):
    """A configuration value is wrong. The message says where, what, and what is allowed."""

    def __init__(self, source: str, path: str, value: Any, allowed: str):
        self.source, self.path, self.value, self.allowed = source, path, value, allowed
        super().__init__(f"{source}: {path}: {value!r} is not allowed; allowed: {allowed}")


# ---------------------------------------------------------------------------------------- sections
@dataclass
class TcpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9000, metadata={"range": (0, 65535)})
    max_connections: int = field(default=1000, metadata={"range": (1, 1_000_000)})
    readers: int = field(default=2, metadata={"range": (1, 256)})
    idle_timeout_s: float = field(default=300.0, metadata={"range": (0.0, 86400.0)})
    max_frame_bytes: int = field(default=1 << 20, metadata={"range": (64, 64 << 20)})
    recv_bytes: int = field(default=256 << 10, metadata={"range": (4096, 64 << 20)})
    rate_limit_events_per_s: float = field(default=0.0, metadata={"range": (0.0, 1e12)})
    ack_every_events: int = field(default=1000, metadata={"range": (1, 1_000_000)})
    ack_interval_ms: float = field(default=5.0, metadata={"range": (0.1, 60_000.0)})
    backlog: int = field(default=1024, metadata={"range": (1, 65535)})


@dataclass
class UdpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9001, metadata={"range": (0, 65535)})
    rcvbuf_bytes: int = field(default=4 << 20, metadata={"range": (4096, 1 << 30)})
    batch_datagrams: int = field(default=64, metadata={"range": (1, 1024)})
    max_datagram_bytes: int = field(default=65535, metadata={"range": (64, 65535)})


@dataclass
class ServerConfig:
    tcp: TcpConfig = field(default_factory=TcpConfig)
    udp: UdpConfig = field(default_factory=UdpConfig)


@dataclass
class RecordsConfig:
    payload_bytes: int = field(default=448, metadata={"range": (0, 1 << 20)})


@dataclass
class NumaConfig:
    node: int = field(default=-1, metadata={"range": (-1, 4095), "doc": "-1 = local node"})
    bind_memory: bool = True


@dataclass
class QueueConfig:
    capacity: int = field(default=65536, metadata={"pow2": True, "range": (2, 1 << 26)})
    overflow: OverflowName = "DROP_NEW"
    block_timeout_ms: float = field(default=1000.0, metadata={"range": (0.0, 3_600_000.0)})


@dataclass
class QueuesConfig:
    ingest: QueueConfig = field(default_factory=lambda: QueueConfig(65536, "BLOCK_PRODUCER", 1000.0))
    realtime: QueueConfig = field(default_factory=lambda: QueueConfig(16384, "DROP_OLD", 100.0))
    transactional: QueueConfig = field(default_factory=lambda: QueueConfig(65536, "BLOCK_PRODUCER", 1000.0))
    batch: QueueConfig = field(default_factory=lambda: QueueConfig(65536, "DROP_NEW", 0.0))
    wait_strategy: WaitName = "block"
    max_batch: int = field(default=4096, metadata={"range": (1, 1 << 20)})


@dataclass
class AffinityConfig:
    """CPU list per thread role; empty = not pinned (any allowed CPU)."""

    acceptor: list[int] = field(default_factory=list, metadata={"cpus": True})
    ingest: list[int] = field(default_factory=list, metadata={"cpus": True})
    udp: list[int] = field(default_factory=list, metadata={"cpus": True})
    dispatcher: list[int] = field(default_factory=list, metadata={"cpus": True})
    realtime: list[int] = field(default_factory=list, metadata={"cpus": True})
    transactional: list[int] = field(default_factory=list, metadata={"cpus": True})
    batch: list[int] = field(default_factory=list, metadata={"cpus": True})
    storage: list[int] = field(default_factory=list, metadata={"cpus": True})
    control: list[int] = field(default_factory=list, metadata={"cpus": True})


@dataclass
class RealtimeConfig:
    handler: str = field(default="eventstream.engine.handlers:noop", metadata={"handler": True})
    topics: list[str] = field(default_factory=lambda: ["*"])
    sla_us: float = field(default=100.0, metadata={"range": (0.0, 1e9)})


@dataclass
class TransactionalConfig:
    handler: str = field(default="eventstream.engine.handlers:noop", metadata={"handler": True})
    topics: list[str] = field(default_factory=lambda: ["*"])
    max_retries: int = field(default=3, metadata={"range": (0, 100)})
    retry_backoff_ms: float = field(default=10.0, metadata={"range": (0.0, 60_000.0)})
    workers: int = field(default=1, metadata={"range": (1, 64)})
    max_workers: int = field(default=2, metadata={"range": (1, 64)})
    dedup_buckets: int = field(default=4096, metadata={"pow2": True, "range": (16, 1 << 26)})
    dedup_window_s: float = field(default=3600.0, metadata={"range": (0.0, 30 * 86400.0)})


@dataclass
class BatchConfig:
    handler: str = field(default="eventstream.engine.handlers:noop", metadata={"handler": True})
    topics: list[str] = field(default_factory=lambda: ["*"])
    aggregate: str = field(default="", metadata={"handler": True, "doc": "module:function or empty"})
    window_s: float = field(default=5.0, metadata={"range": (0.001, 86400.0)})
    workers: int = field(default=1, metadata={"range": (1, 64)})
    max_workers: int = field(default=2, metadata={"range": (1, 64)})


@dataclass
class ProcessorsConfig:
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    transactional: TransactionalConfig = field(default_factory=TransactionalConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)


@dataclass
class LevelThresholds:
    drop_rate: float = field(default=0.01, metadata={"range": (0.0, 1.0)})
    depth: float = field(default=0.5, metadata={"range": (0.0, 100.0)})


@dataclass
class BackpressureConfig:
    interval_ms: float = field(default=100.0, metadata={"range": (1.0, 60_000.0)})
    max_queue_depth: int = field(default=5000, metadata={"range": (1, 1 << 30)})
    min_events_for_evaluation: int = field(default=1000, metadata={"range": (0, 1 << 40)})
    recovery_factor: float = field(default=0.8, metadata={"range": (0.0, 1.0)})
    elevated: LevelThresholds = field(default_factory=lambda: LevelThresholds(0.01, 0.50))
    degraded: LevelThresholds = field(default_factory=lambda: LevelThresholds(0.02, 0.75))
    critical: LevelThresholds = field(default_factory=lambda: LevelThresholds(0.04, 1.00))
    emergency: LevelThresholds = field(default_factory=lambda: LevelThresholds(0.10, 1.50))


@dataclass
class StorageConfig:
    data_dir: str = "data"
    events_file: str = "events.bin"
    dlq_file: str = "dlq_log.txt"
    flush_events: int = field(default=100, metadata={"range": (1, 1 << 30)})
    flush_interval_ms: float = field(default=50.0, metadata={"range": (0.0, 3_600_000.0)})
    fsync: Literal["none", "interval", "always"] = "interval"
    fsync_interval_ms: float = field(default=1000.0, metadata={"range": (0.0, 3_600_000.0)})


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = field(default=9100, metadata={"range": (0, 65535)})
    path: str = "/metrics"


@dataclass
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    file: str = ""


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    numa: NumaConfig = field(default_factory=NumaConfig)
    queues: QueuesConfig = field(default_factory=QueuesConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    processors: ProcessorsConfig = field(default_factory=ProcessorsConfig)
    backpressure: BackpressureConfig = field(default_factory=BackpressureConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)


# ---------------------------------------------------------------------------------------- loading
def available_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))


def parse_cpu_list(value: Any, source: str, path: str) -> list[int]:
    """Accept [0, 1], 3, or "0-3,6" and return a sorted list of CPU ids."""
    allowed = 'a list of CPU ids, an integer, or a string like "0-3,6"'
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, bool):
        raise ConfigError(source, path, value, allowed)
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        out: list[int] = []
        try:
            for part in value.split(","):
                part = part.strip()
                if "-" in part:
                    lo, hi = part.split("-", 1)
                    lo_i, hi_i = int(lo), int(hi)
                    if hi_i < lo_i:
                        raise ValueError
                    out.extend(range(lo_i, hi_i + 1))
                else:
                    out.append(int(part))
        except ValueError:
            raise ConfigError(source, path, value, allowed) from None
        value = out
    if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        raise ConfigError(source, path, value, allowed)
    if any(c < 0 for c in value):
        raise ConfigError(source, path, value, "CPU ids >= 0")
    return sorted(set(value))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, meta: dict, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    if meta.get("cpus"):
        cpus = parse_cpu_list(value, source, path)
        have = available_cpus()
        missing = [c for c in cpus if c not in have]
        if missing:
            raise ConfigError(source, path, value, f"CPUs this process may run on: {sorted(have)} (missing: {missing})")
        return cpus
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str):
            for c in choices:
                if value == c or value.upper() == str(c).upper():
                    return c
        raise ConfigError(source, path, value, _type_name(tp))
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(source, path, value, _type_name(tp))
        return [_coerce(v, item_tp, {}, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, path, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, path, value, _range_text(tp, meta))
        out = value
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, path, value, _range_text(tp, meta))
        out = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, path, value, "a string")
        if meta.get("handler") and value and ":" not in value:
            raise ConfigError(source, path, value, "a handler as 'module:function'")
        return value
    else:  # pragma: no cover - programming error
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    lo, hi = meta.get("range", (None, None))
    if lo is not None and not lo <= out <= hi:
        raise ConfigError(source, path, value, _range_text(tp, meta))
    if meta.get("pow2") and (out < 1 or out & (out - 1)):
        raise ConfigError(source, path, value, _range_text(tp, meta))
    return out


def _range_text(tp: Any, meta: dict) -> str:
    text = _type_name(tp)
    if "range" in meta:
        lo, hi = meta["range"]
        text += f" in {lo}..{hi}"
    if meta.get("pow2"):
        text += " that is a power of two"
    return text


_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _hints_cache:
        _hints_cache[cls] = typing.get_type_hints(cls)
    return _hints_cache[cls]


def _apply(obj: Any, data: Any, source: str, prefix: str) -> None:
    """Apply a nested mapping onto dataclass `obj`, validating every key and value."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(source, prefix or "(top level)", data, "a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = _hints(type(obj))
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        f = fields.get(key)
        if f is None:
            raise ConfigError(source, path, value, f"known keys here: {', '.join(sorted(fields))} (unknown key)")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), value, source, path)
        else:
            setattr(obj, key, _coerce(value, tp, dict(f.metadata), source, path))


def _check_whole(cfg: Config, source: str) -> None:
    """Cross-field rules."""
    for tier in ("transactional", "batch"):
        p = getattr(cfg.processors, tier)
        if p.max_workers < p.workers:
            raise ConfigError(source, f"processors.{tier}.max_workers", p.max_workers,
                              f"an integer >= processors.{tier}.workers ({p.workers})")
    b = cfg.backpressure
    levels = [("elevated", b.elevated), ("degraded", b.degraded), ("critical", b.critical), ("emergency", b.emergency)]
    for (n1, l1), (n2, l2) in zip(levels, levels[1:]):
        for attr in ("drop_rate", "depth"):
            if getattr(l2, attr) < getattr(l1, attr):
                raise ConfigError(source, f"backpressure.{n2}.{attr}", getattr(l2, attr),
                                  f"a value >= backpressure.{n1}.{attr} ({getattr(l1, attr)})")
    s, t, u = cfg.server, cfg.server.tcp, cfg.server.udp
    if t.enabled and u.enabled and t.port and t.port == u.port and t.host == u.host:
        pass  # TCP and UDP may share a port number
    if cfg.metrics.enabled and t.enabled and cfg.metrics.port and cfg.metrics.port == t.port and cfg.metrics.host == t.host:
        raise ConfigError(source, "metrics.port", cfg.metrics.port, f"a port other than server.tcp.port ({t.port})")
    del s


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(root: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = root
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


ENV_PREFIX = "EVENTSTREAM_"
# environment variables of the same prefix that are not configuration keys
_ENV_NOT_CONFIG = {"EVENTSTREAM_PYTHON", "EVENTSTREAM_CPYTHON_TARBALL", "EVENTSTREAM_ALLOW_GIL",
                   "EVENTSTREAM_VENV", "EVENTSTREAM_EXTRAS", "EVENTSTREAM_CONFIG", "EVENTSTREAM_NO_REEXEC"}


def env_overrides(environ: dict[str, str] | None = None) -> list[tuple[str, str, Any]]:
    """(env var, dotted key path, value) for every EVENTSTREAM_* configuration variable."""
    environ = os.environ if environ is None else environ
    out = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_CONFIG:
            continue
        key = name[len(ENV_PREFIX):].lower().replace("__", ".")
        out.append((name, key, _parse_scalar(raw)))
    return out


def load_config(
    path: str | os.PathLike | None = None,
    *,
    overrides: list[str] | dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Build the effective configuration: defaults < file < env < overrides.

    `overrides` is a list of "dotted.key=value" strings (from --set) or a dict of dotted key -> value.
    """
    cfg = Config()
    if path is None:
        env_path = (os.environ if environ is None else environ).get("EVENTSTREAM_CONFIG")
        path = env_path or None
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("config", "--config", str(p), "a path to an existing YAML file") from None
        except OSError as exc:
            raise ConfigError("config", "--config", str(p), f"a readable YAML file ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
            raise ConfigError(str(p), f"(YAML syntax at {where})", getattr(exc, "problem", str(exc)),
                              "valid YAML") from None
        _apply(cfg, data or {}, str(p), "")
    for name, key, value in env_overrides(environ):
        _apply_dotted(cfg, key, value, f"environment variable {name}")
    items: list[tuple[str, Any, str]] = []
    if isinstance(overrides, dict):
        items = [(k, v, f"override {k}") for k, v in overrides.items()]
    elif overrides:
        for text in overrides:
            if "=" not in text:
                raise ConfigError("--set", text, text, "KEY.PATH=VALUE, e.g. server.tcp.port=9005")
            k, v = text.split("=", 1)
            items.append((k.strip(), _parse_scalar(v), f"--set {text}"))
    for key, value, source in items:
        _apply_dotted(cfg, key, value, source)
    _check_whole(cfg, str(path) if path else "config")
    return cfg


def _apply_dotted(cfg: Config, key: str, value: Any, source: str) -> None:
    tree: dict = {}
    _set_path(tree, key, value)
    _apply(cfg, tree, source, "")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
