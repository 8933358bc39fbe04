"""Recovery on open: cut a torn tail, skip (and report) corrupt regions in the middle, keep the bytes.

A crash (SIGKILL, power loss) can leave the last write half on disk: an incomplete last entry. That
*torn tail* is cut (truncate), as before. Anything else is damage, and damage is never silently
destroyed:

* a corrupt region in the middle (a flipped byte, a bad length field, garbage) is left in place: the
  scanner (storage.reader) resynchronises on the next entry whose magic, length and CRC verify, so
  every record before and after it is kept; the report lists the regions (offsets, bytes, records)
  and a `log_corrupt_regions_skipped` warning is logged;
* a bad tail that is more than a torn last entry (a whole entry with a bad CRC, garbage longer than
  one entry) must still go, or appends would follow garbage: its bytes are first copied to
  `<events file>.corrupt-<UTC timestamp>` next to the log, then the tail is truncated; the report
  says where they went.

The rest of the file is never rewritten.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from eventstream.core import records as rec
from eventstream.storage import format as fmt
from eventstream.storage.scan import CorruptRegion, ScanResult, next_entry, scan_buffer

log = structlog.get_logger("eventstream.storage.recovery")


@dataclass
class RecoveryReport:
    path: str
    created: bool  # the file did not exist (or was empty) and a fresh header was written
    file_bytes: int  # size found on open
    valid_bytes: int  # bytes of the found file that were kept (0 when a fresh header was written)
    records: int  # valid record entries (before, between and after corrupt regions)
    dropped_records: int  # record entries (whole or partial) in the cut tail, estimated by size
    topics: dict[int, str] = field(default_factory=dict)  # file topic id -> name
    problem: str | None = None  # what was wrong (the tail, and/or a summary of the corrupt regions)
    corrupt: list[CorruptRegion] = field(default_factory=list)  # skipped in place, in file order
    skipped_records: int = 0  # record entries estimated lost inside the corrupt regions
    saved_tail: str | None = None  # where the bytes of a cut corrupt (not torn) tail were copied

    @property
    def dropped_bytes(self) -> int:
        """Bytes cut from the end of the file."""
        return self.file_bytes - self.valid_bytes

    @property
    def skipped_bytes(self) -> int:
        """Bytes in corrupt regions, left in place and skipped by every reader."""
        return sum(r.bytes for r in self.corrupt)


_CHUNK = 16 << 20


def _torn(mm, start: int, itemsize: int) -> bool:
    """Whether the bytes from `start` to the end are a torn write: zeros (space the file system
    allocated but the data never reached), or the start of ONE entry that the file ends inside of
    (a partial header, or a plausible header whose entry is longer than what is left)."""
    n = len(mm) - start
    if n < fmt.ENTRY_HEADER_BYTES:
        return True
    magic, length, _crc, kind, _wall = fmt.ENTRY_HEADER.unpack_from(mm, start)
    plausible = magic == fmt.ENTRY_MAGIC and fmt.plausible(kind, length, itemsize)
    if plausible and n < fmt.ENTRY_HEADER_BYTES + length:
        return True
    return all(not mm[o : min(o + _CHUNK, len(mm))].strip(b"\0") for o in range(start, len(mm), _CHUNK))


def _save_tail(p: Path, mm, start: int) -> Path:
    """Copy bytes [start, end) of the log to <name>.corrupt-<UTC timestamp> (fsynced) before a cut."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = p.with_name(f"{p.name}.corrupt-{stamp}")
    k = 1
    while dest.exists():
        dest = p.with_name(f"{p.name}.corrupt-{stamp}.{k}")
        k += 1
    with open(dest, "xb") as f:
        for o in range(start, len(mm), _CHUNK):
            f.write(mm[o : min(o + _CHUNK, len(mm))])
        f.flush()
        os.fsync(f.fileno())
    return dest


def _upgrade_header(p: Path, head: bytes) -> None:
    """Before a writer appends: write back a damaged magic, and mark a version 1 file version 2 (the
    writer appends KIND_BATCH entries, which only version 2 readers know)."""
    version = fmt.FILE_HEADER.unpack_from(head)[1]
    damaged = fmt.header_magic_damaged(head)
    if not damaged and version == fmt.FILE_VERSION:
        return
    with open(p, "r+b") as f:
        if damaged:
            f.write(fmt.FILE_MAGIC)
        if version != fmt.FILE_VERSION:
            f.seek(8)
            f.write(struct.pack("<I", fmt.FILE_VERSION))
        f.flush()
        os.fsync(f.fileno())
    if damaged:
        log.warning(
            "log_header_repaired",
            path=str(p),
            magic=head[:8].hex(),
            hint="the file header's magic was "
            "damaged; the rest of the header was valid, so the log was read on and the magic written back",
        )
    if version != fmt.FILE_VERSION:
        log.info("log_format_upgraded", path=str(p), version_was=version, version=fmt.FILE_VERSION)


PARALLEL_MIN_BYTES = 64 << 20  # a log at least this large is verified by several threads at once


def scan_parallel(mm, dtype, collect=None, threads: int | None = None) -> ScanResult:
    """scan_buffer over the whole file, verified by up to `threads` threads (default: the allowed CPUs,
    at most 4; zlib's CRC runs in parallel): the file is cut where a whole, verified entry starts
    near each share, and each part scanned on its own (with its own collector, merged in order).
    The parts must meet exactly: when a part does not end precisely where the next begins (damage
    across a cut, an entry forged inside a payload taken for a cut), the whole file is scanned again
    by one thread, so the result is always what one scan_buffer pass gives."""
    size = len(mm)
    n = min(4, len(os.sched_getaffinity(0))) if threads is None else threads
    start = fmt.FILE_HEADER_BYTES

    def one() -> ScanResult:
        return scan_buffer(mm, dtype, **(collect.callbacks() if collect is not None else {}))

    if n < 2 or size < max(PARALLEL_MIN_BYTES, 1):
        return one()
    cuts = [start]
    for k in range(1, n):
        at = next_entry(mm, max(start + k * (size - start) // n, cuts[-1] + 1), size, dtype.itemsize)
        if at > cuts[-1]:
            cuts.append(at)
    if len(cuts) < 2:
        return one()
    bounds = list(zip(cuts, [*cuts[1:], size], strict=True))
    parts = [collect.empty_like() if collect is not None else None for _ in bounds]

    def part(k: int) -> ScanResult:
        lo, hi = bounds[k]
        c = parts[k]
        return scan_buffer(mm, dtype, start=lo, stop=hi, **(c.callbacks() if c is not None else {}))

    with ThreadPoolExecutor(len(bounds), thread_name_prefix="es-recovery") as pool:
        results = list(pool.map(part, range(len(bounds))))
    if any(
        r.valid_bytes != hi or r.problem is not None or r.partial
        for r, (_, hi) in zip(results, bounds[:-1], strict=False)
    ):
        return one()  # the parts do not meet: one pass decides
    last = results[-1]
    out = ScanResult(file_bytes=size, valid_bytes=last.valid_bytes, problem=last.problem)
    for r in results:
        out.records += r.records
        out.topics.update(r.topics)
        out.corrupt.extend(r.corrupt)
    if collect is not None:
        for c in parts:
            assert c is not None
            collect.absorb(c)
    return out


def recover(path: str | os.PathLike, payload_bytes: int, collect=None) -> RecoveryReport:
    """Make `path` a valid log for records of `payload_bytes`: create it, or truncate a bad tail.

    Raises format.LogFormatError if the file is not an event log, or was written with another
    payload size (the message says how to proceed). `collect`: a reader.ColumnCollector that meets
    every kept record in the same pass (records of a cut tail are never passed to it).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    size = p.stat().st_size if p.exists() else 0
    if size < fmt.FILE_HEADER_BYTES:
        head = p.read_bytes() if size else b""
        if head and not fmt.FILE_MAGIC.startswith(head[: len(fmt.FILE_MAGIC)]):
            raise fmt.LogFormatError(
                f"{p}: {size} bytes that are not an eventstream event log; allowed: an "
                "event log or no file (move it away to start a new log)"
            )
        with open(p, "wb") as out:
            out.write(fmt.encode_file_header(payload_bytes, time.time_ns()))
            out.flush()
            os.fsync(out.fileno())
        if size:
            log.warning("log_header_torn", path=str(p), dropped_bytes=size)
        return RecoveryReport(
            str(p),
            created=True,
            file_bytes=size,
            valid_bytes=0,
            records=0,
            dropped_records=0,
            problem="torn file header" if size else None,
        )
    with open(p, "rb") as f:
        head = f.read(fmt.FILE_HEADER_BYTES)
    found_payload, _ = fmt.decode_file_header(head, str(p))
    _upgrade_header(p, head)
    if found_payload != payload_bytes:
        raise fmt.LogFormatError(
            f"{p}: written with records.payload_bytes={found_payload}, but the configuration says "
            f"{payload_bytes}; allowed: records.payload_bytes={found_payload} for this file, or move the file "
            "away to start a new log"
        )
    dtype = rec.record_dtype(payload_bytes)
    if size == fmt.FILE_HEADER_BYTES:
        return RecoveryReport(str(p), created=False, file_bytes=size, valid_bytes=size, records=0, dropped_records=0)
    saved = None
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        scan = scan_parallel(mm, dtype, collect)
        if scan.dropped_bytes and not _torn(mm, scan.valid_bytes, dtype.itemsize):
            saved = str(_save_tail(p, mm, scan.valid_bytes))  # damage, not a torn write: keep a copy
    entry_size = fmt.ENTRY_HEADER_BYTES + dtype.itemsize
    dropped = scan.dropped_bytes
    skipped_records = sum(math.ceil(r.bytes / entry_size) for r in scan.corrupt)
    problem = scan.problem
    if scan.corrupt:
        problem = f"{scan.describe_corrupt()}; then {problem}" if problem else scan.describe_corrupt()
    report = RecoveryReport(
        str(p),
        created=False,
        file_bytes=size,
        valid_bytes=scan.valid_bytes,
        records=scan.records,
        dropped_records=math.ceil(dropped / entry_size),
        topics=scan.topics,
        problem=problem,
        corrupt=list(scan.corrupt),
        skipped_records=skipped_records,
        saved_tail=saved,
    )
    if scan.corrupt:
        log.warning(
            "log_corrupt_regions_skipped",
            path=str(p),
            regions=len(scan.corrupt),
            skipped_bytes=report.skipped_bytes,
            skipped_records_estimate=skipped_records,
            kept_records=scan.records,
            first=[{"start": r.start, "end": r.end, "reason": r.reason} for r in scan.corrupt[:10]],
            hint="the damaged bytes are left in place; readers skip them",
        )
    if dropped:
        with open(p, "r+b") as rw:
            rw.truncate(scan.valid_bytes)
            rw.flush()
            os.fsync(rw.fileno())
        log.warning(
            "log_tail_truncated",
            path=str(p),
            offset=scan.valid_bytes,
            dropped_bytes=dropped,
            dropped_records=report.dropped_records,
            kept_records=scan.records,
            reason=scan.problem,
            torn=report.saved_tail is None,
            saved_to=report.saved_tail,
        )
    elif not scan.corrupt:
        log.info("log_recovered", path=str(p), records=scan.records, bytes=size)
    return report
