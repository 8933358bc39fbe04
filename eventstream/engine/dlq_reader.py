"""Reading the dead-letter log (format: dlq.py, docs/dlq.md): parse a line, iterate every entry of
every segment oldest first (a torn last line skipped), turn entries back into records for replay."""

from __future__ import annotations

import binascii
import datetime as dt
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal, overload

import numpy as np

from eventstream.core import records as rec
from eventstream.core.payloads import release_records
from eventstream.core.topics import TopicTable
from eventstream.engine.dlq import DlqRecord, reason_category, unescape
from eventstream.storage.segments import segment_paths

_LINE = re.compile(
    r"^\[(?P<ts>[^\]]+)\] DROPPED: id=(?P<id>\d+) topic=(?P<topic>.*?) "
    r"priority=(?P<priority>-?\d+) reason=(?P<reason>.*)$"
)
_FORMAT_HELP = (
    "a JSON object line of the DLQ format (docs/dlq.md) or an old text line "
    "'[timestamp] DROPPED: id=<id> topic=<topic> priority=<n> reason=<reason>'"
)


@overload
def _int(obj: dict, key: str, *, optional: Literal[False]) -> int: ...
@overload
def _int(obj: dict, key: str, *, optional: bool = True) -> int | None: ...
def _int(obj: dict, key: str, *, optional: bool = True) -> int | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if type(v) is not int:
        raise ValueError(f"field {key!r} is {v!r}; allowed: an integer" + (" or null" if optional else ""))
    return v


def _str(obj: dict, key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} is {v!r}; allowed: a string")
    return v


def parse_line(line: str | bytes) -> DlqRecord:
    """Parse one DLQ line (JSON or the old text format); ValueError naming the problem otherwise."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a DLQ line: {text[:120]!r} ({exc}); allowed: {_FORMAT_HELP}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"not a DLQ line: {text[:120]!r}; allowed: {_FORMAT_HELP}")
        try:
            reason = _str(obj, "reason")
            b64 = obj.get("payload_b64")
            payload = None
            if b64 is not None:
                if not isinstance(b64, str):
                    raise ValueError(f"field 'payload_b64' is {b64!r}; allowed: base64 text or null")
                try:
                    payload = binascii.a2b_base64(b64, strict_mode=True)
                except binascii.Error as exc:
                    raise ValueError(f"field 'payload_b64' is not base64 ({exc})") from None
            plen = _int(obj, "payload_len")
            if payload is not None and plen != len(payload):
                raise ValueError(f"field 'payload_len' is {plen!r} but the payload has {len(payload)} bytes")
            ts = _str(obj, "ts")
            dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
            return DlqRecord(
                ts=ts,
                reason=reason,
                category=obj.get("category") or reason_category(reason),
                id=_int(obj, "id", optional=False),
                event_id=_int(obj, "event_id"),
                seq=_int(obj, "seq"),
                topic=_str(obj, "topic"),
                priority=_int(obj, "priority", optional=False),
                producer_ts=_int(obj, "producer_ts"),
                flags=_int(obj, "flags"),
                attempts=_int(obj, "attempts"),
                payload=payload,
                payload_len=plen,
            )
        except ValueError as exc:
            raise ValueError(f"not a DLQ line: {text[:120]!r}: {exc}; allowed: {_FORMAT_HELP}") from None
    m = _LINE.match(text)
    if m is None:
        raise ValueError(f"not a DLQ line: {text[:120]!r}; allowed: {_FORMAT_HELP}")
    reason = unescape(m["reason"])
    try:
        dt.datetime.fromisoformat(m["ts"].replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a DLQ line: {text[:120]!r}: bad timestamp; allowed: {_FORMAT_HELP}") from None
    return DlqRecord(
        ts=m["ts"],
        reason=reason,
        category=reason_category(reason),
        id=int(m["id"]),
        event_id=None,
        seq=None,
        topic=unescape(m["topic"]),
        priority=int(m["priority"]),
        producer_ts=None,
        flags=None,
        attempts=None,
        payload=None,
        payload_len=None,
    )


BadLine = Callable[[Path, int, str], None]


def read_dlq(path: str | os.PathLike, *, on_bad_line: BadLine | None = None) -> Iterator[DlqRecord]:
    """Every entry of the DLQ at `path`: its segments oldest first, then the active file.

    The files are opened (and their sizes taken) when this is called, so the entries are those written
    up to that moment, even if the writer rotates or appends meanwhile (replaying into the engine that
    owns the DLQ cannot read its own new entries). An unterminated last line of a file (a torn write)
    is skipped. A damaged complete line raises ValueError naming file and line, or, with `on_bad_line`,
    is reported as on_bad_line(file, line_number, problem) and skipped. FileNotFoundError if neither
    the file nor any segment exists.
    """
    path = Path(path)
    files = _open_snapshot(path)
    if not files:
        raise FileNotFoundError(f"{path}: no such DLQ file (and no segments {path.name}.<n>)")
    return _entries(files, on_bad_line)


def _open_snapshot(path: Path) -> list[tuple[Path, BinaryIO, int]]:
    """(name, open binary file, size) of every segment and the active file, in reading order. The active
    file is opened first: if a rotation renames it meanwhile, the segment it became is recognised by
    its inode and read once, last."""
    active: BinaryIO | None = None
    try:
        active = open(path, "rb")  # noqa: SIM115 - closed by _entries
    except FileNotFoundError:
        pass
    ino = os.fstat(active.fileno())[1:3] if active is not None else None
    out: list[tuple[Path, BinaryIO, int]] = []
    for _, seg in segment_paths(path):
        try:
            f = open(seg, "rb")  # noqa: SIM115
        except FileNotFoundError:  # deleted by retention meanwhile
            continue
        st = os.fstat(f.fileno())
        if ino is not None and st[1:3] == ino:
            f.close()
            continue
        out.append((seg, f, st.st_size))
    if active is not None:
        out.append((path, active, os.fstat(active.fileno()).st_size))
    return out


def _entries(files: list[tuple[Path, BinaryIO, int]], on_bad_line: BadLine | None) -> Iterator[DlqRecord]:
    try:
        for name, f, size in files:
            left = size
            for lineno, line in enumerate(f, 1):
                if left <= 0:
                    break
                if len(line) > left:
                    line = line[:left]
                left -= len(line)
                if not line.endswith(b"\n"):
                    break  # torn: its write never returned (or is still in progress)
                if not line.strip():
                    continue
                try:
                    yield parse_line(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    problem = str(exc)
                    if on_bad_line is None:
                        raise ValueError(f"{name}:{lineno}: {problem}") from None
                    on_bad_line(name, lineno, problem)
    finally:
        for _, f, _ in files:
            f.close()


def to_records(
    entries: Iterable[DlqRecord], dtype: np.dtype, topics: TopicTable, *, replayed: bool = True, payloads=None
) -> np.ndarray:
    """Records of `dtype` rebuilt from DLQ entries (topics interned in `topics`), e.g. to put them back
    into an engine. ingest_ts and conn_id are 0; crc32 is recomputed for v2 events; `replayed` sets
    FLAG_REPLAYED. ValueError for an entry without payload (old format, undecodable frame) or whose
    priority is out of range. A payload larger than the dtype's inline capacity goes to `payloads`
    (a PayloadArena: its slot belongs to the record, given back when the engine releases it);
    without one, or when the arena is full, PayloadTooLarge."""
    entries = list(entries)
    out = rec.empty(len(entries), dtype)
    cap = rec.payload_capacity(dtype)
    try:
        _fill_records(out, entries, topics, replayed, cap, payloads)
    except BaseException:
        release_records(out)
        raise
    return out


def _fill_records(out, entries, topics, replayed, cap, payloads) -> None:
    for i, e in enumerate(entries):
        if e.payload is None:
            raise ValueError(
                f"DLQ entry id={e.id} topic={e.topic!r} ({e.ts}) has no payload; allowed: entries "
                "with a payload (filter on entry.payload is not None)"
            )
        if not 0 <= e.priority <= 4:
            raise ValueError(f"DLQ entry id={e.id} has priority {e.priority}; allowed: 0..4")
        row = out[i]
        flags = (e.flags or 0) | (rec.FLAG_REPLAYED if replayed else 0)
        row["event_id"] = e.event_id if e.event_id is not None else e.id
        row["seq"] = e.seq or 0
        row["producer_ts"] = e.producer_ts or 0
        row["topic_id"] = topics.intern(e.topic)
        row["priority"] = e.priority
        row["flags"] = flags
        row["attempts"] = e.attempts or 0
        n = len(e.payload)
        if n > cap:
            got = payloads.claim([n]) if payloads is not None and n <= payloads.max_payload else None
            if got is None or not len(got[0]):
                raise rec.PayloadTooLarge(n, cap)
            off = int(got[0][0])
            payloads.buf[off : off + n] = np.frombuffer(e.payload, np.uint8)
            row["ext_off"], row["ext_class"], row["ext_arena"] = off, int(got[1][0]), payloads.id
        elif n:
            row["payload"][:n] = np.frombuffer(e.payload, np.uint8)
        row["payload_len"] = n
        if flags & rec.FLAG_V2:
            row["crc32"] = zlib.crc32(e.payload, zlib.crc32(e.topic.encode("utf-8")))
