"""The event record: one row of a numpy structured dtype.

Layout (little-endian, native to the hosts we run on)::

    offset size field        meaning
    0      8    event_id     idempotency key from the client (v2), 0 = none
    8      8    producer_ts  producer clock, ns since the epoch (0 = unknown)
    16     8    ingest_ts    time.monotonic_ns() when ingest decoded the frame
    24     8    seq          server-assigned sequence number (unique per engine run)
    32     4    topic_id     interned topic (see core.topics.TopicTable)
    36     4    conn_id      source connection id (0 = local / unknown)
    40     4    payload_len  bytes used in `payload`
    44     4    crc32        zlib.crc32(topic + payload) as sent on v2, 0 on v1 and in BATCH frames
    48     1    priority     0 BATCH, 1 LOW, 2 MEDIUM, 3 HIGH, 4 CRITICAL
    49     1    flags        bit 0: v2 frame (client expects ACKs), bit 1: replayed,
                             bits 2-3: the ACK mode the client asked for (0 default, 1 accepted,
                             2 stored, 3 synced; the v2 frame's flags bits 0-1)
    50     1    attempts     handler attempts so far (transactional retries)
    51     8    ext_off      payload in an arena: byte offset of its slot (core/payloads.py)
    59     1    ext_class    0 = payload inline; else the arena slot's size class + 1
    60     1    ext_arena    id of the PayloadArena holding the payload (1..255; 0 = inline)
    61     2    principal    who sent it: the stable key of its principal (ingest/auth.py), 0 = none
                             or a shared token; part of the dedup key (engine/idempotency.py)
    63     1    (padding to the 64-byte header; payloads.CRC_KEPT in flight when the inline bytes
                 of an arena payload's record keep its CRC for the log writer, core/payloads.py)
    64     P    payload      inline payload bytes, P = payload capacity

Payloads of up to P bytes (`records.payload_bytes`, default 448, so a record is 512 bytes) are stored
inline: the record is then one fixed-stride row, and a whole batch moves between rings with a single
numpy copy. A larger payload (up to what `server.tcp.max_frame_bytes` allows) is copied once, at
decode, into a slot of a PayloadArena (size-class slabs in NUMA memory, core/payloads.py); the record
carries the slot (ext_arena, ext_off, ext_class) and `payload_len`, its inline bytes stay unused. The
record still moves as one fixed-size row; the slot is given back when the record is released
(`payloads.release_records`, called by the processor that released it, or after a refused record
was dead-lettered). Memory: capacity x (64 + P) bytes per ring, plus `payloads.arena_bytes` once.
"""

from __future__ import annotations

import enum

import numpy as np

# The small-batch threshold, one for the whole engine: up to this many records (or values), plain
# Python ints beat numpy temporaries (~1 µs instead of ~10), so the hot paths that care have a
# plain-int branch below it and a vectorized one above it.
SMALL_BATCH = 8

HEADER_BYTES = 64
DEFAULT_PAYLOAD_BYTES = 448
MAX_PAYLOAD_BYTES = 1 << 20

FLAG_V2 = 0x01
FLAG_REPLAYED = 0x02
FLAG_ACK_SHIFT = 2
FLAG_ACK_MASK = 0x0C

# ACK modes (config `server.ack`, v2 frame flags bits 0-1): what an ACK promises about an event
ACK_DEFAULT, ACK_ACCEPTED, ACK_STORED, ACK_SYNCED = 0, 1, 2, 3
ACK_MODES = {"accepted": ACK_ACCEPTED, "stored": ACK_STORED, "synced": ACK_SYNCED}


class Priority(enum.IntEnum):
    BATCH = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4


PRIORITY_NAMES = tuple(p.name for p in Priority)

_HEADER_FIELDS = [
    ("event_id", "<u8"),
    ("producer_ts", "<u8"),
    ("ingest_ts", "<u8"),
    ("seq", "<u8"),
    ("topic_id", "<u4"),
    ("conn_id", "<u4"),
    ("payload_len", "<u4"),
    ("crc32", "<u4"),
    ("priority", "u1"),
    ("flags", "u1"),
    ("attempts", "u1"),
    ("ext_off", "<u8"),
    ("ext_class", "u1"),
    ("ext_arena", "u1"),
    ("principal", "<u2"),
    ("_pad", "V1"),
]

_dtype_cache: dict[int, np.dtype] = {}


def record_dtype(payload_bytes: int = DEFAULT_PAYLOAD_BYTES) -> np.dtype:
    """The record dtype with `payload_bytes` of inline payload (cached: one dtype per size)."""
    dt = _dtype_cache.get(payload_bytes)
    if dt is not None:
        return dt
    if not isinstance(payload_bytes, int) or not 0 <= payload_bytes <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload_bytes={payload_bytes!r} is not allowed; allowed: an integer 0..{MAX_PAYLOAD_BYTES}")
    fields: list[tuple] = list(_HEADER_FIELDS)
    if payload_bytes:
        fields.append(("payload", "u1", (payload_bytes,)))
    dt = np.dtype(fields, align=False)
    assert dt.itemsize == HEADER_BYTES + payload_bytes
    _dtype_cache[payload_bytes] = dt
    return dt


EVENT_DTYPE = record_dtype()


def payload_capacity(dtype: np.dtype) -> int:
    """Inline payload bytes a record of `dtype` can hold."""
    return dtype.itemsize - HEADER_BYTES


class PayloadTooLarge(ValueError):
    """A payload does not fit the configured inline capacity."""

    def __init__(self, size: int, capacity: int):
        super().__init__(
            f"payload of {size} bytes exceeds the inline capacity of {capacity} bytes "
            f"(records.payload_bytes; allowed: payloads of 0..{capacity} bytes)"
        )
        self.size = size
        self.capacity = capacity


def empty(n: int, dtype: np.dtype = EVENT_DTYPE) -> np.ndarray:
    """A zeroed batch of `n` records."""
    return np.zeros(n, dtype=dtype)


def set_payload(record: np.void | np.ndarray, data: bytes) -> None:
    """Store `data` inline in one record (a 0-d view or a np.void row)."""
    cap = record.dtype.itemsize - HEADER_BYTES
    if len(data) > cap:
        raise PayloadTooLarge(len(data), cap)
    record["payload"][: len(data)] = np.frombuffer(data, dtype=np.uint8)
    record["payload_len"] = len(data)
