"""Issue 22 item 6: retention and consumer groups. With storage.retention_respects_groups (the default)
a closed events.bin segment is kept until every named group has committed past it, and the group then
reads every event it had not committed; with it off the segment goes and the loss is counted
(log_segments_deleted_unread_total) instead of being silent. Real service, real sockets, real files."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from subscribe_helpers import send, sub_port

from eventstream.client import subscribe
from eventstream.storage import format as fmt
from eventstream.storage.segments import segment_paths

T = 30.0


def take(sub, n, timeout=T):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        ev = sub.poll(max(0.0, deadline - time.monotonic()))
        assert ev is not None, f"got {len(out)} of {n} events within {timeout} s"
        out.append(ev)
    return out


def segments(svc) -> int:
    return len(list(svc.engine.event_log.path.parent.glob(svc.engine.event_log.path.name + ".*")))


def fill(svc, n, start_id):
    for k in range(0, n, 100):  # one stored batch per send: rotations happen between them
        send(svc, [("ret.t", b"%d" % (start_id + i)) for i in range(k, min(n, k + 100))], start_id=start_id + k)


def small_segments(**extra):
    """Segments of ~8 KB: the writer (events.bin version 2) stores a send of 100 small events as one
    batch entry of ~5.5 KB, so a segment closes every second send (1000 events: ~7 segments)."""
    return {"storage.events_max_bytes": 8192, "storage.events_max_segments": 1, "metrics.enabled": True,
            "metrics.port": 0, **extra}


def metric(svc, name) -> float:
    with urllib.request.urlopen(svc.exporter.url, timeout=30) as r:
        text = r.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_segments_a_group_has_not_committed_are_kept_until_it_has(service):
    svc = service(**small_segments())
    fill(svc, 20, 1)
    with subscribe("127.0.0.1", sub_port(svc), "ret.*", group="audit", credit=20) as s:
        take(s, 20)
        assert s.commit() == 20
    fill(svc, 1000, 100)
    head = svc.engine.event_log.path.read_bytes()[: fmt.FILE_HEADER_BYTES]
    assert fmt.FILE_HEADER.unpack(head)[1] == fmt.FILE_VERSION == 2  # the writer the service runs: batch entries
    st = svc.engine.event_log.statistics()
    assert st["segments"] >= 4, st  # it rotated several times ...
    assert segments(svc) == st["segments"]  # ... and kept every closed segment for the group
    assert st["segments_kept_unread"] >= 2 and st["segments_deleted_unread"] == 0
    assert metric(svc, "log_segments_kept_unread") == st["segments_kept_unread"]
    with subscribe("127.0.0.1", sub_port(svc), "ret.*", group="audit", credit=2000) as s:
        got = take(s, 1000)
        assert [e.offset for e in got] == list(range(20, 1020))  # nothing lost
        assert s.commit() == 1020
    fill(svc, 300, 5000)  # the next rotations may delete what the group committed
    st = svc.engine.event_log.statistics()
    assert st["segments_deleted"] >= 4 and st["segments_deleted_unread"] == 0
    # what is left: the newest closed segment, plus those holding events stored after the commit
    assert segments(svc) == 1 + st["segments_kept_unread"]
    kept = segment_paths(svc.engine.event_log.path)[:-1]  # all but the newest closed one: kept for the group
    assert all(svc.subscribe.unread_by(p) == ["audit"] for _, p in kept)
    assert metric(svc, "log_segments_deleted_unread_total") == 0


def test_without_respect_for_groups_unread_segments_go_and_are_counted(service):
    svc = service(**small_segments(**{"storage.retention_respects_groups": False}))
    fill(svc, 20, 1)
    with subscribe("127.0.0.1", sub_port(svc), "ret.*", group="audit", credit=20) as s:
        take(s, 20)
        assert s.commit() == 20
    fill(svc, 1000, 100)
    st = svc.engine.event_log.statistics()
    assert segments(svc) == 1
    assert st["segments_deleted_unread"] >= 3 and st["segments_deleted_unread"] == st["segments_deleted"]
    assert metric(svc, "log_segments_deleted_unread_total") == st["segments_deleted_unread"]


def test_without_named_groups_retention_is_unchanged(service):
    svc = service(**small_segments())
    fill(svc, 1000, 1)
    st = svc.engine.event_log.statistics()
    assert segments(svc) == 1 and st["segments_deleted"] >= 3 and st["segments_deleted_unread"] == 0
