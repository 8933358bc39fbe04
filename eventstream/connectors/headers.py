"""What a NATS message carries for the engine: header names, and event ids and priorities read from
headers (the source) or written into them (the sink). See jetstream.py for the connector."""

from __future__ import annotations

import hashlib

from eventstream.core.records import PRIORITY_NAMES

NATS_CONN_ID = 0xFFFFFFF0  # conn_id of records that came from the NATS source
H_MSG_ID = "Nats-Msg-Id"
H_PRIORITY = "Eventstream-Priority"
H_PRODUCER_TS = "Eventstream-Producer-Ts"


def hashed_id(key: str) -> int:
    """A stable non-zero 64-bit event id for a non-numeric message id."""
    v = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
    return v or 1


def numeric_id(mid: str | None, topic: str | None) -> int:
    """The event id a Nats-Msg-Id carries: `<n>` or `<topic>:<n>` (the sink's form, the topic being the
    message's own) with n in 1..2^64-1; 0 when it is none of these."""
    if not mid:
        return 0
    head, sep, tail = mid.rpartition(":")
    digits = tail if sep and head == topic else mid
    if digits.isascii() and digits.isdigit() and 0 < int(digits) < (1 << 64):
        return int(digits)
    return 0


def parse_priority(text) -> int | None:
    t = str(text).strip()
    if t.isdigit() and int(t) < len(PRIORITY_NAMES):
        return int(t)
    up = t.upper()
    return PRIORITY_NAMES.index(up) if up in PRIORITY_NAMES else None
