"""Logging with structlog: JSON lines off a terminal, readable console output on one."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None, file: str = "") -> None:
    """Set up structlog for the process. `fmt` is auto | json | console."""
    if level not in _LEVELS:
        raise ValueError(f"log level {level!r} is not allowed; allowed: {', '.join(_LEVELS)}")
    if file:
        stream = open(file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives for the process
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer())
    elif fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    else:
        raise ValueError(f"log format {fmt!r} is not allowed; allowed: auto, json, console")
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str):
    return structlog.get_logger(name)
