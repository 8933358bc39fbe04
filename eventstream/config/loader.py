"""Loading the configuration: defaults < file < EVENTSTREAM_* environment < command-line overrides,
with every value validated against the schema (eventstream.config.schema). Errors name the source,
the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from eventstream.config.schema import Config, ConfigError
from eventstream.runtime import scheduling

# keys that earlier versions read, and what replaced them (the error says so instead of "unknown key")
MOVED_KEYS = {
    f"processors.{tier}.nice": f"scheduling.{tier}: 'batch:N' or 'normal:N' (N = the nice value; default 'batch:10')"
    for tier in ("transactional", "batch")
}


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
    if meta.get("sched"):
        try:
            return str(scheduling.parse(value))
        except ValueError:
            raise ConfigError(source, path, value, scheduling.ALLOWED) from None
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
        if isinstance(item_tp, type) and dataclasses.is_dataclass(item_tp):  # a list of sections (auth.principals)
            out_items = []
            for i, v in enumerate(value):
                item = item_tp()
                _apply(item, v, source, f"{path}[{i}]")
                out_items.append(item)
            return out_items
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
            moved = MOVED_KEYS.get(path)
            if moved is not None:
                raise ConfigError(source, path, value, f"{moved} (this key was replaced)")
            raise ConfigError(source, path, value, f"known keys here: {', '.join(sorted(fields))} (unknown key)")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), value, source, path)
        else:
            setattr(obj, key, _coerce(value, tp, dict(f.metadata), source, path))


def max_payload_bytes(cfg: Config) -> int:
    """The largest payload a frame can carry: max_frame_bytes (TCP) or the datagram (UDP), less the
    smallest header (v1: 3 bytes) and a 1-byte topic."""
    return max(cfg.server.tcp.max_frame_bytes, cfg.server.udp.max_datagram_bytes - 4) - 4


def _check_whole(cfg: Config, source: str) -> None:
    """Cross-field rules."""
    for tier in ("transactional", "batch"):
        p = getattr(cfg.processors, tier)
        if p.max_workers < p.workers:
            raise ConfigError(
                source,
                f"processors.{tier}.max_workers",
                p.max_workers,
                f"an integer >= processors.{tier}.workers ({p.workers})",
            )
    b = cfg.backpressure
    levels = [("elevated", b.elevated), ("degraded", b.degraded), ("critical", b.critical), ("emergency", b.emergency)]
    for (n1, l1), (n2, l2) in zip(levels, levels[1:], strict=False):  # each level with the next
        for attr in ("drop_rate", "depth"):
            if getattr(l2, attr) < getattr(l1, attr):
                raise ConfigError(
                    source,
                    f"backpressure.{n2}.{attr}",
                    getattr(l2, attr),
                    f"a value >= backpressure.{n1}.{attr} ({getattr(l1, attr)})",
                )
    s, t, u = cfg.server, cfg.server.tcp, cfg.server.udp
    if t.enabled and u.enabled and t.port and t.port == u.port and t.host == u.host:
        pass  # TCP and UDP may share a port number
    mt = cfg.metrics
    if mt.enabled and t.enabled and mt.port and mt.port == t.port and mt.host == t.host:
        raise ConfigError(source, "metrics.port", cfg.metrics.port, f"a port other than server.tcp.port ({t.port})")
    if bool(s.tls.cert_file) != bool(s.tls.key_file):
        key = "server.tls.key_file" if s.tls.cert_file else "server.tls.cert_file"
        raise ConfigError(
            source, key, "", "a PEM file path when the other of cert_file/key_file is set (both empty: TLS off)"
        )
    from eventstream.core.payloads import chunk_bytes_for

    need = 2 * chunk_bytes_for(max_payload_bytes(cfg))
    if cfg.payloads.arena_bytes < need:
        raise ConfigError(
            source,
            "payloads.arena_bytes",
            cfg.payloads.arena_bytes,
            f"at least {need} bytes (two chunks of the largest payload, server.tcp.max_frame_bytes="
            f"{t.max_frame_bytes}, rounded up to a power of two), at most {1 << 40}",
        )
    if t.max_partial_bytes and t.max_partial_bytes < t.max_frame_bytes:
        raise ConfigError(
            source,
            "server.tcp.max_partial_bytes",
            t.max_partial_bytes,
            f"0 (no bound) or a value >= server.tcp.max_frame_bytes ({t.max_frame_bytes})",
        )
    _check_principals(s.auth.principals, source)
    del s
    # connectors.* (eventstream/config/subjects.py: subjects, globs, names)
    from eventstream.config.subjects import check_config

    check_config(cfg, source)


def _check_principals(principals, source: str) -> None:
    """server.auth.principals: unique names, exactly one token source, globs that are text."""
    seen = set()
    for i, p in enumerate(principals):
        path = f"server.auth.principals[{i}]"
        if not p.name or not all(c.isalnum() or c in "._-" for c in p.name) or len(p.name) > 64:
            raise ConfigError(source, f"{path}.name", p.name, "1..64 letters, digits, '.', '_' or '-'")
        if p.name in seen:
            raise ConfigError(source, f"{path}.name", p.name, "a name no other principal has")
        seen.add(p.name)
        if bool(p.token_env) == bool(p.token_file):
            raise ConfigError(
                source,
                f"{path}.token_env",
                p.token_env,
                "exactly one of token_env (an environment variable) and token_file (a file) "
                "(the token itself is never written in the configuration)",
            )
        for key in ("produce", "consume"):
            for j, g in enumerate(getattr(p, key)):
                if not g or len(g.encode("utf-8")) > 255:
                    raise ConfigError(source, f"{path}.{key}[{j}]", g, "a topic glob of 1..255 bytes, e.g. 'orders.*'")


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
_ENV_NOT_CONFIG = {
    "EVENTSTREAM_PYTHON",
    "EVENTSTREAM_CPYTHON_TARBALL",
    "EVENTSTREAM_ALLOW_GIL",
    "EVENTSTREAM_VENV",
    "EVENTSTREAM_EXTRAS",
    "EVENTSTREAM_CONFIG",
    "EVENTSTREAM_NO_REEXEC",
    "EVENTSTREAM_TOKEN",
}


def env_overrides(environ: Mapping[str, str] | None = None) -> list[tuple[str, str, Any]]:
    """(env var, dotted key path, value) for every EVENTSTREAM_* configuration variable."""
    environ = os.environ if environ is None else environ
    out = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_CONFIG:
            continue
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
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
            raise ConfigError(
                str(p), f"(YAML syntax at {where})", getattr(exc, "problem", str(exc)), "valid YAML"
            ) from None
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
