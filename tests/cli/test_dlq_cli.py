"""`eventstream dlq list` and `eventstream dlq replay`: real DLQ files, a real engine (Service on
ephemeral ports) to fill the DLQ and to replay into, and `eventstream dump` to check what was stored."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eventstream.cli.main import main
from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.core import records as rec
from eventstream.core.topics import TopicTable
from eventstream.engine.dlq import DeadLetterLog
from eventstream.engine.dlq_reader import read_dlq
from eventstream.protocol.frames import KIND_NACK, encode_v2, split_control_frames
from eventstream.service import Service
from eventstream.storage import EventLogReader

EVIL_TOPIC = 'evil"\n\x1b[31m} {"id":1'


@pytest.fixture
def dlq_dir(tmp_path):
    """A data dir whose DLQ holds 6 events with payload, 1 undecodable frame and 1 old text line."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dlq_log.txt").write_text(
        "[2026-01-31T12:00:00.123Z] DROPPED: id=42 topic=orders.old priority=3 reason=queue_full: legacy\n")
    topics = TopicTable()
    b = rec.empty(6)
    b["event_id"] = [101, 102, 103, 0, 105, 106]
    b["seq"] = [1, 2, 3, 4, 5, 6]
    b["priority"] = [2, 2, 4, 3, 0, 1]
    names = ["orders.new", "orders.paid", "metrics.cpu", "orders.new", EVIL_TOPIC, "orders.new"]
    b["topic_id"] = [topics.intern(t) for t in names]
    for i in range(6):
        rec.set_payload(b[i:i + 1][0], b"payload-%d\x00\xff" % i)
    with DeadLetterLog(data / "dlq_log.txt") as dlq:
        dlq.write_each(b[:3], ["retries_exhausted: RuntimeError: no", "retries_exhausted: KeyError: 'x'",
                               "handler_error: ValueError: bad\x1b[2J"], topics)
        dlq.write(b[3:], "overflow: realtime", topics)
        dlq.write_line(7, "orders.new", 2, "bad_frame: crc mismatch")
    return data


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one command (output from earlier steps, e.g. logs, dropped)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_table_shows_every_entry_escaped(dlq_dir, capsys):
    rc, out, err = run_cli(capsys, "dlq", "list", "--data-dir", str(dlq_dir))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ts", "category", "id", "topic", "priority", "bytes", "reason"]
    assert len(lines) == 1 + 8
    assert "\x1b" not in out  # topic and reason text cannot drive the terminal
    evil = next(x for x in lines if "evil" in x)
    assert "evil\"\\n\\x1b[31m} {\"id" in evil and "BATCH" in evil and " 11 " in evil
    assert "ValueError: bad\\x1b[2J" in out
    old = lines[1].split()
    assert old[1:5] == ["queue_full", "42", "orders.old", "HIGH"] and old[5] == "-"
    frame = lines[-1].split()
    assert frame[1:6] == ["bad_frame", "7", "orders.new", "MEDIUM", "-"]
    assert lines[5].split()[2] == "4"  # event_id 0: the sequence number is the id


def test_list_filters_json_and_count(dlq_dir, capsys):
    d = str(dlq_dir)
    rc, out, _ = run_cli(capsys, "dlq", "list", "--data-dir", d, "--category", "retries_exhausted", "--json")
    objs = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and [o["id"] for o in objs] == [101, 102]
    assert base64.b64decode(objs[0]["payload_b64"]) == b"payload-0\x00\xff" and objs[0]["payload_len"] == 11
    assert list(objs[0])[:4] == ["ts", "reason", "category", "id"]
    rc, out, _ = run_cli(capsys, "dlq", "list", "--data-dir", d, "--reason", "*Error: *", "--json")
    assert [json.loads(x)["id"] for x in out.splitlines()] == [101, 102, 103]
    rc, out, _ = run_cli(capsys, "dlq", "list", "--data-dir", d, "--topic", "orders.*", "--count")
    assert rc == 0 and out == "6\n"  # old line, 3 records, the undecodable frame
    rc, out, _ = run_cli(capsys, "dlq", "list", "--file", str(dlq_dir / "dlq_log.txt"), "--category",
                         "overflow,queue_full", "--topic", "orders.*", "--json")
    objs = [json.loads(x) for x in out.splitlines()]
    assert [(o["id"], o["payload_b64"] is None) for o in objs] == [(42, True), (4, False), (106, False)]
    rc, out, _ = run_cli(capsys, "dlq", "list", "--data-dir", d, "--topic", "evil*", "--json")
    (o,) = [json.loads(x) for x in out.splitlines()]
    assert o["topic"] == EVIL_TOPIC and "\x1b" not in out and out.count("\n") == 1
    rc, out, err = run_cli(capsys, "dlq", "list", "--data-dir", d, "--category", "handler_eror", "--count")
    assert rc == 0 and out == "0\n"
    assert "no entry matched the filters; categories in this DLQ: overflow (3), retries_exhausted (2)" in err


def test_list_reads_segments_and_reports_damage(tmp_path, capsys):
    topics = TopicTable()
    path = tmp_path / "dlq.jsonl"
    with DeadLetterLog(path, max_bytes=600, max_segments=100) as dlq:
        for k in range(10):
            b = rec.empty(1)
            b["event_id"] = k + 1
            b["topic_id"] = topics.intern("t")
            dlq.write(b, "x", topics)
    assert (tmp_path / "dlq.jsonl.1").exists()
    with open(path, "a") as f:
        f.write("not json\n")
    rc, out, err = run_cli(capsys, "dlq", "list", "--file", str(path), "--json")
    assert rc == 0
    assert [json.loads(x)["id"] for x in out.splitlines()] == list(range(1, 11))
    assert "warning: skipped a damaged line:" in err and "dlq.jsonl:" in err and "not a DLQ line" in err


def test_usage_errors_name_the_problem_and_exit_2(dlq_dir, tmp_path, capsys):
    d = str(dlq_dir)
    rc, _, err = run_cli(capsys, "dlq")
    assert rc == 2 and "an action is required; allowed: list, replay" in err
    rc, _, err = run_cli(capsys, "dlq", "list", "--data-dir", d, "--file", "x")
    assert rc == 2 and "together are not allowed; allowed: one of them" in err
    rc, _, err = run_cli(capsys, "dlq", "list", "--data-dir", d, "--reason", "x*", "--category", "x")
    assert rc == 2 and "--reason 'x*' and --category 'x' together are not allowed" in err
    rc, _, err = run_cli(capsys, "dlq", "replay", "--data-dir", d, "--category", " , ")
    assert rc == 2 and "--category ' , ' is not allowed; allowed: a category name" in err
    rc, _, err = run_cli(capsys, "dlq", "replay", "--data-dir", d, "--port", "0")
    assert rc == 2 and "--port 0 is not allowed; allowed: 1..65535" in err
    rc, _, err = run_cli(capsys, "dlq", "replay", "--data-dir", d, "--max-frame-bytes", "63")
    assert rc == 2 and "--max-frame-bytes 63 is not allowed; allowed: 64..67108864" in err
    rc, _, err = run_cli(capsys, "dlq", "list", "--data-dir", d, "--set", "storage.nope=1")
    assert rc == 2 and "config error" in err
    with pytest.raises(SystemExit) as exc:
        main(["dlq", "list", "--bogus"])
    assert exc.value.code == 2
    rc, _, err = run_cli(capsys, "dlq", "list", "--data-dir", str(tmp_path / "empty"))
    assert rc == 1 and "no such DLQ file" in err and "allowed: --file" in err


def test_replay_dry_run_and_unreachable_server(dlq_dir, capsys):
    rc, out, _ = run_cli(capsys, "dlq", "replay", "--data-dir", str(dlq_dir), "--dry-run")
    assert rc == 0 and out.strip() == "dry run: would send 6, skipped 2 (no payload: 2, not encodable: 0)"
    rc, out, _ = run_cli(capsys, "dlq", "replay", "--data-dir", str(dlq_dir), "--dry-run", "--topic", "metrics.*")
    assert out.strip() == "dry run: would send 1, skipped 0 (no payload: 0, not encodable: 0)"
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound then closed, never listening: connections are refused
    rc, out, err = run_cli(capsys, "dlq", "replay", "--data-dir", str(dlq_dir), "--port", str(port), "--timeout", "5")
    assert rc == 1 and f"cannot replay to 127.0.0.1:{port}" in err and out == ""


# ------------------------------------------------------------------------------------ a real engine
def engine_cfg(data: Path, **extra):
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
            "records.payload_bytes": 64, "processors.transactional.retry_backoff_ms": 1.0,
            "processors.transactional.max_retries": 1}
    over.update(extra)
    return load_config(environ={}, overrides=over)


def refuse_bad(batch):
    names = batch.topic_names()
    if any(t.startswith("bad.") for t in names):
        raise RuntimeError(f"refused {len(names)} events")


def send_undecodable_frame(port: int) -> None:
    """A v2 frame whose crc does not match: the engine NACKs it and dead-letters it without payload."""
    frame = bytearray(encode_v2("bad.frame", b"zz", 2, 999, 0))
    frame[-1] ^= 0xFF
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(frame)
        buf = bytearray()
        while not any(k == KIND_NACK for k, _, _ in split_control_frames(buf)):
            data = s.recv(4096)
            assert data, "connection closed before the NACK"
            buf += data


def test_replay_re_sends_whole_events_into_a_running_engine(tmp_path, capsys):
    data = tmp_path / "data"
    rng = np.random.default_rng(5)
    events = [  # topic, payload, priority, event_id (0 = none: the engine keeps 0)
        ("bad.tx", b"", 2, 11),
        ("bad.tx", b"\x00", 2, 12),
        ("bad.tx", bytes(range(256))[-64:], 2, 0),
        ("bad.rt", b"\xff" * 64, 4, 14),
        ("bad.rt", b"\x00" + rng.integers(0, 256, 30, dtype=np.uint8).tobytes() + b"\xff", 3, 15),
    ]
    # run 1: handlers refuse every bad.* event, so each ends in the DLQ with its payload
    with Service(engine_cfg(data), handlers={"realtime": refuse_bad, "transactional": refuse_bad}) as svc:
        port = svc.tcp.address[1]
        with TcpClient("127.0.0.1", port, version=2, timeout=30) as c:
            for topic, payload, prio, eid in events:
                c.send(topic, payload, priority=prio, event_id=eid)
            c.send("good", b"kept", priority=2, event_id=20)
            assert c.wait_acked(30)
        send_undecodable_frame(port)
    dlq = list(read_dlq(data / "dlq_log.txt"))
    with_payload = sorted((e.topic, e.payload, e.priority, e.event_id) for e in dlq if e.payload is not None)
    assert with_payload == sorted(events)
    assert {e.category for e in dlq if e.payload is not None} == {"retries_exhausted", "handler_error"}
    assert [(e.id, e.topic, e.priority) for e in dlq if e.payload is None] == [(999, "bad.frame", 2)]
    assert [e.reason for e in dlq if e.payload is None][0].startswith("crc32 mismatch")
    assert {e.attempts for e in dlq if e.category == "retries_exhausted"} == {2}  # 1 try + max_retries
    assert EventLogReader(data / "events.bin").read().records["event_id"].tolist() == [20]

    rc, out, _ = run_cli(capsys, "dlq", "list", "--data-dir", str(data), "--category", "retries_exhausted", "--count")
    assert rc == 0 and out == "3\n"

    # run 2: the handlers are fixed; replay the DLQ of the same data dir into the running engine
    with Service(engine_cfg(data)) as svc:
        port = svc.tcp.address[1]
        rc, out, err = run_cli(capsys, "dlq", "replay", "--data-dir", str(data), "--port", str(port),
                               "--topic", "bad.*", "--timeout", "30")
        assert rc == 0, err
        summary = [x for x in out.splitlines() if x.startswith("sent ")]  # the engine logs to stdout too
        assert summary == ["sent 5, acked 5, nacked 0, skipped 1 (no payload: 1, not encodable: 0)"]
    r = subprocess.run([sys.executable, "-m", "eventstream", "dump", "--data-dir", str(data), "--topic", "bad.*"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHON_GIL="0"))
    assert r.returncode == 0, r.stderr
    stored = [json.loads(x) for x in r.stdout.splitlines()]

    def payload(d):
        return d["payload"].encode() if "payload" in d else base64.b64decode(d["payload_b64"])

    assert sorted((d["topic"], payload(d), d["priority"], d["event_id"]) for d in stored) == sorted(events)
    assert len(list(read_dlq(data / "dlq_log.txt"))) == len(dlq)  # nothing replayed was dead-lettered again
