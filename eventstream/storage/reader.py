"""Reading the event log: a filtering reader (EventLogReader) on top of the entry scanner (scan.py)."""

from __future__ import annotations

import fnmatch
import mmap
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eventstream.core import records as rec
from eventstream.storage import format as fmt
from eventstream.storage.scan import CorruptLogWarning, ScanResult, scan_buffer
from eventstream.storage.segments import segment_paths

READ_CHUNK_RECORDS = 65536  # records scanned between yields of EventLogReader.batches


@dataclass
class StoredBatch:
    """Records read back from the log: `records` carry file topic ids, `topics` maps them to names."""

    records: np.ndarray
    stored_ns: np.ndarray  # wall clock ns when each record was appended
    topics: dict[int, str]
    # row -> payload of the records stored with their payload after them (KIND_RECORD_EXT: larger
    # than the inline capacity); their rows have ext_class != 0 and no inline payload
    ext: dict[int, bytes] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def payload(self, i: int) -> bytes:
        """Record i's whole payload, inline or stored after it."""
        got = self.ext.get(i)
        if got is not None:
            return got
        r = self.records
        n = int(r["payload_len"][i])
        return r["payload"][i, :n].tobytes() if n else b""

    def payloads(self) -> list[bytes]:
        """Every record's whole payload (bytes), in order."""
        r = self.records
        lens = r["payload_len"].tolist()
        pl = r["payload"] if "payload" in (r.dtype.names or ()) else None
        ext = self.ext
        return [
            ext[i] if i in ext else (pl[i, :n].tobytes() if n and pl is not None else b"") for i, n in enumerate(lens)
        ]

    def topic_names(self) -> list[str]:
        t = self.topics
        return [t.get(i, f"#{i}") for i in self.records["topic_id"].tolist()]


@dataclass
class StoredColumns:
    """Header fields of stored records (EventLogReader.columns): `topic_id` values are file topic ids,
    `topics` maps them to names."""

    cols: dict[str, np.ndarray]
    stored_ns: np.ndarray
    topics: dict[int, str]

    def __len__(self) -> int:
        return len(self.stored_ns)


class ColumnCollector:
    """Collects header `fields` of the records a scan_buffer pass meets (stored at or after
    `since_ns`) as arrays: `callbacks()` are scan_buffer's keyword arguments, `result()` the columns.
    EventLogReader.columns uses it per file; recovery can take one too, so the engine reads the keys
    of the active file in the same pass that verifies it (engine/idempotency.py). `from_offset`: only
    the entries at or after this offset of the file (the position a dedup snapshot covers)."""

    def __init__(self, fields: tuple[str, ...], since_ns: int | None = None, from_offset: int = 0):
        self.fields = fields
        self.since = np.uint64(max(since_ns or 0, 0))
        self.from_offset = from_offset
        self.topics: dict[int, str] = {}
        self._cols: dict[str, list[np.ndarray]] = {f: [] for f in fields}
        self._walls: list[np.ndarray] = []

    def callbacks(self) -> dict:
        return {
            "on_rows": self.on_rows,
            "on_records": self.on_records,
            "on_topic": self.on_topic,
            "on_ext": lambda view, _payload: self.on_records(view),
            "records_from": self.from_offset,
        }

    def on_topic(self, tid: int, name: str) -> None:
        self.topics[tid] = name

    def on_rows(self, rows: np.ndarray, wall_ns: int) -> None:
        """A batch entry's header rows (format.ROW_DTYPE, a view: copied here)."""
        if wall_ns >= self.since:
            for f in self.fields:
                self._cols[f].append(rows[f].copy())
            self._walls.append(np.full(len(rows), wall_ns, dtype=np.uint64))

    def on_records(self, view: np.ndarray) -> None:
        """Version 1 record entries and large-payload entries (entry rows, a view)."""
        keep = view["wall_ns"] >= self.since
        if keep.any():
            r = view["record"]
            for f in self.fields:
                self._cols[f].append(r[f][keep])
            self._walls.append(view["wall_ns"][keep].astype(np.uint64))

    def empty_like(self) -> ColumnCollector:
        """A new collector of the same fields, window and offset (for one part of a parallel scan)."""
        return ColumnCollector(self.fields, int(self.since), self.from_offset)

    def absorb(self, later: ColumnCollector) -> None:
        """Append what `later` collected (a scan of the next part of the same file, see
        recovery's parallel scan)."""
        for f in self.fields:
            self._cols[f].extend(later._cols[f])
        self._walls.extend(later._walls)
        self.topics.update(later.topics)

    def result(self) -> StoredColumns | None:
        if not self._walls:
            return None
        return StoredColumns(
            {f: np.concatenate(c) for f, c in self._cols.items()}, np.concatenate(self._walls), self.topics
        )


def _priority_values(priorities: Iterable[int | str] | None) -> np.ndarray | None:
    if priorities is None:
        return None
    out = []
    for p in priorities:
        if isinstance(p, str):
            key = p.strip().upper()
            if key.isdigit():
                p = int(key)
            elif key in rec.Priority.__members__:
                p = int(rec.Priority[key])
            else:
                raise ValueError(f"priority {p!r} is not allowed; allowed: 0-4 or {', '.join(rec.PRIORITY_NAMES)}")
        if not 0 <= int(p) <= 4:
            raise ValueError(f"priority {p!r} is not allowed; allowed: 0-4 or {', '.join(rec.PRIORITY_NAMES)}")
        out.append(int(p))
    return np.array(sorted(set(out)), dtype=np.uint8)


class EventLogReader:
    """Read a log file (never modifies it). Filters run vectorized over each run of record entries."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(fmt.FILE_HEADER_BYTES)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such event log (allowed: an existing events.bin)") from None
        self.payload_bytes, self.created_ns = fmt.decode_file_header(head, str(self.path))
        self.dtype = rec.record_dtype(self.payload_bytes)
        self.last_scan: ScanResult | None = None

    def batches(
        self,
        *,
        topic: str | None = None,
        priorities: Iterable[int | str] | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        time_field: str = "stored",
        payloads: bool = True,
    ) -> Iterator[StoredBatch]:
        """Matching records in file order, a batch per run of entries: the closed segments
        (`events.bin.<n>`, oldest first) and then the active file. `topic` is a glob (``orders.*``);
        the time range is [since_ns, until_ns) on `time_field` = "stored" (append wall clock) or
        "producer" (the record's producer_ts). `payloads=False`: records of record_dtype(0), the
        64-byte headers alone (ids, topics, priorities, lengths; what the dedup rebuild needs: 8x less
        memory than whole records). `last_scan` covers every file read (a problem names its file)."""
        files = [p for _, p in segment_paths(self.path)] + [self.path]
        total: ScanResult | None = None
        for path in files:
            if path != self.path and not self._segment_readable(path):
                continue
            yield from self._file_batches(
                path,
                topic=topic,
                priorities=priorities,
                since_ns=since_ns,
                until_ns=until_ns,
                time_field=time_field,
                payloads=payloads,
            )
            scan = self.last_scan
            if total is None:
                total = scan
            elif scan is not None:
                problem = total.problem
                total = ScanResult(
                    file_bytes=scan.file_bytes,
                    valid_bytes=scan.valid_bytes,
                    records=total.records + scan.records,
                    problem=scan.problem or problem,
                    corrupt=total.corrupt + scan.corrupt,
                    topics=scan.topics,
                )
        self.last_scan = total

    def _file_batches(
        self,
        path: Path,
        *,
        topic: str | None = None,
        priorities: Iterable[int | str] | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        time_field: str = "stored",
        payloads: bool = True,
    ) -> Iterator[StoredBatch]:
        """Matching records in file order, a batch per run of entries. `topic` is a glob (``orders.*``);
        the time range is [since_ns, until_ns) on `time_field` = "stored" (append wall clock) or
        "producer" (the record's producer_ts)."""
        if time_field not in ("stored", "producer"):
            raise ValueError(f"time_field {time_field!r} is not allowed; allowed: stored, producer")
        prio = _priority_values(priorities)
        topics: dict[int, str] = {}
        matching: list[int] = []
        out: list[StoredBatch] = []

        def on_topic(tid: int, name: str) -> None:
            topics[tid] = name
            if topic is not None and fnmatch.fnmatchcase(name, topic):
                matching.append(tid)

        out_dtype = self.dtype if payloads else rec.record_dtype(0)

        def keep(r: np.ndarray, wall) -> np.ndarray | None:
            """Indices of the records of `r` (stored at `wall`: an array, or one value for a batch
            entry) that match, or None for all of them."""
            mask = None
            if topic is not None:
                mask = np.isin(r["topic_id"], np.array(matching, dtype=np.uint32))
            if prio is not None:
                m = np.isin(r["priority"], prio)
                mask = m if mask is None else mask & m
            if since_ns is not None or until_ns is not None:
                t = wall if time_field == "stored" else r["producer_ts"]
                m = np.ones(len(r), dtype=bool)
                if since_ns is not None:
                    m &= t >= np.uint64(max(since_ns, 0))
                if until_ns is not None:
                    m &= t < np.uint64(max(until_ns, 0))
                mask = m if mask is None else mask & m
            if mask is None or mask.all():
                return None
            return np.flatnonzero(mask)

        def on_records_kept(view: np.ndarray) -> None:
            idx = keep(view["record"], view["wall_ns"])
            n = len(view) if idx is None else idx.size
            if n:
                # rows copied as bytes (a fancy index over the record field of the entry rows costs
                # ~2 us per record; a row gather is a memcpy each)
                rows = view.view(np.uint8).reshape(len(view), view.dtype.itemsize)
                start = fmt.ENTRY_HEADER_BYTES
                part = (
                    rows[:, start : start + out_dtype.itemsize]
                    if idx is None
                    else rows[idx, start : start + out_dtype.itemsize]
                )
                recs = np.empty(n, dtype=out_dtype)
                recs.view(np.uint8).reshape(n, out_dtype.itemsize)[:] = part
                wall = view["wall_ns"] if idx is None else view["wall_ns"][idx]
                out.append(StoredBatch(recs, np.array(wall, dtype=np.uint64), topics))

        def on_batch(recs: np.ndarray, wall_ns: int) -> None:
            idx = keep(recs, np.uint64(wall_ns))
            if idx is not None:
                recs = recs[idx]
            if len(recs):
                out.append(StoredBatch(recs, np.full(len(recs), wall_ns, dtype=np.uint64), topics))

        def on_ext(view: np.ndarray, payload: memoryview) -> None:
            if keep(view["record"], view["wall_ns"]) is None:
                r = view["record"].copy()
                if not payloads:
                    h = np.empty(1, dtype=out_dtype)
                    h.view(np.uint8)[:] = r.view(np.uint8)[: out_dtype.itemsize]
                    out.append(StoredBatch(h, view["wall_ns"].copy(), topics))
                else:
                    out.append(StoredBatch(r, view["wall_ns"].copy(), topics, {0: bytes(payload)}))

        size = path.stat().st_size
        if size <= fmt.FILE_HEADER_BYTES:
            self.last_scan = ScanResult(file_bytes=size, valid_bytes=size)
            return
        total = ScanResult(file_bytes=size, valid_bytes=fmt.FILE_HEADER_BYTES)
        self.last_scan = total
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos = fmt.FILE_HEADER_BYTES
            while True:  # a bounded chunk at a time, so memory stays bounded on big logs
                part = scan_buffer(
                    mm,
                    self.dtype,
                    on_records=on_records_kept,
                    on_topic=on_topic,
                    start=pos,
                    limit_records=READ_CHUNK_RECORDS,
                    on_ext=on_ext,
                    on_batch=on_batch,
                    batch_dtype=out_dtype,
                )
                total.records += part.records
                total.valid_bytes, total.problem = part.valid_bytes, part.problem
                total.corrupt.extend(part.corrupt)
                total.topics = topics
                # `out` holds copies (fancy indexing), never views of the mapping: safe to yield
                yield from out
                out.clear()
                if not part.partial:
                    break
                pos = part.valid_bytes
        if total.corrupt:
            # Reported, not fatal: the records around the damage are all read. `problem` carries it
            # too, for callers that print it (dump); the warning reaches stderr of any tool (replay).
            what = total.describe_corrupt()
            total.problem = f"{what}; then {total.problem}" if total.problem else what
            warnings.warn(CorruptLogWarning(f"{path}: {what}"), stacklevel=2)

    def _segment_readable(self, path: Path) -> bool:
        """A closed segment is read when its file header is whole and it was written with this log's
        records.payload_bytes; otherwise it is skipped with a CorruptLogWarning saying why."""
        try:
            with open(path, "rb") as f:
                payload, _ = fmt.decode_file_header(f.read(fmt.FILE_HEADER_BYTES), str(path))
        except (OSError, fmt.LogFormatError) as exc:
            warnings.warn(CorruptLogWarning(f"{path}: segment skipped ({exc})"), stacklevel=3)
            return False
        if payload != self.payload_bytes:
            warnings.warn(
                CorruptLogWarning(
                    f"{path}: segment written with records.payload_bytes={payload}, not {self.payload_bytes}: skipped"
                ),
                stacklevel=3,
            )
            return False
        return True

    def files(self) -> list[tuple[int | None, Path]]:
        """(created_ns from its header, or None when unreadable; path) of every file of the log: the
        closed segments oldest first, then the active file."""
        out: list[tuple[int | None, Path]] = []
        for path in [p for _, p in segment_paths(self.path)] + [self.path]:
            try:
                with open(path, "rb") as f:
                    out.append((fmt.decode_file_header(f.read(fmt.FILE_HEADER_BYTES), str(path))[1], path))
            except (OSError, fmt.LogFormatError):
                out.append((None, path))
        return out

    def columns(
        self,
        fields: tuple[str, ...],
        *,
        since_ns: int | None = None,
        segments_only: bool = False,
        after: tuple[Path, int] | None = None,
    ) -> Iterator[StoredColumns]:
        """The header `fields` (names of core/records.py header fields) of every record stored at or
        after `since_ns` (append wall clock), closed segments first, as arrays, one chunk per file:
        no record is built (a batch entry's fields are read straight from its rows), so the dedup
        rebuild reads 10 M ids in about the time their CRCs take. Damage is skipped as by `batches`
        (and reported in `last_scan`). `segments_only`: the closed segments alone (the active file's
        columns were collected while it was recovered, see ColumnCollector). `after` = (file, offset):
        only what was stored after that position (the files before it are not read)."""
        files = [p for _, p in segment_paths(self.path)] + ([] if segments_only else [self.path])
        if after is not None:
            files = files[files.index(after[0]) :] if after[0] in files else []
        for path in files:
            if path != self.path and not self._segment_readable(path):
                continue
            if path.stat().st_size <= fmt.FILE_HEADER_BYTES:
                continue
            got = ColumnCollector(fields, since_ns, after[1] if after is not None and path == after[0] else 0)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                self.last_scan = scan_buffer(mm, self.dtype, **got.callbacks())
            part = got.result()
            if part is not None:
                yield part

    def read(self, **filters) -> StoredBatch:
        """All matching records as one batch."""
        parts = list(self.batches(**filters))
        topics = parts[-1].topics if parts else {}
        if not parts:
            return StoredBatch(np.zeros(0, dtype=self.dtype), np.zeros(0, dtype=np.uint64), topics)
        if any(p.topics is not topics and p.topics != topics for p in parts):
            # segments that number topics differently (a new log after a crash between segments):
            # one numbering for the whole result, by name
            ids: dict[str, int] = {}
            merged: dict[int, str] = {}
            for part in parts:
                fids = part.records["topic_id"]
                remap = np.zeros(int(fids.max()) + 1 if len(fids) else 1, dtype=np.uint32)
                for fid in np.unique(fids).tolist():
                    name = part.topics.get(fid, f"#{fid}")
                    remap[fid] = ids.setdefault(name, len(ids) + 1)
                    merged[remap[fid]] = name
                part.records["topic_id"] = remap[fids]
            topics = merged
        ext: dict[int, bytes] = {}
        base = 0
        for part in parts:
            for i, payload in part.ext.items():
                ext[base + i] = payload
            base += len(part)
        return StoredBatch(
            np.concatenate([p.records for p in parts]), np.concatenate([p.stored_ns for p in parts]), topics, ext
        )

    def count(self, **filters) -> int:
        return sum(len(b) for b in self.batches(**filters))
