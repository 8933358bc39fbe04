"""Configuration: typed dataclasses, embedded defaults, YAML file, EVENTSTREAM_* env, CLI overrides.

Precedence: defaults < file < environment < command-line flags.

* Defaults are the dataclass defaults in schema.py; the service runs with no file at all.
* A file is YAML with the same nesting (see config/eventstream.yaml, which documents every key).
* Environment: ``EVENTSTREAM_<SECTION>__<KEY>...`` with ``__`` between levels, e.g.
  ``EVENTSTREAM_SERVER__TCP__PORT=9005``; values are parsed as YAML scalars/lists.
* Flags: ``--set server.tcp.port=9005`` (repeatable) and the few shortcuts each command offers.

Every error names the source (file or env var or flag), the key path, the bad value and what is allowed.
"""

from eventstream.config.loader import (
    _ENV_NOT_CONFIG,
    ENV_PREFIX,
    available_cpus,
    dump_yaml,
    env_overrides,
    load_config,
    parse_cpu_list,
)
from eventstream.config.schema import (
    AffinityConfig,
    AuthConfig,
    BackpressureConfig,
    BatchConfig,
    Config,
    ConfigError,
    LevelThresholds,
    LoggingConfig,
    MetricsConfig,
    NumaConfig,
    QueueConfig,
    QueuesConfig,
    RealtimeConfig,
    RecordsConfig,
    ServerConfig,
    StorageConfig,
    TcpConfig,
    TlsConfig,
    TransactionalConfig,
    UdpConfig,
)

__all__ = [
    "ENV_PREFIX",
    "AffinityConfig",
    "AuthConfig",
    "BackpressureConfig",
    "BatchConfig",
    "Config",
    "ConfigError",
    "LevelThresholds",
    "LoggingConfig",
    "MetricsConfig",
    "NumaConfig",
    "QueueConfig",
    "QueuesConfig",
    "RealtimeConfig",
    "RecordsConfig",
    "ServerConfig",
    "StorageConfig",
    "TcpConfig",
    "TlsConfig",
    "TransactionalConfig",
    "UdpConfig",
    "available_cpus",
    "dump_yaml",
    "env_overrides",
    "load_config",
    "parse_cpu_list",
    "_ENV_NOT_CONFIG",
]
