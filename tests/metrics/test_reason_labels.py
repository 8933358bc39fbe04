"""Drop-reason labels come from a fixed set: client-chosen text never becomes a metric series.

Hardening issue #11 item 2: reject reasons carry numbers and text from the client's frames, and the
text before the first colon used to be the label value (85,787 series in the field).
"""

from __future__ import annotations

import random
import socket
import struct
import time
import urllib.request
import zlib
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from eventstream.config import load_config
from eventstream.core.topics import TopicTable
from eventstream.metrics import Metrics
from eventstream.metrics.reasons import REASONS, category
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.framing import scan
from eventstream.protocol.frames import KIND_ACK, V1_HEAD, V2_HEAD, V2_MAGIC, encode_v1, encode_v2
from eventstream.service import Service


def reason_labels(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "events_dropped":
            for s in fam.samples:
                if s.name == "events_dropped_total":
                    out[s.labels["reason"]] = s.value
    return out


def attacker_reasons(n: int, seed: int = 11) -> list[str]:
    """n distinct reason texts of the shapes that reach the metrics: decoder messages with the
    client's numbers in them, engine reasons with exception text, and arbitrary client text."""
    rnd = random.Random(seed)
    alphabet = "abcXYZ09 _-.:;,{}=\"'\\\n\té€😀"
    shapes = [
        lambda i: f"frame length {1_048_577 + i} exceeds max_frame_bytes 1048576 (allowed: 4..1048576)",
        lambda i: f"frame length {i} is too short for a v2 header (26 bytes)",
        lambda i: f"first byte {i % 256:#04x} is not a protocol version; allowed: 0x00..0x04 (v1 priority) or 0xe5 (v2 magic) #{i}",
        lambda i: f"payload of {449 + i} bytes exceeds the inline capacity of 448 bytes (records.payload_bytes; allowed: 0..448)",
        lambda i: f"topic_len {256 + i} is not allowed; allowed: 1..255",
        lambda i: f"priority {5 + i} is not allowed; allowed: 0..4",
        lambda i: f"handler_error: ValueError: bad amount {i} for {rnd.random()}",
        lambda i: "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 40))) + f"{i}: tail",
        lambda i: f"topic.{i}.{''.join(rnd.choice(alphabet) for _ in range(8))}",
        lambda i: f"overflow:queue-{i}",
    ]
    out = [shapes[i % len(shapes)](i) for i in range(n)]
    assert len(set(out)) == n
    return out


def test_ten_thousand_distinct_reasons_stay_within_the_fixed_set():
    m = Metrics(process=False)
    reasons = attacker_reasons(10_000)
    for r in reasons:
        m.dropped(r, 1)
    labels = reason_labels(m.render().decode())
    assert set(labels) <= set(REASONS), sorted(set(labels) - set(REASONS))[:5]
    assert sum(labels.values()) == 10_000
    # the recognisable ones are counted under their class, not lumped into "other"
    assert labels["framing"] == 3_000 and labels["payload_too_large"] == 1_000
    assert labels["topic_len"] == labels["priority"] == labels["handler_error"] == labels["overflow"] == 1_000
    assert labels["other"] == 2_000
    assert m.dropped_by_reason() == {k: int(v) for k, v in labels.items() if v}


def test_every_category_is_exported_at_zero_from_the_start():
    labels = reason_labels(Metrics(process=False).render().decode())
    assert labels == {r: 0.0 for r in REASONS}


def test_decoder_messages_map_to_their_error_class():
    """Each FrameError's reason text maps back to its own error_class (the texts carry no prefix)."""
    dec = FrameDecoder(TopicTable(), payload_bytes=8)
    bad_crc = bytearray(encode_v2("t", b"x", 2, 5))
    bad_crc[-1] ^= 1
    frames = [
        V1_HEAD.pack(3, 2, 300),  # topic_len 300
        encode_v2("t", b"", 2, 1, kind=KIND_ACK),  # kind
        V2_HEAD.pack(26 + 1, V2_MAGIC, 1, 9, 0, 2, 0, 1, zlib.crc32(b"t")) + b"t",  # priority 9
        encode_v1("t", b"y" * 9),  # payload too large
        V1_HEAD.pack(3 + 2, 2, 2) + b"\xff\xfe",  # topic not UTF-8
        bytes(bad_crc),  # crc
        V1_HEAD.pack(3 + 1, 2, 5) + b"t",  # topic runs past the frame end: framing (fatal)
    ]
    _records, errors = dec.feed(b"".join(frames))
    assert [e.error_class for e in errors] == ["topic_len", "kind", "priority", "payload_too_large",
                                               "topic_utf8", "crc", "framing"]
    for e in errors:
        assert category(e.reason) == e.error_class, e.reason
    for raw in (struct.pack(">I", 2_000_000) + b"\x00", struct.pack(">I", 5) + b"\x77", struct.pack(">I", 0)):
        _o, _l, _p, fatal = scan(raw, 0, len(raw), 1 << 20)
        assert fatal is not None and category(fatal) == "framing", fatal
    assert category("datagram ends inside a frame (3 bytes left over)") == "framing"
    for engine_reason, cat in (("overflow:batch", "overflow"), ("timeout:transactional", "other"),
                               ("evicted: ingest queue overflow", "other"),  # reasons of ring paths now gone
                               ("backpressure: ingest queue full", "backpressure"), ("paused", "paused"),
                               ("retries_exhausted: KeyError: 'x'", "retries_exhausted"),
                               ("shutdown: stopped without draining", "shutdown"), ("", "other"),
                               ("queue_full", "other")):
        assert category(engine_reason) == cat


def test_service_rejects_with_distinct_numbers_keep_labels_fixed(tmp_path: Path):
    """10,000 frames over a real TCP connection, each with its own topic_len (so its own reason
    text), reach on_reject and the DLQ; the exposition still has only fixed reason labels."""
    n = 10_000
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.enabled": False, "metrics.port": 0, "server.subscribe.port": 0,
        "storage.data_dir": str(tmp_path / "data"), "records.payload_bytes": 64,
        # every reject written one by one, and the connection kept (only rejects past the limit would
        # be summarised in one line and the connection closed: tests/ingest/test_ingest_reject_limit.py)
        "server.tcp.max_rejects_per_s": 1_000_000})
    with Service(cfg) as svc:
        # v1 frames (no NACKs to read back): header only, topic_len 256.. (not allowed, not fatal)
        data = b"".join(V1_HEAD.pack(3, 2, 256 + i) for i in range(n))
        with socket.create_connection(svc.tcp.address, timeout=30) as s:
            s.sendall(data)
            deadline = time.monotonic() + 60
            while svc.metrics.dropped_total() < n:  # a server-side counter: poll it, bounded
                assert time.monotonic() < deadline, f"only {svc.metrics.dropped_total()} of {n} rejects counted"
                time.sleep(0.01)
        text = urllib.request.urlopen(svc.exporter.url, timeout=10).read().decode()
        dlq_counts = svc.engine.dlq.counts()
    labels = reason_labels(text)
    assert set(labels) <= set(REASONS), sorted(set(labels) - set(REASONS))[:5]
    assert labels["topic_len"] == n
    assert sum(dlq_counts.values()) == n  # every reject is still dead-lettered with its full text
