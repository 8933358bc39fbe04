"""Dead-letter lines and thread pinning of the servers."""

from __future__ import annotations

import os


from eventstream.core.records import empty, record_dtype
from eventstream.core.topics import TopicTable
from eventstream.ingest.admission import Admission, Rejection, dead_letter_lines
from ingest_helpers import wait_until


def test_dead_letter_lines_for_records_and_rejections():
    topics = TopicTable()
    recs = empty(2, record_dtype(16))
    recs["event_id"] = [7, 0]
    recs["topic_id"] = [topics.intern("orders"), topics.intern("logs")]
    recs["priority"] = [1, 0]
    rej = Rejection(conn_id=3, index=9, event_id=11, topic="x", priority=2, reason="crc32 mismatch")
    assert dead_letter_lines(recs, "backpressure", [rej], topics.names) == [
        "id=7 topic=orders priority=1 reason=backpressure",
        "id=0 topic=logs priority=0 reason=backpressure",
        "id=11 topic=x priority=2 reason=crc32 mismatch",
    ]


def test_acceptor_and_readers_pin_themselves(tcp_server):
    cpu = sorted(os.sched_getaffinity(0))[-1]
    srv = tcp_server(readers=2, cpus=[cpu], reader_cpus=[cpu])
    threads = [srv._acceptor, *srv._readers]
    wait_until(lambda: all(t.native_id for t in threads), what="threads started")
    wait_until(lambda: all(os.sched_getaffinity(t.native_id) == {cpu} for t in threads), what="threads pinned")
