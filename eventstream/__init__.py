"""eventstream: a threaded event-streaming engine for free-threaded CPython 3.13t."""

__version__ = "0.1.0"
