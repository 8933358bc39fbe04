"""Recovery on open: find the valid prefix of the log and truncate a torn or corrupt tail.

A crash (SIGKILL, power loss) can leave the last write half on disk. Entries carry a magic, a length and a
CRC, so the scanner finds the first entry that is not whole and intact; everything from there on is cut
off, and the report says how much. We cut rather than skip ahead to the next magic because entries are
only ever appended: damage that is not at the tail means the disk lied, and silently resynchronising
would hide that (the report names the offset and the reason, and the writer logs it as a warning).
"""

from __future__ import annotations

import math
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from eventstream.core import records as rec
from eventstream.storage import format as fmt
from eventstream.storage.reader import scan_buffer

log = structlog.get_logger("eventstream.storage.recovery")


@dataclass
class RecoveryReport:
    path: str
    created: bool  # the file did not exist (or was empty) and a fresh header was written
    file_bytes: int  # size found on open
    valid_bytes: int  # bytes of the found file that were kept (0 when a fresh header was written)
    records: int  # record entries kept
    dropped_records: int  # record entries (whole or partial) in the cut tail, estimated by size
    topics: dict[int, str] = field(default_factory=dict)  # file topic id -> name
    problem: str | None = None

    @property
    def dropped_bytes(self) -> int:
        return self.file_bytes - self.valid_bytes


def recover(path: str | os.PathLike, payload_bytes: int) -> RecoveryReport:
    """Make `path` a valid log for records of `payload_bytes`: create it, or truncate a bad tail.

    Raises format.LogFormatError if the file is not an event log, or was written with another
    payload size (the message says how to proceed).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    size = p.stat().st_size if p.exists() else 0
    if size < fmt.FILE_HEADER_BYTES:
        head = p.read_bytes() if size else b""
        if head and not fmt.FILE_MAGIC.startswith(head[:len(fmt.FILE_MAGIC)]):
            raise fmt.LogFormatError(f"{p}: {size} bytes that are not an eventstream event log; allowed: an "
                                     "event log or no file (move it away to start a new log)")
        with open(p, "wb") as f:
            f.write(fmt.encode_file_header(payload_bytes, time.time_ns()))
            f.flush()
            os.fsync(f.fileno())
        if size:
            log.warning("log_header_torn", path=str(p), dropped_bytes=size)
        return RecoveryReport(str(p), created=True, file_bytes=size, valid_bytes=0, records=0, dropped_records=0,
                              problem="torn file header" if size else None)
    with open(p, "rb") as f:
        found_payload, _ = fmt.decode_file_header(f.read(fmt.FILE_HEADER_BYTES), str(p))
    if found_payload != payload_bytes:
        raise fmt.LogFormatError(
            f"{p}: written with records.payload_bytes={found_payload}, but the configuration says "
            f"{payload_bytes}; allowed: records.payload_bytes={found_payload} for this file, or move the file "
            "away to start a new log")
    dtype = rec.record_dtype(payload_bytes)
    if size == fmt.FILE_HEADER_BYTES:
        return RecoveryReport(str(p), created=False, file_bytes=size, valid_bytes=size, records=0, dropped_records=0)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        scan = scan_buffer(mm, dtype)
    entry_size = fmt.ENTRY_HEADER_BYTES + dtype.itemsize
    dropped = scan.dropped_bytes
    report = RecoveryReport(str(p), created=False, file_bytes=size, valid_bytes=scan.valid_bytes,
                            records=scan.records, dropped_records=math.ceil(dropped / entry_size),
                            topics=scan.topics, problem=scan.problem)
    if dropped:
        with open(p, "r+b") as f:
            f.truncate(scan.valid_bytes)
            f.flush()
            os.fsync(f.fileno())
        log.warning("log_tail_truncated", path=str(p), dropped_bytes=dropped,
                    dropped_records=report.dropped_records, kept_records=scan.records, reason=scan.problem)
    else:
        log.info("log_recovered", path=str(p), records=scan.records, bytes=size)
    return report
