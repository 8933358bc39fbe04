"""Wire frames: constants, byte layouts and encoders for protocol v1 and v2 (see docs/protocol.md).

Every frame is ``u32 length`` (big-endian, bytes that follow) and then a body whose first byte picks
the version: 0..4 is a v1 priority, 0xE5 is the v2 magic. Encoders live here so the client, the
server (ACK/NACK) and the benchmarks build frames the same way; the decoder is in decoder.py.

Why the numpy layouts: the decoder reads the fixed part of many headers at once by gathering them
into an array of these big-endian dtypes, instead of one Python struct call per field.
"""

from __future__ import annotations

import secrets
import struct
import zlib
from collections.abc import Sequence

import numpy as np

LENGTH_BYTES = 4
V2_MAGIC = 0xE5
KIND_EVENT, KIND_ACK, KIND_NACK, KIND_HELLO = 1, 2, 3, 4
KIND_BATCH = 11  # many events in one frame (client to server; kinds 5..10 are the subscribe port's)
KIND_NAMES = {KIND_EVENT: "EVENT", KIND_ACK: "ACK", KIND_NACK: "NACK", KIND_HELLO: "HELLO", KIND_BATCH: "BATCH"}
MAX_TOKEN_BYTES = 1024  # a HELLO's payload (the client's token)
MAX_PRIORITY = 4
MAX_TOPIC_BYTES = 255
V1_HEADER_BYTES = 3  # priority, topic_len
V2_HEADER_BYTES = 26  # magic, kind, priority, flags, event_id, timestamp_ns, topic_len, crc32
DEFAULT_MAX_FRAME_BYTES = 1 << 20

LENGTH = struct.Struct(">I")
V1_HEAD = struct.Struct(">IBH")  # length, priority, topic_len
V2_HEAD = struct.Struct(">IBBBBQQHI")  # length, magic, kind, priority, flags, event_id, ts, topic_len, crc

# Fixed header parts as big-endian numpy dtypes, starting at the length field.
V1_HEADER_DTYPE = np.dtype([("length", ">u4"), ("priority", "u1"), ("topic_len", ">u2")])
V2_HEADER_DTYPE = np.dtype(
    [
        ("length", ">u4"),
        ("magic", "u1"),
        ("kind", "u1"),
        ("priority", "u1"),
        ("flags", "u1"),
        ("event_id", ">u8"),
        ("timestamp_ns", ">u8"),
        ("topic_len", ">u2"),
        ("crc32", ">u4"),
    ]
)
# BATCH frame (docs/protocol.md, "v2 BATCH frame"): a 26-byte header like every v2 frame, then the
# topic table (u8 length + name, topic_count times), the record table (count fixed 24-byte rows, read
# with one numpy.frombuffer) and the payloads back to back, in record order. crc32 covers everything
# after the header.
BATCH_HEAD = struct.Struct(">IBBBBIHI8sI")  # length, magic, kind, reserved, flags, count, topic_count,
#                                             topics_bytes, reserved (8 zero bytes), crc32
BATCH_RECORD_DTYPE = np.dtype(
    [
        ("priority", "u1"),
        ("flags", "u1"),
        ("topic", ">u2"),
        ("payload_len", ">u4"),
        ("event_id", ">u8"),
        ("timestamp_ns", ">u8"),
    ]
)
BATCH_RECORD_BYTES = 24
MAX_BATCH_TOPICS = 65535  # a record's topic index is a u16
assert BATCH_HEAD.size == LENGTH_BYTES + V2_HEADER_BYTES
assert BATCH_RECORD_DTYPE.itemsize == BATCH_RECORD_BYTES
assert V1_HEADER_DTYPE.itemsize == LENGTH_BYTES + V1_HEADER_BYTES
assert V2_HEADER_DTYPE.itemsize == LENGTH_BYTES + V2_HEADER_BYTES


class EncodeError(ValueError):
    """A frame cannot be encoded: the message names the field, the value and what is allowed."""


def _topic_bytes(topic: str | bytes) -> bytes:
    t = topic.encode("utf-8") if isinstance(topic, str) else bytes(topic)
    if not 1 <= len(t) <= MAX_TOPIC_BYTES:
        raise EncodeError(f"topic of {len(t)} bytes is not allowed; allowed: 1..{MAX_TOPIC_BYTES} bytes of UTF-8")
    return t


def _check_priority(priority: int) -> int:
    if not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise EncodeError(
            f"priority {priority!r} is not allowed; allowed: 0..{MAX_PRIORITY} (BATCH, LOW, MEDIUM, HIGH, CRITICAL)"
        )
    return priority


def check_event(topic: str | bytes, priority: int, event_id: int, timestamp_ns: int) -> bytes:
    """Check one event's header fields (the rules of every v2 frame and BATCH record); returns the topic
    as bytes. Raises EncodeError naming the field, its value and what is allowed."""
    t = _topic_bytes(topic)
    _check_priority(priority)
    if not 0 <= event_id < 1 << 64:
        raise EncodeError(f"event_id {event_id!r} is not allowed; allowed: 0..2**64-1 (0 = none)")
    if not 0 <= timestamp_ns < 1 << 64:
        raise EncodeError(f"timestamp_ns {timestamp_ns!r} is not allowed; allowed: 0..2**64-1 (0 = unknown)")
    return t


class EventIds:
    """A client's event ids: a random odd start, then +1 per event, never 0 (0 means "no id"), so two
    clients' ids do not meet by chance and a client's own ids never repeat within 2**64 events."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = secrets.randbits(62) | 1

    def next(self) -> int:
        eid = self._next
        self._next = (eid + 1) & 0xFFFFFFFFFFFFFFFF or 1
        return eid


def encode_v1(topic: str | bytes, payload: bytes = b"", priority: int = 2) -> bytes:
    """One v1 (EventStreamCore) frame."""
    t = _topic_bytes(topic)
    _check_priority(priority)
    return V1_HEAD.pack(V1_HEADER_BYTES + len(t) + len(payload), priority, len(t)) + t + payload


def encode_v2(
    topic: str | bytes,
    payload: bytes = b"",
    priority: int = 2,
    event_id: int = 0,
    timestamp_ns: int = 0,
    *,
    kind: int = KIND_EVENT,
    flags: int = 0,
) -> bytes:
    """One v2 frame (EVENT by default). crc32 covers topic bytes then payload bytes."""
    if kind == KIND_EVENT:
        t = check_event(topic, priority, event_id, timestamp_ns)
    else:
        t = topic.encode() if isinstance(topic, str) else bytes(topic)
        _check_priority(priority)
    crc = zlib.crc32(payload, zlib.crc32(t))
    return (
        V2_HEAD.pack(
            V2_HEADER_BYTES + len(t) + len(payload),
            V2_MAGIC,
            kind,
            priority,
            flags,
            event_id,
            timestamp_ns,
            len(t),
            crc,
        )
        + t
        + payload
    )


def encode_ack(count: int) -> bytes:
    """Server -> client: `count` EVENT frames accepted from this connection so far (cumulative)."""
    return V2_HEAD.pack(V2_HEADER_BYTES, V2_MAGIC, KIND_ACK, 0, 0, count, 0, 0, 0)


def encode_nack(index: int, reason: str) -> bytes:
    """Server -> client: frame number `index` (1-based on this connection) was rejected for `reason`."""
    r = reason.encode("utf-8")
    return V2_HEAD.pack(V2_HEADER_BYTES + len(r), V2_MAGIC, KIND_NACK, 0, 0, index, 0, 0, zlib.crc32(r)) + r


def encode_nacks(indices: np.ndarray, reason: str) -> bytes:
    """Many NACK frames with one reason, built as one numpy array (no per-frame Python)."""
    r = reason.encode("utf-8")
    n = len(indices)
    if n == 0:
        return b""
    dt = np.dtype([("h", V2_HEADER_DTYPE), ("r", f"V{len(r)}")]) if r else np.dtype([("h", V2_HEADER_DTYPE)])
    out = np.zeros(n, dtype=dt)
    h = out["h"]
    h["length"] = V2_HEADER_BYTES + len(r)
    h["magic"] = V2_MAGIC
    h["kind"] = KIND_NACK
    h["event_id"] = np.asarray(indices, dtype=np.uint64)
    h["crc32"] = zlib.crc32(r)
    if r:
        out["r"] = np.void(r)
    return out.tobytes()


def encode_many(
    version: int,
    topic: str | bytes,
    payloads: Sequence[bytes],
    priorities: Sequence[int] | int = 2,
    event_ids: Sequence[int] | None = None,
    timestamp_ns: int = 0,
) -> bytes:
    """A run of frames on one topic, concatenated (load tools and benchmarks)."""
    prios = [priorities] * len(payloads) if isinstance(priorities, int) else list(priorities)
    if version == 1:
        return b"".join(encode_v1(topic, p, pr) for p, pr in zip(payloads, prios, strict=False))
    ids = event_ids if event_ids is not None else [0] * len(payloads)
    return b"".join(encode_v2(topic, p, pr, e, timestamp_ns) for p, pr, e in zip(payloads, prios, ids, strict=False))


def batch_frame_bytes(topics_bytes: int, count: int, payload_bytes: int) -> int:
    """Size of a BATCH frame (with its length field) holding `count` records whose topic table takes
    `topics_bytes` and whose payloads take `payload_bytes` (clients size their batches with it)."""
    return LENGTH_BYTES + V2_HEADER_BYTES + topics_bytes + BATCH_RECORD_BYTES * count + payload_bytes


def encode_batch_columns(
    topics: Sequence[str | bytes],
    topic_index,
    payload_lens,
    payloads,
    priorities=2,
    event_ids=0,
    timestamps_ns=0,
    flags=0,
    *,
    ack: int = 0,
) -> bytes:
    """One BATCH frame from columns (no per-event Python beyond what the caller built).

    `topics`: the batch's topic table; `topic_index[i]`: record i's topic (0-based into `topics`);
    `payload_lens[i]`: its payload size; `payloads`: every payload back to back, in record order (one
    bytes-like of sum(payload_lens) bytes); `priorities`, `event_ids`, `timestamps_ns`, `flags`: a
    column or one value for every record. `ack`: the ACK mode of records whose flags ask for none
    (header flags bits 0-1)."""
    lens = np.asarray(payload_lens, dtype=np.int64)
    n = len(lens)
    if n == 0:
        raise EncodeError("a batch of 0 events is not allowed; allowed: 1 or more")
    tb = [_topic_bytes(t) for t in topics]
    if not 1 <= len(tb) <= MAX_BATCH_TOPICS:
        raise EncodeError(f"a batch of {len(tb)} topics is not allowed; allowed: 1..{MAX_BATCH_TOPICS}")
    ti = np.asarray(topic_index, dtype=np.int64)
    if ti.size and (int(ti.min()) < 0 or int(ti.max()) >= len(tb)):
        bad = int(ti.max()) if int(ti.max()) >= len(tb) else int(ti.min())
        raise EncodeError(f"topic index {bad} is not allowed; allowed: 0..{len(tb) - 1} (the batch's topic table)")
    if int(lens.min()) < 0:
        raise EncodeError(f"payload length {int(lens.min())} is not allowed; allowed: 0 or more")
    table = np.empty(n, dtype=BATCH_RECORD_DTYPE)
    for name, col in (("priority", priorities), ("flags", flags)):
        c = np.asarray(col, dtype=np.int64)
        if c.size and (int(c.min()) < 0 or int(c.max()) > (MAX_PRIORITY if name == "priority" else 3)):
            bad = int(c.max()) if int(c.min()) >= 0 else int(c.min())
            if name == "priority":
                _check_priority(bad)
            raise EncodeError(f"record flags {bad} are not allowed; allowed: 0..3 (the ACK mode)")
        table[name] = c
    table["topic"] = ti
    table["payload_len"] = lens
    table["event_id"] = event_ids
    table["timestamp_ns"] = timestamps_ns
    if not 0 <= ack <= 3:
        raise EncodeError(f"ack mode {ack!r} is not allowed; allowed: 0..3 (default, accepted, stored, synced)")
    pb = payloads if isinstance(payloads, (bytes, bytearray, memoryview)) else bytes(payloads)
    total = int(lens.sum())
    if len(pb) != total:
        raise EncodeError(f"payloads of {len(pb)} bytes do not match payload_lens summing to {total}")
    ttab = b"".join(bytes((len(t),)) + t for t in tb)
    body_crc = zlib.crc32(pb, zlib.crc32(table.data, zlib.crc32(ttab)))
    head = BATCH_HEAD.pack(
        V2_HEADER_BYTES + len(ttab) + BATCH_RECORD_BYTES * n + total,
        V2_MAGIC,
        KIND_BATCH,
        0,
        ack,
        n,
        len(tb),
        len(ttab),
        bytes(8),
        body_crc,
    )
    return b"".join((head, ttab, table.tobytes(), pb))


def encode_batch(events: Sequence, *, ack: int = 0) -> bytes:
    """One BATCH frame of `events`: (topic, payload[, priority[, event_id[, timestamp_ns]]]) tuples.

    Topics are interned into the batch's topic table in order of first use."""
    index: dict[bytes, int] = {}
    topics: list[bytes] = []
    tix, prios, ids, tss, pls = [], [], [], [], []
    for ev in events:
        t = ev[0].encode("utf-8") if isinstance(ev[0], str) else bytes(ev[0])
        k = index.get(t)
        if k is None:
            k = index[t] = len(topics)
            topics.append(t)
        tix.append(k)
        pls.append(bytes(ev[1]))
        prios.append(ev[2] if len(ev) > 2 else 2)
        ids.append(ev[3] if len(ev) > 3 else 0)
        tss.append(ev[4] if len(ev) > 4 else 0)
    for p in prios:
        _check_priority(p)
    for e in ids:
        if not 0 <= e < 1 << 64:
            raise EncodeError(f"event_id {e!r} is not allowed; allowed: 0..2**64-1 (0 = none)")
    for ts in tss:
        if not 0 <= ts < 1 << 64:
            raise EncodeError(f"timestamp_ns {ts!r} is not allowed; allowed: 0..2**64-1 (0 = unknown)")
    return encode_batch_columns(
        topics,
        np.array(tix, dtype=np.int64),
        [len(p) for p in pls],
        b"".join(pls),
        np.array(prios, dtype=np.uint8),
        np.array(ids, dtype=np.uint64),
        np.array(tss, dtype=np.uint64),
        ack=ack,
    )


def encode_hello(token: str | bytes) -> bytes:
    """Client -> server, first frame of a TCP connection: the shared token (docs/protocol.md, HELLO)."""
    t = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    if len(t) > MAX_TOKEN_BYTES:
        raise EncodeError(f"token of {len(t)} bytes is not allowed; allowed: 0..{MAX_TOKEN_BYTES} bytes")
    return V2_HEAD.pack(V2_HEADER_BYTES + len(t), V2_MAGIC, KIND_HELLO, 0, 0, 0, 0, 0, zlib.crc32(t)) + t


HELLO_NEED_MORE, HELLO_ABSENT = "need_more", "absent"


def parse_hello(buf) -> tuple[str, int, bytes]:
    """Look for a HELLO frame at the start of `buf` (the first bytes of a connection).

    Returns (status, consumed, token): status HELLO_NEED_MORE (too few bytes to tell), HELLO_ABSENT
    (the first frame is something else: consumed 0), "ok" (a HELLO of `consumed` bytes carrying
    `token`), or a reason text starting with "auth:" (a malformed HELLO)."""
    n = len(buf)
    if n < LENGTH_BYTES + 2:
        return HELLO_NEED_MORE, 0, b""
    if buf[LENGTH_BYTES] != V2_MAGIC or buf[LENGTH_BYTES + 1] != KIND_HELLO:
        return HELLO_ABSENT, 0, b""
    (length,) = LENGTH.unpack_from(buf, 0)
    if not V2_HEADER_BYTES <= length <= V2_HEADER_BYTES + MAX_TOKEN_BYTES:
        return (
            (
                f"auth: HELLO length {length} is not allowed; allowed: {V2_HEADER_BYTES}.."
                f"{V2_HEADER_BYTES + MAX_TOKEN_BYTES}"
            ),
            0,
            b"",
        )
    if n < LENGTH_BYTES + length:
        return HELLO_NEED_MORE, 0, b""
    _l, _m, _k, _p, _f, _eid, _ts, tlen, crc = V2_HEAD.unpack_from(buf, 0)
    token = bytes(buf[LENGTH_BYTES + V2_HEADER_BYTES : LENGTH_BYTES + length])
    if tlen != 0:
        return f"auth: HELLO topic_len {tlen} is not allowed; allowed: 0", 0, b""
    if zlib.crc32(token) != crc:
        return "auth: HELLO crc32 mismatch (zlib.crc32 of the token)", 0, b""
    return "ok", LENGTH_BYTES + length, token


def split_control_frames(buf: bytearray) -> list[tuple[int, int, bytes]]:
    """Pop complete server->client frames (kind, event_id, payload) off the front of `buf`.

    Used by clients; ACK/NACK traffic is small, so one struct call per frame is fine here.
    Raises ValueError on a frame that is not v2 (the server only ever sends v2).
    """
    out = []
    pos = 0
    n = len(buf)
    while n - pos >= LENGTH_BYTES + V2_HEADER_BYTES:
        length, magic, kind, _prio, _flags, eid, _ts, tlen, _crc = V2_HEAD.unpack_from(buf, pos)
        if magic != V2_MAGIC or length < V2_HEADER_BYTES:
            raise ValueError(f"server sent a frame that is not v2 (first byte {magic:#04x}, length {length})")
        end = pos + LENGTH_BYTES + length
        if end > n:
            break
        out.append((kind, eid, bytes(buf[pos + LENGTH_BYTES + V2_HEADER_BYTES + tlen : end])))
        pos = end
    del buf[:pos]
    return out
