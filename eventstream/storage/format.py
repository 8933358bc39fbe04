"""On-disk layout of the event log (`data/events.bin`).

The file is self-describing: a fixed file header says which record layout follows, and topic names are
stored in the file next to the records that use them.

File header (32 bytes, little-endian)::

    offset size field
    0      8    magic          b"ESEVLOG1"
    8      4    version        2 (1: written before KIND_BATCH entries existed; still read)
    12     4    payload_bytes  records.payload_bytes of the writer (record size = 64 + payload_bytes)
    16     4    entry_header   24 (size of every entry header, so a reader can check it)
    20     4    reserved
    24     8    created_ns     wall clock (ns since the epoch) when the file was created

Then entries, back to back, each = a 24-byte entry header + a body::

    offset size field
    0      4    magic          ENTRY_MAGIC (0xE5E7105A)
    4      4    length         body bytes after the 24-byte header
    8      4    crc32          zlib.crc32 of bytes [12, 24 + length): kind, wall_ns and the body
    12     1    kind           KIND_RECORD, KIND_TOPIC, KIND_RECORD_EXT or KIND_BATCH
    13     3    (zero)
    16     8    wall_ns        time.time_ns() when the entry was appended (same for one batch)
    24     ...  body

* A KIND_RECORD body is one row of `core.records.record_dtype(payload_bytes)`, exactly, with
  `topic_id` rewritten to the *file's* topic id (engine ids are per run; file ids are stable).
* A KIND_TOPIC body is u32 file topic id + the topic name in UTF-8. A topic entry always precedes the
  first record entry that uses its id.
* A KIND_RECORD_EXT body is a record whose payload did not fit inline (it was in the payload arena,
  core/payloads.py), followed by its whole payload: the row as for KIND_RECORD (`ext_class` kept,
  `ext_off` and `ext_arena` zeroed: they meant memory of the writing process) and then `payload_len`
  bytes, so length = record size + payload_len (at most MAX_EXT_PAYLOAD_BYTES). The CRC covers the
  payload too; when the decoder kept the payload's CRC (core/payloads.py: payloads of
  core/crc.COMBINE_MIN_BYTES or more), the writer derives the entry's CRC from it with core/crc.py
  instead of reading the payload a second time (the same bytes, the same CRC). A log of small payloads
  only has no such entry; readers of logs written before these entries existed see them as corrupt
  regions (skipped and reported, never misread).

* A KIND_BATCH body (version 2) holds many records packed, written for every run of records whose
  payloads are inline (the writer's whole append, minus large payloads, which stay KIND_RECORD_EXT
  entries)::

      offset      size         field
      0           4            count           records in the entry (1..)
      4           4            payload_bytes   records.payload_bytes of the writer (so the entry can
                                               be read without the file header)
      8           53 x count   rows            each record's first 51 bytes (core/records.py:
                                               event_id .. attempts; topic_id = the file's id),
                                               then its u16 principal
      8 + 53n     rest         payloads        every record's payload_len bytes, back to back

  The payload lengths add up to exactly the rest of the body. One CRC covers the whole entry. A
  64-byte event takes 53 + 64 bytes plus its share of one 32-byte header per batch (~1.17x the 100
  bytes of its single v2 frame), instead of a 536-byte KIND_RECORD entry. Version 1 files hold only
  KIND_RECORD, KIND_RECORD_EXT and KIND_TOPIC entries and read as before; a version 1 reader sees a
  version 2 file as unsupported (the version says so) rather than misreading it.

Why one entry (and one CRC) per batch: the CRC is one zlib call over the whole append instead of one
per record (0.73 µs/record for 536-byte entries), and a torn write loses only an entry that was never
completely written (an ACK follows the write). A reader verifies the entry's CRC once and turns its
rows and payloads into records with a constant number of numpy operations.

A file header whose magic was damaged (an otherwise valid header: version, entry header size and
payload_bytes in range) is still read (decode_file_header), and recovery writes the magic back.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

from eventstream.core import records as rec
from eventstream.core.crc import crc32 as fast_crc32
from eventstream.core.crc import recrc
from eventstream.core.payloads import arena_by_id, has_ext, take_kept_crcs

FILE_MAGIC = b"ESEVLOG1"
FILE_VERSION = 2
READABLE_VERSIONS = (1, 2)
FILE_HEADER = struct.Struct("<8sIIII Q")
FILE_HEADER_BYTES = FILE_HEADER.size  # 32
ENTRY_MAGIC = 0xE5E7105A
ENTRY_HEADER_BYTES = 24
KIND_RECORD = 1
KIND_TOPIC = 2
KIND_RECORD_EXT = 3
KIND_BATCH = 4
MAX_EXT_PAYLOAD_BYTES = 64 << 20  # server.tcp.max_frame_bytes is at most 64 MiB
BATCH_ROW_BYTES = 53  # a record's header up to and including `attempts`, then `principal` (core/records.py)
_ROW_HEAD = 51  # the bytes of a row that are the record's first 51 bytes
BATCH_HEAD = struct.Struct("<II")  # count, payload_bytes
MAX_BATCH_ENTRY_BYTES = 256 << 20
CRC_START = 12  # CRC covers [CRC_START, end of body)
ENTRY_HEADER = struct.Struct("<III B3x Q")
assert ENTRY_HEADER.size == ENTRY_HEADER_BYTES
assert FILE_HEADER_BYTES == 32


def plausible(kind: int, length: int, itemsize: int) -> bool:
    """Is `length` a possible body length for an entry of `kind` (records of `itemsize` bytes)?"""
    if kind == KIND_RECORD:
        return length == itemsize
    if kind == KIND_TOPIC:
        return 4 <= length <= 4 + 255
    if kind == KIND_BATCH:
        return BATCH_HEAD.size + BATCH_ROW_BYTES <= length <= MAX_BATCH_ENTRY_BYTES
    return kind == KIND_RECORD_EXT and itemsize <= length <= itemsize + MAX_EXT_PAYLOAD_BYTES


class LogFormatError(ValueError):
    """The file is not an event log this code can read, or its layout disagrees with the configuration."""


def encode_file_header(payload_bytes: int, created_ns: int) -> bytes:
    return FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, payload_bytes, ENTRY_HEADER_BYTES, 0, created_ns)


def decode_file_header(data: bytes, path: str) -> tuple[int, int]:
    """(payload_bytes, created_ns) from the first 32 bytes of a log; LogFormatError if it is not one."""
    if len(data) < FILE_HEADER_BYTES:
        raise LogFormatError(
            f"{path}: {len(data)} bytes is too short for an event log header "
            f"(allowed: a file written by eventstream, at least {FILE_HEADER_BYTES} bytes)"
        )
    magic, version, payload_bytes, entry_header, _, created_ns = FILE_HEADER.unpack_from(data)
    if magic != FILE_MAGIC and not header_magic_damaged(data):
        raise LogFormatError(f"{path}: not an eventstream event log (magic {magic!r}; allowed: {FILE_MAGIC!r})")
    if version not in READABLE_VERSIONS or entry_header != ENTRY_HEADER_BYTES:
        raise LogFormatError(
            f"{path}: event log version {version} (entry header {entry_header}) is not "
            f"supported; allowed: versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if payload_bytes > rec.MAX_PAYLOAD_BYTES:
        raise LogFormatError(
            f"{path}: payload_bytes={payload_bytes} in the header is out of range (allowed: 0..{rec.MAX_PAYLOAD_BYTES})"
        )
    return payload_bytes, created_ns


def header_magic_damaged(data: bytes) -> bool:
    """Whether a file header is an event log's whose magic alone was damaged: at most two bytes of it
    differ and every other field is valid (so the file is read on, and recovery repairs the magic)."""
    if len(data) < FILE_HEADER_BYTES:
        return False
    magic, version, payload_bytes, entry_header, _, _ = FILE_HEADER.unpack_from(data)
    differ = sum(a != b for a, b in zip(magic, FILE_MAGIC, strict=True))
    return (
        0 < differ <= 2
        and version in READABLE_VERSIONS
        and entry_header == ENTRY_HEADER_BYTES
        and payload_bytes <= rec.MAX_PAYLOAD_BYTES
    )


_entry_dtypes: dict[np.dtype, np.dtype] = {}


def entry_dtype(record_dtype: np.dtype) -> np.dtype:
    """One record entry as a structured row: header fields + the record (packed, no padding)."""
    dt = _entry_dtypes.get(record_dtype)
    if dt is None:
        dt = _entry_dtypes[record_dtype] = _make_entry_dtype(record_dtype)
    return dt


def _make_entry_dtype(record_dtype: np.dtype) -> np.dtype:
    return np.dtype(
        [
            ("magic", "<u4"),
            ("length", "<u4"),
            ("crc", "<u4"),
            ("kind", "u1"),
            ("_z", "V3"),
            ("wall_ns", "<u8"),
            ("record", record_dtype),
        ]
    )


def topic_entry(file_topic_id: int, name: bytes, wall_ns: int) -> bytes:
    """The bytes of one KIND_TOPIC entry."""
    body = struct.pack("<I", file_topic_id) + name
    head_tail = struct.pack("<B3xQ", KIND_TOPIC, wall_ns)
    crc = zlib.crc32(body, zlib.crc32(head_tail))
    return struct.pack("<III", ENTRY_MAGIC, len(body), crc) + head_tail + body


SMALL_BATCH = rec.SMALL_BATCH  # up to this many records, entries are built with struct calls (numpy costs more)
_TOPIC_ID = struct.Struct("<I")
_TOPIC_ID_AT = 32  # offset of topic_id in a record (core/records.py)
_KIND_WALL = struct.Struct("<B3xQ")
_MAGIC_LEN_CRC = struct.Struct("<III")


ROW_DTYPE = np.dtype(
    [
        (name, t)
        for name, t in rec._HEADER_FIELDS
        if name
        in (
            "event_id",
            "producer_ts",
            "ingest_ts",
            "seq",
            "topic_id",
            "conn_id",
            "payload_len",
            "crc32",
            "priority",
            "flags",
            "attempts",
            "principal",
        )
    ]
)
assert ROW_DTYPE.itemsize == BATCH_ROW_BYTES


def record_entries(batch: np.ndarray, file_topic_ids, wall_ns: int, gather: bool = False):
    """The bytes of the entries storing `batch`: one KIND_BATCH entry per run of records whose payload
    is inline, one KIND_RECORD_EXT entry per record whose payload is in the payload arena (see the
    module doc). `file_topic_ids`: one file topic id per record (an array or a list).

    With `gather`, a batch with arena payloads gives a list of buffers instead (their concatenation is
    the same bytes; the payloads are views of their arena slots, so they must be written before the
    records are released: os.writev, no copy); a batch without gives one bytes-like object as before."""
    if has_ext(batch):
        return _mixed_entries(batch, file_topic_ids, wall_ns, gather=gather)
    return batch_entry(batch, file_topic_ids, wall_ns)


# a record's header fields that a batch row keeps (core/records.py: ext_off, ext_class, ext_arena are
# skipped, the padding byte too), and the row they make (ROW_DTYPE, packed)
_RECORD_ROW_FIELDS = struct.Struct("<QQQQIIIIBBB10xH")
_ROW = struct.Struct("<QQQQIIIIBBBH")


def batch_entry(batch: np.ndarray, file_topic_ids, wall_ns: int) -> bytes | bytearray:
    """One KIND_BATCH entry holding `batch` (inline payloads only), with a constant number of numpy
    operations and one CRC."""
    if len(batch) <= SMALL_BATCH:
        return _batch_entry_small(batch, file_topic_ids, wall_ns)
    return _batch_entry_numpy(batch, file_topic_ids, wall_ns)


@functools.lru_cache(maxsize=64)
def _void(nbytes: int) -> np.dtype:
    """The opaque dtype of `nbytes` bytes (copies of such items are memcpy's; made once a size)."""
    return np.dtype((np.void, nbytes))


def _batch_entry_numpy(batch: np.ndarray, file_topic_ids, wall_ns: int) -> bytearray:
    """batch_entry over columns, built in place: rows and payloads are copied once, straight into
    the entry's buffer, and the CRC is one pass over it (no intermediate bytes objects)."""
    n = len(batch)
    size = batch.dtype.itemsize
    cap = size - rec.HEADER_BYTES
    flat = np.ascontiguousarray(batch)
    raw = flat.view(np.uint8).reshape(n, size)
    pl = batch["payload_len"]
    top = int(pl.max()) if n and cap else 0
    same = top == 0 or int(pl.min()) == top
    pay_bytes = n * top if same else int(pl.sum(dtype=np.int64))
    rows_at = ENTRY_HEADER_BYTES + BATCH_HEAD.size
    pay_at = rows_at + BATCH_ROW_BYTES * n
    length = pay_at + pay_bytes - ENTRY_HEADER_BYTES
    out = bytearray(ENTRY_HEADER_BYTES + length)
    buf = np.frombuffer(out, dtype=np.uint8)
    # opaque items of the bytes that move as they are: one memcpy per record, not a byte loop
    np.ndarray((n,), _void(_ROW_HEAD), buf, rows_at, (BATCH_ROW_BYTES,))[:] = np.ndarray(
        (n,), _void(_ROW_HEAD), flat, 0, (size,)
    )
    rows = buf[rows_at:pay_at].view(ROW_DTYPE)
    rows["principal"] = batch["principal"]
    rows["topic_id"] = file_topic_ids
    if top:
        if same:
            np.ndarray((n,), _void(top), buf, pay_at, (top,))[:] = np.ndarray(
                (n,), _void(top), flat, rec.HEADER_BYTES, (size,)
            )
        else:
            src = raw[:, rec.HEADER_BYTES : rec.HEADER_BYTES + top]
            buf[pay_at:] = src[np.arange(top) < pl[:, None].astype(np.int64)]
    del buf, rows
    _KIND_WALL.pack_into(out, CRC_START, KIND_BATCH, wall_ns)
    BATCH_HEAD.pack_into(out, ENTRY_HEADER_BYTES, n, cap)
    with memoryview(out) as mv:
        crc = fast_crc32(mv[CRC_START:])
    _MAGIC_LEN_CRC.pack_into(out, 0, ENTRY_MAGIC, length, crc)
    return out


def _batch_entry_small(batch: np.ndarray, file_topic_ids, wall_ns: int) -> bytes:
    """batch_entry for a few records with struct calls (the same bytes; numpy's fixed cost per call
    is most of the time for one record)."""
    size = batch.dtype.itemsize
    raw = batch.tobytes()
    rows: list[bytes] = []
    payloads: list[bytes] = []
    unpack, pack = _RECORD_ROW_FIELDS.unpack_from, _ROW.pack
    base = 0
    for fid in file_topic_ids.tolist() if isinstance(file_topic_ids, np.ndarray) else file_topic_ids:
        eid, pts, its, seq, _tid, conn, plen, crc, prio, flags, att, who = unpack(raw, base)
        rows.append(pack(eid, pts, its, seq, fid, conn, plen, crc, prio, flags, att, who))
        if plen:
            payloads.append(raw[base + rec.HEADER_BYTES : base + rec.HEADER_BYTES + plen])
        base += size
    body = BATCH_HEAD.pack(len(rows), size - rec.HEADER_BYTES) + b"".join(rows) + b"".join(payloads)
    head_tail = _KIND_WALL.pack(KIND_BATCH, wall_ns)
    crc = zlib.crc32(body, zlib.crc32(head_tail))
    return b"".join((_MAGIC_LEN_CRC.pack(ENTRY_MAGIC, len(body), crc), head_tail, body))


def batch_entry_rows(buf, pos: int, length: int, capacity: int) -> np.ndarray | str:
    """The header rows (ROW_DTYPE, a view over `buf`: copy what you keep) of the KIND_BATCH entry at
    `pos` (its CRC already checked), or a reason text when the body is not consistent with itself or
    with this log's `capacity` (its records.payload_bytes). Nothing is copied: recovery counts the
    records and the dedup rebuild reads its columns from these rows."""
    body = pos + ENTRY_HEADER_BYTES
    end = body + length
    count, _cap = BATCH_HEAD.unpack_from(buf, body)
    rows_at = body + BATCH_HEAD.size
    pay_at = rows_at + BATCH_ROW_BYTES * count
    if count == 0 or pay_at > end:
        return f"batch entry at offset {pos}: {count} records do not fit its {length} bytes"
    rows = np.frombuffer(buf, dtype=ROW_DTYPE, count=count, offset=rows_at)
    pl = rows["payload_len"]
    total, top = int(pl.sum(dtype=np.int64)), int(pl.max())
    if total != end - pay_at or top > capacity:
        del rows
        return (
            f"batch entry at offset {pos}: payload lengths (sum {total}, largest {top}) do not "
            f"match its {end - pay_at} payload bytes or this log's {capacity}-byte records"
        )
    return rows


def batch_entry_columns(buf, pos: int, length: int, out_dtype: np.dtype, capacity: int) -> np.ndarray | str:
    """The records of the KIND_BATCH entry at `pos` (its CRC already checked) as an array of
    `out_dtype` (a record dtype; record_dtype(0) gives the headers alone, without copying payloads),
    or a reason text when the body is not consistent with itself or with this log's `capacity` (its
    records.payload_bytes). A constant number of numpy operations."""
    body = pos + ENTRY_HEADER_BYTES
    end = body + length
    count, _cap = BATCH_HEAD.unpack_from(buf, body)
    rows_at = body + BATCH_HEAD.size
    pay_at = rows_at + BATCH_ROW_BYTES * count
    if count == 0 or pay_at > end:
        return f"batch entry at offset {pos}: {count} records do not fit its {length} bytes"
    rows = np.frombuffer(buf, dtype=ROW_DTYPE, count=count, offset=rows_at)
    pl = rows["payload_len"].astype(np.int64)
    top = int(pl.max())
    if int(pl.sum()) != end - pay_at or top > capacity:
        del rows
        return (
            f"batch entry at offset {pos}: payload lengths (sum {int(pl.sum())}, largest {top}) do not "
            f"match its {end - pay_at} payload bytes or this log's {capacity}-byte records"
        )
    out = np.zeros(count, dtype=out_dtype)
    raw = out.view(np.uint8).reshape(count, out_dtype.itemsize)
    raw[:, :_ROW_HEAD] = rows.view(np.uint8).reshape(count, BATCH_ROW_BYTES)[:, :_ROW_HEAD]
    out["principal"] = rows["principal"]
    del rows
    room = out_dtype.itemsize - rec.HEADER_BYTES
    if top and room:
        src = np.frombuffer(buf, dtype=np.uint8, count=end - pay_at, offset=pay_at)
        at = rec.HEADER_BYTES
        if int(pl.min()) == top:
            raw[:, at : at + top] = src.reshape(count, top)
        else:
            raw[:, at : at + top][np.arange(top) < pl[:, None]] = src
        del src
    return out


def batch_entry_records(buf, pos: int, length: int, wall_ns: int, record_dtype: np.dtype) -> np.ndarray | str:
    """batch_entry_columns as entry rows (entry_dtype: magic, length, kind and wall_ns filled in, as if
    each record were a KIND_RECORD entry), for callers that take entry views."""
    recs = batch_entry_columns(buf, pos, length, record_dtype, record_dtype.itemsize - rec.HEADER_BYTES)
    if isinstance(recs, str):
        return recs
    out = np.empty(len(recs), dtype=entry_dtype(record_dtype))
    out["magic"] = ENTRY_MAGIC
    out["length"] = record_dtype.itemsize
    out["crc"] = 0
    out["kind"] = KIND_RECORD
    out["_z"] = b"\0\0\0"
    out["wall_ns"] = wall_ns
    raw = out.view(np.uint8).reshape(len(recs), out.dtype.itemsize)
    raw[:, ENTRY_HEADER_BYTES:] = recs.view(np.uint8).reshape(len(recs), record_dtype.itemsize)
    return out


def _record_entries_v1(batch: np.ndarray, file_topic_ids, wall_ns: int) -> bytes:
    """Version 1 entries, one KIND_RECORD per record (what earlier versions wrote; tests build old
    logs with it). CRC per entry."""
    n = len(batch)
    if n <= SMALL_BATCH:
        return _record_entries_small(batch, file_topic_ids, wall_ns)
    out = np.zeros(n, dtype=entry_dtype(batch.dtype))
    out["magic"] = ENTRY_MAGIC
    out["length"] = batch.dtype.itemsize
    out["kind"] = KIND_RECORD
    out["wall_ns"] = wall_ns
    out["record"] = batch
    out["record"]["topic_id"] = file_topic_ids
    size = out.dtype.itemsize
    raw = out.view(np.uint8)
    mv = memoryview(raw)
    crc32 = zlib.crc32
    out["crc"] = [crc32(mv[i * size + CRC_START : (i + 1) * size]) for i in range(n)]
    return raw.tobytes()


def _record_entries_small(batch: np.ndarray, file_topic_ids, wall_ns: int) -> bytes:
    """record_entries for a few records with struct calls: the bytes are the same."""
    size = batch.dtype.itemsize
    raw = bytearray(batch.tobytes())
    head_tail = _KIND_WALL.pack(KIND_RECORD, wall_ns)
    head_crc = zlib.crc32(head_tail)
    ids = file_topic_ids if isinstance(file_topic_ids, list) else file_topic_ids.tolist()
    out = []
    mv = memoryview(raw)
    for i, fid in enumerate(ids):
        base = i * size
        _TOPIC_ID.pack_into(raw, base + _TOPIC_ID_AT, fid)
        body = mv[base : base + size]
        out.append(_MAGIC_LEN_CRC.pack(ENTRY_MAGIC, size, zlib.crc32(body, head_crc)))
        out.append(head_tail)
        out.append(body)
    data = b"".join(out)
    mv.release()
    return data


def record_entries_v1(batch: np.ndarray, file_topic_ids, wall_ns: int, gather: bool = False):
    """What a version 1 writer wrote for `batch`: a KIND_RECORD entry per inline record, a
    KIND_RECORD_EXT entry per arena payload (tests build old-format logs with it). `gather`: as for
    record_entries."""
    if has_ext(batch):
        return _mixed_entries(batch, file_topic_ids, wall_ns, run=_record_entries_v1, gather=gather)
    return _record_entries_v1(batch, file_topic_ids, wall_ns)


def _mixed_entries(batch: np.ndarray, file_topic_ids, wall_ns: int, run=None, gather: bool = False):
    """record_entries for a batch with arena payloads: runs of inline records as usual (one batch
    entry each, or `run`'s entries), one KIND_RECORD_EXT entry per arena payload, in the batch's order.

    The entry headers and records of the arena payloads are built as one array (a constant number of
    numpy operations); per payload there remain the CRC calls and two list items. With `gather` the
    pieces are returned as a list (entry header + record, then the payload itself: a view of its arena
    slot, valid while the record is in flight) for one os.writev, instead of copied into one bytes."""
    run = run or batch_entry
    fids = np.asarray(file_topic_ids, dtype=np.uint32)
    ext = np.flatnonzero(batch["ext_class"])
    k = len(ext)
    size = batch.dtype.itemsize
    recs = batch[ext]  # the rows of the ext records, copied once
    recs["topic_id"] = fids[ext]
    recs["ext_off"] = 0  # memory of this process, meaningless in a file (ext_class is kept)
    recs["ext_arena"] = 0
    plen = recs["payload_len"].astype(np.int64)
    raw = recs.view(np.uint8).reshape(k, size)
    kept_at, kept_pairs = take_kept_crcs(raw)  # the decoder's pass over large payloads, where it kept one
    heads = np.zeros((k, ENTRY_HEADER_BYTES + size), dtype=np.uint8)
    hv = np.zeros(k, dtype=_EXT_HEAD_DTYPE)
    hv["magic"] = ENTRY_MAGIC
    hv["length"] = size + plen
    hv["kind"] = KIND_RECORD_EXT
    hv["wall_ns"] = wall_ns
    heads[:, :ENTRY_HEADER_BYTES] = hv.view(np.uint8).reshape(k, ENTRY_HEADER_BYTES)
    heads[:, ENTRY_HEADER_BYTES:] = raw
    views = _arena_views(batch, ext)
    w = ENTRY_HEADER_BYTES + size
    mv = memoryview(heads.reshape(k * w))
    crc32, pass_crc32 = zlib.crc32, fast_crc32
    crcs = [crc32(mv[a + CRC_START : a + w]) for a in range(0, k * w, w)]
    lens = plen.tolist()
    kept_of = dict(zip(kept_at, kept_pairs, strict=True))
    for j in range(k):
        pair = kept_of.get(j)
        if pair is None:
            crcs[j] = pass_crc32(views[j], crcs[j])
        else:  # the same CRC without reading the payload again (core/crc.py)
            crcs[j] = recrc(pair[1], pair[0], lens[j], crcs[j])
    heads[:, 8:12] = np.array(crcs, dtype="<u4").view(np.uint8).reshape(k, 4)
    parts: list = []
    i = 0
    for n, j in enumerate(ext.tolist()):
        if j > i:
            parts.append(run(batch[i:j], fids[i:j], wall_ns))
        parts.append(mv[n * w : (n + 1) * w])
        parts.append(views[n])
        i = j + 1
    if i < len(batch):
        parts.append(run(batch[i:], fids[i:], wall_ns))
    if gather:
        return parts
    return b"".join(parts)


def _arena_views(batch: np.ndarray, ext: np.ndarray) -> list:
    """The payloads of batch[ext] (all in arenas) as read-only memoryviews of their slots."""
    offs = batch["ext_off"][ext].tolist()
    lens = batch["payload_len"][ext].tolist()
    aids = batch["ext_arena"][ext].tolist()
    first = aids[0] if aids else 0
    if aids.count(first) == len(aids):  # the usual case: one arena
        whole = memoryview(arena_by_id(first).buf).toreadonly()
        return [whole[o : o + n] for o, n in zip(offs, lens, strict=True)]
    return [memoryview(arena_by_id(a).buf).toreadonly()[o : o + n] for a, o, n in zip(aids, offs, lens, strict=True)]


_EXT_HEAD_DTYPE = np.dtype(  # the 24-byte entry header (ENTRY_HEADER) as a row
    [("magic", "<u4"), ("length", "<u4"), ("crc", "<u4"), ("kind", "u1"), ("_z", "V3"), ("wall_ns", "<u8")]
)
assert _EXT_HEAD_DTYPE.itemsize == ENTRY_HEADER_BYTES
