"""The event log's entry scanner: vectorized over runs of record entries, resilient to damage.

The scanner walks entries from the file header on. A batch entry (format version 2) is checked with one
CRC and turned into records with a constant number of numpy operations (format.batch_entry_records).
Record entries (version 1) have a fixed size, so a run of them is viewed as one numpy structured array
straight over the mapped file and checked in one pass (magic, length, kind); only the CRC is computed
per entry. Topic entries are rare and parsed one by one.

An entry that is short, has a bad magic/length/kind or a CRC mismatch does not end the scan: the
scanner looks forward for the next offset holding a whole, verified entry (magic, kind, length and
CRC all check out; a length field is never trusted to skip) and goes on from there. The bytes in
between are a *corrupt region*, listed in ScanResult.corrupt with its offsets and why it began. When
no verified entry follows, the bad bytes are the *tail*: valid_bytes is where it starts and `problem`
says why; recovery (storage.recovery) decides whether that tail is a torn write it may cut.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from eventstream.core.topics import MAX_TOPIC_BYTES
from eventstream.storage import format as fmt

SCAN_CHUNK = 16384  # record entries checked per numpy step


class CorruptLogWarning(UserWarning):
    """EventLogReader skipped corrupt regions of a log (details in reader.last_scan.corrupt)."""


@dataclass(frozen=True)
class CorruptRegion:
    """Bytes [start, end) between two verified entries that are not a valid entry."""

    start: int
    end: int
    reason: str  # what was wrong at `start`

    @property
    def bytes(self) -> int:
        return self.end - self.start


@dataclass
class ScanResult:
    """Where the valid part of a log ends, what it holds, and what was skipped on the way."""

    file_bytes: int
    valid_bytes: int  # end of the verified entries (and skipped regions): a bad tail starts here
    records: int = 0  # verified record entries
    topics: dict[int, str] = field(default_factory=dict)
    problem: str | None = None  # why the bytes from valid_bytes to the end are not valid entries
    partial: bool = False  # stopped at `limit_records` with more entries after valid_bytes
    corrupt: list[CorruptRegion] = field(default_factory=list)  # skipped regions before valid_bytes

    @property
    def dropped_bytes(self) -> int:
        """Bytes of the bad tail (from valid_bytes to the end of the file)."""
        return self.file_bytes - self.valid_bytes

    @property
    def skipped_bytes(self) -> int:
        return sum(r.bytes for r in self.corrupt)

    def describe_corrupt(self, limit: int = 5) -> str:
        """One line naming the skipped regions (offsets and sizes), for logs and warnings."""
        parts = [f"bytes {r.start}..{r.end} ({r.bytes} bytes: {r.reason})" for r in self.corrupt[:limit]]
        more = f" and {len(self.corrupt) - limit} more" if len(self.corrupt) > limit else ""
        return f"skipped {len(self.corrupt)} corrupt region(s), {self.skipped_bytes} bytes: " + "; ".join(parts) + more


MAGIC_BYTES = struct.pack("<I", fmt.ENTRY_MAGIC)


def entry_at(buf, pos: int, end: int, itemsize: int) -> int:
    """Size of the whole, verified entry at `pos` (magic, kind, length for that kind, fits before
    `end`, CRC), or 0 if there is none."""
    if end - pos < fmt.ENTRY_HEADER_BYTES:
        return 0
    magic, length, crc, kind, _wall = fmt.ENTRY_HEADER.unpack_from(buf, pos)
    if magic != fmt.ENTRY_MAGIC:
        return 0
    if not fmt.plausible(kind, length, itemsize):
        return 0
    stop = pos + fmt.ENTRY_HEADER_BYTES + length
    if stop > end:
        return 0
    with memoryview(buf) as mv:
        if zlib.crc32(mv[pos + fmt.CRC_START : stop]) != crc:
            return 0
        if kind == fmt.KIND_TOPIC:
            try:
                bytes(mv[pos + fmt.ENTRY_HEADER_BYTES + 4 : stop]).decode("utf-8")
            except UnicodeDecodeError:
                return 0
        if kind == fmt.KIND_RECORD_EXT and _ext_len(mv, pos) != length - itemsize:
            return 0
        if kind == fmt.KIND_BATCH and not _batch_consistent(mv, pos, length, itemsize):
            return 0
    return stop - pos


def _batch_consistent(mv, pos: int, length: int, itemsize: int) -> bool:
    """Whether a batch entry's count and payload lengths agree with its length (CRC already good)."""
    body = pos + fmt.ENTRY_HEADER_BYTES
    count, _cap = fmt.BATCH_HEAD.unpack_from(mv, body)
    pay_at = body + fmt.BATCH_HEAD.size + fmt.BATCH_ROW_BYTES * count
    if count == 0 or pay_at > body + length:
        return False
    rows = np.frombuffer(mv, dtype=fmt.ROW_DTYPE, count=count, offset=body + fmt.BATCH_HEAD.size)
    pl = rows["payload_len"].astype(np.int64)
    ok = int(pl.sum()) == body + length - pay_at and int(pl.max()) <= itemsize - 64
    del rows
    return ok


_PAYLOAD_LEN_AT = fmt.ENTRY_HEADER_BYTES + 40  # payload_len in a record (core/records.py)


def _ext_len(mv, pos: int) -> int:
    return struct.unpack_from("<I", mv, pos + _PAYLOAD_LEN_AT)[0]


def next_entry(buf, pos: int, end: int, itemsize: int) -> int:
    """Offset of the first whole, verified entry at or after `pos` (before `end`), or -1."""
    while True:
        q = buf.find(MAGIC_BYTES, pos, end)
        if q < 0:
            return -1
        if entry_at(buf, q, end, itemsize):
            return q
        pos = q + 1


def _crc_mismatches(mv: memoryview, size: int, n: int, stored: np.ndarray) -> int:
    """Index of the first entry among n whose CRC does not match, or n."""
    crc32 = zlib.crc32
    start = fmt.CRC_START
    computed = np.array([crc32(mv[i * size + start : (i + 1) * size]) for i in range(n)], dtype=np.uint32)
    bad = np.flatnonzero(computed != stored)
    return int(bad[0]) if bad.size else n


def scan_buffer(
    buf,
    record_dtype: np.dtype,
    *,
    on_records: Callable[[np.ndarray], None] | None = None,
    on_topic: Callable[[int, str], None] | None = None,
    start: int = fmt.FILE_HEADER_BYTES,
    limit_records: int | None = None,
    on_ext: Callable[[np.ndarray, memoryview], None] | None = None,
    on_batch: Callable[[np.ndarray, int], None] | None = None,
    batch_dtype: np.dtype | None = None,
    on_rows: Callable[[np.ndarray, int], None] | None = None,
    records_from: int = 0,
    stop: int | None = None,
) -> ScanResult:
    """Scan entries in `buf` (bytes, bytearray or mmap) from `start`; call back per record run / topic
    entry. Corrupt regions are skipped (see the module doc) and listed in the result. With
    `limit_records`, stop (partial=True) once about that many records were scanned, so a caller can
    resume from valid_bytes.

    `on_records` receives a structured view (format.entry_dtype) over `buf`: copy what you keep.
    A KIND_RECORD_EXT entry (a record with its payload after it) goes to `on_ext(view of 1 entry,
    payload memoryview)`, or, without on_ext, to `on_records` as a run of one (its payload unread).
    A KIND_BATCH entry goes to `on_batch(records of batch_dtype (default record_dtype), wall_ns)` when
    given (no entry rows built: a reader that wants the headers alone passes record_dtype(0)), else to
    `on_rows(header rows (format.ROW_DTYPE, a view over `buf`), wall_ns)` when given, else to
    `on_records` as entry rows; with none of the three it is verified and counted, not decoded (what
    recovery needs). `records_from`: the record callbacks meet only entries at or after this offset
    (an entry boundary; everything is still verified and counted): the dedup rebuild reads the keys
    stored after the position its snapshot covers (engine/dedup_snapshot.py). `stop`: scan only up to
    this offset (an entry boundary; default the end of `buf`), as if the buffer ended there.
    """
    end = len(buf) if stop is None else min(stop, len(buf))
    edt = fmt.entry_dtype(record_dtype)
    size = edt.itemsize
    itemsize = record_dtype.itemsize
    result = ScanResult(file_bytes=end, valid_bytes=start)
    mv = memoryview(buf)
    pos = start

    def bad(at: int, reason: str) -> int:
        """The entry at `at` is not valid: the next verified entry's offset (the region in between
        is recorded as corrupt), or -1 when none follows (the tail; result.problem says why)."""
        nxt = -1
        if end - at >= fmt.ENTRY_HEADER_BYTES:
            magic, length, _crc, kind, _wall = fmt.ENTRY_HEADER.unpack_from(mv, at)
            if (
                magic == fmt.ENTRY_MAGIC
                and kind == fmt.KIND_RECORD
                and length == itemsize
                and entry_at(buf, at + size, end, itemsize)
            ):
                # a record entry whose body is damaged: the next entry is where it would have ended
                # (checked first, so bytes inside its payload are never taken for an entry)
                nxt = at + size
            elif (
                magic == fmt.ENTRY_MAGIC
                and kind in (fmt.KIND_RECORD_EXT, fmt.KIND_BATCH)
                and fmt.plausible(kind, length, itemsize)
                and entry_at(buf, at + fmt.ENTRY_HEADER_BYTES + length, end, itemsize)
            ):
                nxt = at + fmt.ENTRY_HEADER_BYTES + length  # likewise for a large-payload or batch entry
        if nxt < 0:
            nxt = next_entry(buf, at + 1, end, itemsize)
        if nxt < 0:
            result.problem = reason
            return -1
        result.corrupt.append(CorruptRegion(at, nxt, reason))
        result.valid_bytes = nxt  # everything before is accounted for: a resumed scan starts here
        return nxt

    try:
        while pos < end:
            if limit_records is not None and result.records >= limit_records:
                result.partial = True
                break
            if end - pos < fmt.ENTRY_HEADER_BYTES:
                result.problem = f"torn entry header at offset {pos} ({end - pos} bytes)"
                break
            magic, length, crc, kind, _wall = fmt.ENTRY_HEADER.unpack_from(mv, pos)
            if magic != fmt.ENTRY_MAGIC:
                pos = bad(pos, f"bad entry magic 0x{magic:08x} at offset {pos}")
                if pos < 0:
                    break
                continue
            if kind == fmt.KIND_RECORD and length == itemsize:
                n_max = min((end - pos) // size, SCAN_CHUNK)
                if n_max == 0:
                    pos = bad(pos, f"torn record entry at offset {pos} ({end - pos} of {size} bytes)")
                    if pos < 0:
                        break
                    continue
                view = np.ndarray((n_max,), dtype=edt, buffer=mv, offset=pos)
                ok = (
                    (view["magic"] == fmt.ENTRY_MAGIC)
                    & (view["length"] == itemsize)
                    & (view["kind"] == fmt.KIND_RECORD)
                )
                n = n_max if bool(ok.all()) else int(np.argmin(ok))
                good = _crc_mismatches(mv[pos : pos + n * size], size, n, view["crc"][:n])
                first = 0 if pos >= records_from else min(good, -(-(records_from - pos) // size))
                if good > first and on_records is not None:
                    on_records(view[first:good])
                del view
                result.records += good
                pos += good * size
                result.valid_bytes = pos
                if good < n:
                    pos = bad(pos, f"CRC mismatch in record entry at offset {pos}")
                    if pos < 0:
                        break
                continue
            if kind == fmt.KIND_BATCH and fmt.plausible(kind, length, itemsize):
                stop = pos + fmt.ENTRY_HEADER_BYTES + length
                if stop > end:
                    pos = bad(pos, f"torn batch entry at offset {pos} ({end - pos} of {stop - pos} bytes)")
                    if pos < 0:
                        break
                    continue
                if zlib.crc32(mv[pos + fmt.CRC_START : stop]) != crc:
                    pos = bad(pos, f"CRC mismatch in batch entry at offset {pos}")
                    if pos < 0:
                        break
                    continue
                if pos < records_from:
                    bview = fmt.batch_entry_rows(mv, pos, length, itemsize - 64)  # verified, not passed on
                elif on_batch is not None:
                    bview = fmt.batch_entry_columns(mv, pos, length, batch_dtype or record_dtype, itemsize - 64)
                elif on_rows is not None or on_records is None:
                    bview = fmt.batch_entry_rows(mv, pos, length, itemsize - 64)
                else:
                    bview = fmt.batch_entry_records(mv, pos, length, _wall, record_dtype)
                if isinstance(bview, str):
                    pos = bad(pos, bview)
                    if pos < 0:
                        break
                    continue
                if pos < records_from:
                    pass
                elif on_batch is not None:
                    on_batch(bview, _wall)
                elif on_rows is not None:
                    on_rows(bview, _wall)
                elif on_records is not None:
                    on_records(bview)
                result.records += len(bview)
                del bview
                pos = stop
                result.valid_bytes = pos
                continue
            if kind == fmt.KIND_RECORD_EXT and fmt.plausible(kind, length, itemsize):
                stop = pos + fmt.ENTRY_HEADER_BYTES + length
                if stop > end:
                    pos = bad(
                        pos, f"torn large-payload record entry at offset {pos} ({end - pos} of {stop - pos} bytes)"
                    )
                    if pos < 0:
                        break
                    continue
                if zlib.crc32(mv[pos + fmt.CRC_START : stop]) != crc or _ext_len(mv, pos) != length - itemsize:
                    pos = bad(pos, f"CRC mismatch in large-payload record entry at offset {pos}")
                    if pos < 0:
                        break
                    continue
                view = np.ndarray((1,), dtype=edt, buffer=mv, offset=pos)
                if pos < records_from:
                    pass
                elif on_ext is not None:
                    payload = mv[pos + size : stop]
                    on_ext(view, payload)
                    payload.release()
                elif on_records is not None:
                    on_records(view)
                del view
                result.records += 1
                pos = stop
                result.valid_bytes = pos
                continue
            if kind == fmt.KIND_TOPIC and 4 <= length <= 4 + MAX_TOPIC_BYTES:
                if end - pos < fmt.ENTRY_HEADER_BYTES + length:
                    pos = bad(pos, f"torn topic entry at offset {pos}")
                    if pos < 0:
                        break
                    continue
                body = mv[pos + fmt.ENTRY_HEADER_BYTES : pos + fmt.ENTRY_HEADER_BYTES + length]
                if zlib.crc32(mv[pos + fmt.CRC_START : pos + fmt.ENTRY_HEADER_BYTES + length]) != crc:
                    body.release()
                    pos = bad(pos, f"CRC mismatch in topic entry at offset {pos}")
                    if pos < 0:
                        break
                    continue
                (tid,) = struct.unpack_from("<I", body)
                try:
                    name = bytes(body[4:]).decode("utf-8")
                except UnicodeDecodeError:
                    name = None
                body.release()
                if name is None:
                    pos = bad(pos, f"topic entry with invalid UTF-8 at offset {pos}")
                    if pos < 0:
                        break
                    continue
                result.topics[tid] = name
                if on_topic is not None:
                    on_topic(tid, name)
                pos += fmt.ENTRY_HEADER_BYTES + length
                result.valid_bytes = pos
                continue
            pos = bad(pos, f"bad entry kind {kind} / length {length} at offset {pos}")
            if pos < 0:
                break
    finally:
        mv.release()
    return result
