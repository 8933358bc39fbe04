"""The fixed set of drop-reason categories: the only values `events_dropped_total{reason}` may carry.

Reason *texts* (dead-letter lines, NACKs, logs) say what happened in detail and may quote client input:
numbers from a frame header, exception messages, topic text. A metric label must not: every distinct
label value is a new time series kept forever by the registry and by Prometheus, so a client sending
frames with varying lengths could create series without bound (the hardening issue saw 85,787). At the
metrics boundary every reason is therefore mapped to one of REASONS, and anything unrecognised to
"other".

A reason is recognised when it IS a category, starts with ``<category>:`` (the engine's own reasons:
``overflow:batch``, ``handler_error: ValueError: ...``), or is one of the frame decoder's messages
(``frame length 1234567 exceeds ...``, ``priority 9 is not allowed ...``; protocol/decoder.py and
protocol/framing.py), which do not carry their class as a prefix.
"""

from __future__ import annotations

# Queue overflow and flow control (engine/bus.py, ingest/delivery.py, ingest/admission.py)
OVERLOAD = ("overflow", "backpressure", "paused")
# Processing (engine/processors) and lifecycle (service.py)
PROCESSING = ("handler_error", "retries_exhausted", "shutdown", "duplicate", "sink_failed")
# Dataflows (eventstream/flow): events behind the watermark, events an operator raised on
FLOWS = ("late", "flow_error")
# Frames refused by the decoder: FrameError.error_class (protocol/decoder.py)
FRAME = ("topic_len", "topic_utf8", "priority", "kind", "crc", "payload_too_large", "framing", "batch")
# Per-client limits and rights (ingest/limits.py, ingest/auth.py; forbidden: a topic outside the
# principal's produce globs; rejects_limited: rejected frames not written to the DLQ one by one past
# server.tcp.max_rejects_per_s, counted here)
LIMITS = ("rate_limited", "too_many_topics", "auth", "rejects_limited", "forbidden")
# Connectors (eventstream/connectors): publishes that failed, undecodable or poison messages
CONNECTORS = ("connector",)
OTHER = "other"

REASONS: tuple[str, ...] = OVERLOAD + PROCESSING + FLOWS + FRAME + LIMITS + CONNECTORS + (OTHER,)
_KNOWN = frozenset(REASONS)

# decoder/framing messages without a category prefix -> their class (checked with str.startswith)
_MESSAGE_PREFIXES = (
    ("frame length ", "framing"),
    ("batch frame ", "framing"),
    ("batch ", "batch"),
    ("first byte ", "framing"),
    ("datagram ends inside a frame", "framing"),
    ("topic_len ", "topic_len"),
    ("topic is not valid utf-8", "topic_utf8"),
    ("frame kind ", "kind"),
    ("priority ", "priority"),
    ("payload of ", "payload_too_large"),
    ("crc32 mismatch", "crc"),
)


def category(reason: object) -> str:
    """The fixed category of a drop/reject reason (a member of REASONS; "other" if unrecognised).

    Never returns text taken from `reason` beyond a member of the fixed set."""
    if not isinstance(reason, str):
        return OTHER
    text = reason.strip()
    if text in _KNOWN:
        return text
    head = text.split(":", 1)[0].strip()
    if head in _KNOWN:
        return head
    low = text[:64].lower()
    for prefix, cat in _MESSAGE_PREFIXES:
        if low.startswith(prefix):
            return cat
    return OTHER
