"""Subscribe frames (docs/protocol.md, "Subscribe"): sans-I/O codec, no sockets.

Every frame uses the v2 header of protocol/frames.py (u32 length, magic 0xE5, kind, priority, flags,
u64 event_id, u64 timestamp_ns, u16 topic_len, u32 crc32, topic, payload); crc32 covers topic bytes
then payload bytes. The kinds added here (EVENT/ACK/NACK/HELLO are 1..4):

    5 SUBSCRIBE  client -> server  flags = start mode, event_id = start value, timestamp_ns = initial
                                   credit, topic = topic glob, payload = consumer group name (may be empty)
    6 CREDIT     client -> server  event_id = more events the server may send
    7 DELIVER    server -> client  one stored event: priority, event_id, timestamp_ns = producer time,
                                   topic, payload = u64 offset + u64 stored_ns + the event's payload
    8 COMMIT     both ways         client: event_id = how many DELIVERs of this connection are done
                                   (cumulative); server: event_id = the group's committed offset, durable
    9 SUB_ERROR  server -> client  payload = the reason (UTF-8); the server then closes
   10 END        server -> client  event_id = next offset; the stored events (no follow) are all sent

Use: `SubscribeDecoder` turns received bytes into `Frame`s (either direction); the encoders build
bytes. A malformed frame raises `SubscribeProtocolError` whose message names the field, its value and
what is allowed.
"""

from __future__ import annotations

import fnmatch
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC
from typing import NamedTuple

import numpy as np

from eventstream.protocol.frames import (
    KIND_HELLO,
    LENGTH,
    LENGTH_BYTES,
    MAX_TOPIC_BYTES,
    V2_HEAD,
    V2_HEADER_BYTES,
    V2_MAGIC,
)

KIND_SUBSCRIBE, KIND_CREDIT, KIND_DELIVER, KIND_COMMIT, KIND_SUB_ERROR, KIND_END = 5, 6, 7, 8, 9, 10
KIND_DELIVER_BATCH = 12  # many stored events in one frame (a subscription that asked for it: FLAG_BATCH)
KIND_NAMES = {
    KIND_HELLO: "HELLO",
    KIND_SUBSCRIBE: "SUBSCRIBE",
    KIND_CREDIT: "CREDIT",
    KIND_DELIVER: "DELIVER",
    KIND_COMMIT: "COMMIT",
    KIND_SUB_ERROR: "SUB_ERROR",
    KIND_END: "END",
    KIND_DELIVER_BATCH: "DELIVER_BATCH",
}
CLIENT_KINDS = (KIND_HELLO, KIND_SUBSCRIBE, KIND_CREDIT, KIND_COMMIT)
SERVER_KINDS = (KIND_DELIVER, KIND_COMMIT, KIND_SUB_ERROR, KIND_END, KIND_DELIVER_BATCH)

# SUBSCRIBE flags: bits 0-1 the start mode, bit 2 "no follow" (send what is stored, then END)
START_EARLIEST, START_LATEST, START_OFFSET, START_TIME = 0, 1, 2, 3
START_NAMES = {START_EARLIEST: "earliest", START_LATEST: "latest", START_OFFSET: "offset", START_TIME: "time"}
FLAG_START_MASK = 0x03
FLAG_NO_FOLLOW = 0x04
FLAG_BATCH = 0x08  # deliver in DELIVER_BATCH frames (many events each) instead of one DELIVER per event
MAX_DELIVER_BATCH_BYTES = 256 << 10  # a DELIVER_BATCH frame holds events up to about this many bytes
# DELIVER_BATCH record table row (big-endian, like every frame)
DELIVER_ROW_DTYPE = np.dtype(
    [
        ("priority", "u1"),
        ("flags", "u1"),
        ("topic", ">u2"),
        ("payload_len", ">u4"),
        ("event_id", ">u8"),
        ("producer_ts", ">u8"),
        ("offset", ">u8"),
        ("stored_ns", ">u8"),
    ]
)
DELIVER_ROW_BYTES = 40
assert DELIVER_ROW_DTYPE.itemsize == DELIVER_ROW_BYTES
MAX_GROUP_BYTES = 128
MAX_CONTROL_FRAME = V2_HEADER_BYTES + MAX_TOPIC_BYTES + MAX_GROUP_BYTES  # largest client frame body
DELIVER_PREFIX = struct.Struct(">QQ")  # offset, stored_ns
U64 = (1 << 64) - 1


class SubscribeProtocolError(ValueError):
    """A frame that breaks the subscribe protocol: the message names the field, value, what is allowed."""


@dataclass(frozen=True)
class Frame:
    kind: int
    priority: int = 0
    flags: int = 0
    event_id: int = 0
    timestamp_ns: int = 0
    topic: bytes = b""
    payload: bytes = b""


@dataclass(frozen=True)
class Subscribe:
    """A decoded SUBSCRIBE request."""

    glob: str
    start: int  # START_*
    value: int  # offset or time (ns since the epoch); 0 for earliest/latest
    credit: int
    group: str  # "" = no group
    follow: bool = True
    batch: bool = False  # DELIVER_BATCH frames

    def matches(self, topic: str) -> bool:
        return fnmatch.fnmatchcase(topic, self.glob)


class Delivered(NamedTuple):
    """One event as a subscriber sees it (a decoded DELIVER frame, or one event of a DELIVER_BATCH).
    A NamedTuple: made per event on the client, so it must be cheap to create."""

    offset: int
    topic: str
    payload: bytes
    event_id: int
    priority: int
    producer_ts: int
    stored_ns: int


# ------------------------------------------------------------------------------------ encoders
def _frame(
    kind: int,
    *,
    priority: int = 0,
    flags: int = 0,
    event_id: int = 0,
    timestamp_ns: int = 0,
    topic: bytes = b"",
    payload: bytes = b"",
) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(topic))
    return (
        V2_HEAD.pack(
            V2_HEADER_BYTES + len(topic) + len(payload),
            V2_MAGIC,
            kind,
            priority,
            flags,
            event_id,
            timestamp_ns,
            len(topic),
            crc,
        )
        + topic
        + payload
    )


def encode_subscribe(
    glob: str,
    start: int = START_EARLIEST,
    value: int = 0,
    credit: int = 1000,
    group: str = "",
    follow: bool = True,
    batch: bool = False,
) -> bytes:
    g = glob.encode("utf-8")
    if not 1 <= len(g) <= MAX_TOPIC_BYTES:
        raise SubscribeProtocolError(
            f"topic glob of {len(g)} bytes is not allowed; allowed: 1..{MAX_TOPIC_BYTES} bytes of UTF-8"
        )
    if start not in START_NAMES:
        raise SubscribeProtocolError(
            f"start {start!r} is not allowed; allowed: " + ", ".join(f"{k} {v}" for k, v in START_NAMES.items())
        )
    if not 0 <= value <= U64 or not 0 <= credit <= U64:
        raise SubscribeProtocolError(f"start value {value!r} / credit {credit!r} is not allowed; allowed: 0..2**64-1")
    grp = group.encode("utf-8")
    if len(grp) > MAX_GROUP_BYTES:
        raise SubscribeProtocolError(
            f"group name of {len(grp)} bytes is not allowed; allowed: 0..{MAX_GROUP_BYTES} bytes of UTF-8"
        )
    flags = start | (0 if follow else FLAG_NO_FOLLOW) | (FLAG_BATCH if batch else 0)
    return _frame(KIND_SUBSCRIBE, flags=flags, event_id=value, timestamp_ns=credit, topic=g, payload=grp)


def encode_credit(n: int) -> bytes:
    if not 0 < n <= U64:
        raise SubscribeProtocolError(f"credit {n!r} is not allowed; allowed: 1..2**64-1")
    return _frame(KIND_CREDIT, event_id=n)


def encode_commit(value: int) -> bytes:
    """Client: events done on this connection (cumulative count); server: the group's committed offset."""
    if not 0 <= value <= U64:
        raise SubscribeProtocolError(f"COMMIT value {value!r} is not allowed; allowed: 0..2**64-1")
    return _frame(KIND_COMMIT, event_id=value)


def encode_sub_error(reason: str) -> bytes:
    return _frame(KIND_SUB_ERROR, payload=reason.encode("utf-8"))


def encode_end(next_offset: int) -> bytes:
    return _frame(KIND_END, event_id=next_offset)


def encode_deliver(
    offset: int,
    topic: bytes,
    payload: bytes,
    *,
    event_id: int = 0,
    priority: int = 0,
    producer_ts: int = 0,
    stored_ns: int = 0,
) -> bytes:
    return _frame(
        KIND_DELIVER,
        priority=priority,
        event_id=event_id,
        timestamp_ns=producer_ts,
        topic=topic,
        payload=DELIVER_PREFIX.pack(offset, stored_ns) + payload,
    )


def frame_buffers(kind: int, parts, *, event_id: int = 0) -> list:
    """A frame of `kind` with an empty topic whose payload is `parts` (buffers of bytes) back to back,
    as buffers to write in order (its header, then `parts`, not copied): the CRC runs over the parts."""
    crc = 0
    size = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        size += memoryview(part).nbytes
    head = V2_HEAD.pack(V2_HEADER_BYTES + size, V2_MAGIC, kind, 0, 0, event_id, 0, 0, crc)
    return [head, *parts]


def frame_parts(kind: int, parts, *, event_id: int = 0) -> bytes:
    """frame_buffers joined: the parts are copied once, into the frame."""
    return b"".join(frame_buffers(kind, parts, event_id=event_id))


def deliver_cuts(payload_len: np.ndarray, limit: int = MAX_DELIVER_BATCH_BYTES) -> list[tuple[int, int]]:
    """Where to cut events with these payload lengths into DELIVER_BATCH frames of about `limit` bytes
    (row plus payload; a larger event gets a frame of its own) and at most 65535 events (so a frame
    never has more topics than its u16 topic count holds): (start, stop) per frame. One searchsorted
    per frame."""
    n = len(payload_len)
    if n == 0:
        return []
    ends = np.cumsum(payload_len.astype(np.int64) + DELIVER_ROW_BYTES)
    cuts = []
    i, done = 0, 0
    while i < n:
        j = int(np.searchsorted(ends, done + limit, side="right"))
        j = min(max(j, i + 1), i + MAX_FRAME_TOPICS, n)
        cuts.append((i, j))
        done = int(ends[j - 1])
        i = j
    return cuts


MAX_FRAME_TOPICS = 65535  # a DELIVER_BATCH topic table's u16 count


def topic_table(names: list[bytes]) -> bytes:
    """A DELIVER_BATCH topic table: u16 count, then u8 length + name each."""
    return struct.pack(">H", len(names)) + b"".join(bytes((len(t),)) + t for t in names)


def deliver_rows(*, offset, event_id, producer_ts, stored_ns, priority, topic, payload_len) -> np.ndarray:
    """A DELIVER_BATCH record table (DELIVER_ROW_DTYPE) from columns: one structured array."""
    rows = np.empty(len(offset), dtype=DELIVER_ROW_DTYPE)
    rows["priority"] = priority
    rows["flags"] = 0
    rows["topic"] = topic
    rows["payload_len"] = payload_len
    rows["event_id"] = event_id
    rows["producer_ts"] = producer_ts
    rows["offset"] = offset
    rows["stored_ns"] = stored_ns
    return rows


def encode_deliver_batch(
    *,
    offset,
    event_id,
    producer_ts,
    stored_ns,
    priority,
    topic,
    topic_names: list[bytes],
    payload_len,
    payloads: list,
) -> bytes:
    """One DELIVER_BATCH frame from columns (arrays or lists of one length; `topic` indexes
    `topic_names`) and the payloads in order (`payloads`: buffers whose bytes, back to back, are
    sum(payload_len) bytes). A constant number of numpy operations: the record table is one
    structured array, the payloads are joined once, into the frame."""
    rows = deliver_rows(
        offset=offset,
        event_id=event_id,
        producer_ts=producer_ts,
        stored_ns=stored_ns,
        priority=priority,
        topic=topic,
        payload_len=payload_len,
    )
    return frame_parts(
        KIND_DELIVER_BATCH, [topic_table(topic_names), rows.view(np.uint8), *payloads], event_id=len(rows)
    )


def encode_deliver_batches(events) -> bytes:
    """DELIVER_BATCH frames for `events` (objects with offset, topic (str), payload, event_id, priority,
    producer_ts, stored_ns), in order, each holding events up to about MAX_DELIVER_BATCH_BYTES (an
    event larger than that gets a frame of its own). Payload of a frame: u16 topic_count, the topic
    table (u8 length + name each), `event_id` = count rows of DELIVER_ROW_DTYPE, the payloads back to
    back (docs/protocol.md). Per event Python: the server encodes from columns (encode_deliver_batch)."""
    out = []
    lens = np.array([len(e.payload) for e in events], dtype=np.int64)
    for i, j in deliver_cuts(lens):
        chunk = events[i:j]
        topics: dict[str, int] = {}
        for e in chunk:
            topics.setdefault(e.topic, len(topics))
        out.append(
            encode_deliver_batch(
                offset=[e.offset for e in chunk],
                event_id=[e.event_id for e in chunk],
                producer_ts=[e.producer_ts for e in chunk],
                stored_ns=[e.stored_ns for e in chunk],
                priority=[e.priority for e in chunk],
                topic=[topics[e.topic] for e in chunk],
                topic_names=[t.encode("utf-8") for t in topics],
                payload_len=lens[i:j],
                payloads=[e.payload for e in chunk],
            )
        )
    return b"".join(out)


class DeliverBatch:
    """Delivered events as columns (one DELIVER_BATCH frame, or DELIVER frames received together): the
    record table `rows` (DELIVER_ROW_DTYPE, big-endian, read with one numpy.frombuffer), the topic names
    `topics` (rows["topic"] indexes them), the payloads back to back in `data` from `start`.

    Columns come as native numpy arrays (offsets, event_ids, ...), each made once on first use; per
    event objects only from events(), payloads() or iteration."""

    __slots__ = ("_ends", "data", "rows", "start", "topics")

    def __init__(self, rows: np.ndarray, topics: list[str], data, start: int):
        self.rows = rows
        self.topics = topics
        self.data = data
        self.start = start
        self._ends: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def offsets(self) -> np.ndarray:
        return self.rows["offset"].astype(np.uint64)

    @property
    def event_ids(self) -> np.ndarray:
        return self.rows["event_id"].astype(np.uint64)

    @property
    def producer_ts(self) -> np.ndarray:
        return self.rows["producer_ts"].astype(np.uint64)

    @property
    def stored_ns(self) -> np.ndarray:
        return self.rows["stored_ns"].astype(np.uint64)

    @property
    def priorities(self) -> np.ndarray:
        return self.rows["priority"].copy()

    @property
    def topic_index(self) -> np.ndarray:
        """Per event, its index in `topics`."""
        return self.rows["topic"].astype(np.uint16)

    @property
    def payload_lens(self) -> np.ndarray:
        return self.rows["payload_len"].astype(np.int64)

    def payload_ends(self) -> np.ndarray:
        """Per event, the end of its payload in `data` (it starts where the previous one ends, the first
        at `start`)."""
        if self._ends is None:
            self._ends = self.start + np.cumsum(self.payload_lens)
        return self._ends

    def payload_block(self) -> memoryview:
        """Every payload, back to back (a view, no copy)."""
        end = int(self.payload_ends()[-1]) if len(self.rows) else self.start
        return memoryview(self.data)[self.start : end]

    def payloads(self) -> list[bytes]:
        ends = self.payload_ends().tolist()
        data = self.data
        return [data[a:b] for a, b in zip([self.start, *ends[:-1]], ends, strict=True)]

    def topic_names(self) -> list[str]:
        """Per event, its topic name."""
        if not len(self.rows):
            return []
        return np.array(self.topics, dtype=object)[self.rows["topic"]].tolist()

    def __getitem__(self, s: slice) -> DeliverBatch:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("a DeliverBatch takes slices with step 1; allowed: batch[a:b]")
        a, _b, _ = s.indices(len(self.rows))
        start = self.start if a == 0 else int(self.payload_ends()[a - 1])
        return DeliverBatch(self.rows[s], self.topics, self.data, start)

    def events(self) -> list[Delivered]:
        """One Delivered per event (the per-event API)."""
        r = self.rows
        return list(
            map(
                Delivered,
                r["offset"].tolist(),
                self.topic_names(),
                self.payloads(),
                r["event_id"].tolist(),
                r["priority"].tolist(),
                r["producer_ts"].tolist(),
                r["stored_ns"].tolist(),
            )
        )

    def __iter__(self):
        return iter(self.events())

    @staticmethod
    def of_events(events: list[Delivered]) -> DeliverBatch:
        """Events decoded one by one (DELIVER frames) as a batch."""
        names: dict[str, int] = {}
        for e in events:
            names.setdefault(e.topic, len(names))
        rows = np.empty(len(events), dtype=DELIVER_ROW_DTYPE)
        rows["priority"] = [e.priority for e in events]
        rows["flags"] = 0
        rows["topic"] = [names[e.topic] for e in events]
        rows["payload_len"] = [len(e.payload) for e in events]
        rows["event_id"] = [e.event_id for e in events]
        rows["producer_ts"] = [e.producer_ts for e in events]
        rows["offset"] = [e.offset for e in events]
        rows["stored_ns"] = [e.stored_ns for e in events]
        return DeliverBatch(rows, list(names), b"".join(e.payload for e in events), 0)


def decode_deliver_batch(f: Frame) -> DeliverBatch:
    """The events of a DELIVER_BATCH frame as columns: its record table read with one numpy.frombuffer,
    checked against the frame's size and topic table; nothing per event."""
    p = f.payload
    count = f.event_id
    try:
        (tcount,) = struct.unpack_from(">H", p, 0)
        pos = 2
        names = []
        for _ in range(tcount):
            tl = p[pos]
            names.append(p[pos + 1 : pos + 1 + tl].decode("utf-8", "replace"))
            pos += 1 + tl
        rows = np.frombuffer(p, dtype=DELIVER_ROW_DTYPE, count=count, offset=pos)
    except (IndexError, ValueError, struct.error):
        raise SubscribeProtocolError(
            f"DELIVER_BATCH of {count} events does not hold its topic table and record table in {len(p)} bytes"
        ) from None
    start = pos + DELIVER_ROW_BYTES * count
    if start + int(rows["payload_len"].sum(dtype=np.int64)) != len(p) or (count and int(rows["topic"].max()) >= tcount):
        raise SubscribeProtocolError(
            f"DELIVER_BATCH of {count} events: payload lengths or topic indices do not "
            f"match its {len(p)} bytes and {tcount} topics"
        )
    return DeliverBatch(rows, names, p, start)


def parse_deliver_batch(f: Frame) -> list[Delivered]:
    """The events of a DELIVER_BATCH frame, one Delivered each."""
    return decode_deliver_batch(f).events()


# ------------------------------------------------------------------------------------ decoding
class SubscribeDecoder:
    """Incremental decoder: feed(bytes) -> complete Frames. `kinds` are the kinds this side accepts;
    `max_frame` bounds `length` (checked as soon as the 4 length bytes arrive)."""

    def __init__(self, kinds, max_frame: int):
        self.kinds = tuple(kinds)
        self.max_frame = max_frame
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        out = []
        buf = self.buf
        pos = 0
        n = len(buf)
        while n - pos >= LENGTH_BYTES + 2:
            (length,) = LENGTH.unpack_from(buf, pos)
            magic, kind = buf[pos + 4], buf[pos + 5]
            if magic != V2_MAGIC:
                raise SubscribeProtocolError(
                    f"magic 0x{magic:02x} is not allowed; allowed: 0x{V2_MAGIC:02x} (a v2 frame)"
                )
            if kind not in self.kinds:
                raise SubscribeProtocolError(
                    f"kind {kind} is not allowed here; allowed: "
                    + ", ".join(f"{k} {KIND_NAMES.get(k, '?')}" for k in self.kinds)
                )
            if length > self.max_frame:
                raise SubscribeProtocolError(
                    f"frame length {length} exceeds the limit of {self.max_frame} bytes "
                    f"for a {KIND_NAMES[kind]} frame; allowed: "
                    f"{V2_HEADER_BYTES}..{self.max_frame}"
                )
            if length < V2_HEADER_BYTES:
                raise SubscribeProtocolError(
                    f"frame length {length} is too short; allowed: at least {V2_HEADER_BYTES} (the v2 header)"
                )
            if n - pos < LENGTH_BYTES + length:
                break
            _l, _m, _k, prio, flags, eid, ts, tlen, crc = V2_HEAD.unpack_from(buf, pos)
            if V2_HEADER_BYTES + tlen > length:
                raise SubscribeProtocolError(
                    f"topic_len {tlen} does not fit in frame length {length}; allowed: 0..{length - V2_HEADER_BYTES}"
                )
            start = pos + LENGTH_BYTES + V2_HEADER_BYTES
            with memoryview(buf) as mv:  # one copy of each part (a bytearray slice would copy twice)
                topic = bytes(mv[start : start + tlen])
                payload = bytes(mv[start + tlen : pos + LENGTH_BYTES + length])
            if zlib.crc32(payload, zlib.crc32(topic)) != crc:
                raise SubscribeProtocolError(
                    f"crc32 0x{crc:08x} of a {KIND_NAMES[kind]} frame does not match; "
                    "allowed: zlib.crc32(topic bytes + payload bytes)"
                )
            out.append(Frame(kind, prio, flags, eid, ts, topic, payload))
            pos += LENGTH_BYTES + length
        if pos:
            del buf[:pos]
        return out


def parse_subscribe(f: Frame, max_credit: int) -> Subscribe:
    """Check a SUBSCRIBE frame's fields; SubscribeProtocolError names the first bad one."""
    if f.kind != KIND_SUBSCRIBE:
        raise SubscribeProtocolError(
            f"kind {f.kind} ({KIND_NAMES.get(f.kind, '?')}) is not allowed as the first "
            f"frame; allowed: {KIND_SUBSCRIBE} SUBSCRIBE (after an optional HELLO)"
        )
    if f.flags & ~(FLAG_START_MASK | FLAG_NO_FOLLOW | FLAG_BATCH):
        raise SubscribeProtocolError(
            f"SUBSCRIBE flags 0x{f.flags:02x} is not allowed; allowed: bits 0-1 the start "
            "mode, bit 2 no-follow, bit 3 batch delivery, bits 4-7 zero"
        )
    if not 1 <= len(f.topic) <= MAX_TOPIC_BYTES:
        raise SubscribeProtocolError(
            f"SUBSCRIBE topic glob of {len(f.topic)} bytes is not allowed; allowed: 1..{MAX_TOPIC_BYTES} bytes of UTF-8"
        )
    try:
        glob = f.topic.decode("utf-8")
    except UnicodeDecodeError:
        raise SubscribeProtocolError("SUBSCRIBE topic glob is not valid UTF-8; allowed: UTF-8 text") from None
    if len(f.payload) > MAX_GROUP_BYTES:
        raise SubscribeProtocolError(
            f"SUBSCRIBE group name of {len(f.payload)} bytes is not allowed; allowed: "
            f"0..{MAX_GROUP_BYTES} bytes of UTF-8"
        )
    try:
        group = f.payload.decode("utf-8")
    except UnicodeDecodeError:
        raise SubscribeProtocolError("SUBSCRIBE group name is not valid UTF-8; allowed: UTF-8 text") from None
    if group and not all(c.isalnum() or c in "._-" for c in group):
        raise SubscribeProtocolError(
            f"SUBSCRIBE group name {group!r} is not allowed; allowed: letters, digits, '.', '_' and '-'"
        )
    if f.timestamp_ns > max_credit:
        raise SubscribeProtocolError(
            f"SUBSCRIBE credit {f.timestamp_ns} is not allowed; allowed: 0..{max_credit} (server.subscribe.max_credit)"
        )
    start = f.flags & FLAG_START_MASK
    value = f.event_id if start in (START_OFFSET, START_TIME) else 0
    return Subscribe(
        glob, start, value, f.timestamp_ns, group, follow=not f.flags & FLAG_NO_FOLLOW, batch=bool(f.flags & FLAG_BATCH)
    )


def parse_deliver(f: Frame) -> Delivered:
    if len(f.payload) < DELIVER_PREFIX.size:
        raise SubscribeProtocolError(
            f"DELIVER payload of {len(f.payload)} bytes is too short; allowed: at least "
            f"{DELIVER_PREFIX.size} (offset, stored_ns)"
        )
    offset, stored_ns = DELIVER_PREFIX.unpack_from(f.payload)
    return Delivered(
        offset,
        f.topic.decode("utf-8", "replace"),
        f.payload[DELIVER_PREFIX.size :],
        f.event_id,
        f.priority,
        f.timestamp_ns,
        stored_ns,
    )


def parse_start(text: str) -> tuple[int, int]:
    """`earliest`, `latest`, an offset (digits) or a time (ISO 8601, or `<digits>ns`) -> (mode, value).

    Raises ValueError naming what is allowed."""
    t = text.strip()
    if t == "earliest":
        return START_EARLIEST, 0
    if t == "latest":
        return START_LATEST, 0
    if t.isdigit():
        return START_OFFSET, int(t)
    if t.endswith("ns") and t[:-2].isdigit():
        return START_TIME, int(t[:-2])
    from datetime import datetime

    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"start {text!r} is not allowed; allowed: earliest, latest, an offset (e.g. 1200), "
            "a time in ISO 8601 (e.g. 2026-12-06T10:00:00Z) or ns since the epoch (e.g. "
            "1765000000000000000ns)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return START_TIME, int(dt.timestamp() * 1_000_000) * 1000
