"""Storage: the append-only event log `data/events.bin` (format, writer, scan, reader, recovery, tail)."""

from eventstream.storage.format import LogFormatError
from eventstream.storage.reader import EventLogReader, ScanResult, StoredBatch
from eventstream.storage.recovery import RecoveryReport, recover
from eventstream.storage.writer import EventLog

__all__ = ["EventLog", "EventLogReader", "LogFormatError", "RecoveryReport", "ScanResult", "StoredBatch", "recover"]
