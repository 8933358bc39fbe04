"""Errors raised across layers. Imports nothing from eventstream, so any layer may raise them."""

from __future__ import annotations


class StartupError(RuntimeError):
    """The service cannot start (port in use, bad handler, unwritable data dir, missing nats-py...).
    The message names what was wrong and what is allowed; `eventstream serve` prints it and exits 2."""


def startup_refused(build, *args, **kw):
    """`build(*args, **kw)`: an edge built from the configuration, where what it refuses (ValueError,
    OSError) is a StartupError with the same message."""
    try:
        return build(*args, **kw)
    except (ValueError, OSError) as exc:
        raise StartupError(str(exc)) from None
