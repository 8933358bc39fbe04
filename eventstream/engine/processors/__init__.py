"""Processor threads: realtime (alerts), transactional (dedup + retries), batch (tumbling windows)."""

from eventstream.engine.processors.base import Processor, Sinks
from eventstream.engine.processors.batch import BatchProcessor, Window, WindowTable
from eventstream.engine.processors.realtime import RealtimeProcessor
from eventstream.engine.processors.transactional import TransactionalProcessor

__all__ = [
    "Processor",
    "Sinks",
    "RealtimeProcessor",
    "TransactionalProcessor",
    "BatchProcessor",
    "Window",
    "WindowTable",
]
