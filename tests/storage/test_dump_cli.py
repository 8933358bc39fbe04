"""`eventstream dump` against a real log file."""

from __future__ import annotations

import json

import pytest

from eventstream.cli.main import main
from eventstream.core import records as rec
from eventstream.storage import EventLog


@pytest.fixture
def log_dir(tmp_path, topics, make_batch):
    d = tmp_path / "data"
    with EventLog(d / "events.bin", dtype=rec.EVENT_DTYPE, topics=topics, flusher=False) as log:
        log.append(make_batch(topics, 60))
    return d


def test_jsonl_output_with_filters(log_dir, capsys):
    assert main(["dump", str(log_dir / "events.bin"), "--topic", "orders.*", "--priority", "CRITICAL,high"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 16
    assert {x["priority_name"] for x in lines} == {"CRITICAL", "HIGH"}
    assert all(x["topic"].startswith("orders.") for x in lines)
    first = lines[0]
    assert first["payload"] == f"payload-{first['seq']}" and first["stored_at"].endswith("Z")


def test_count_with_data_dir_and_time_range(log_dir, capsys):
    assert main(["dump", "--data-dir", str(log_dir), "--count"]) == 0
    assert capsys.readouterr().out.strip() == "60"
    assert main(["dump", "--data-dir", str(log_dir), "--count", "--until", "2000-01-01T00:00:00"]) == 0
    assert capsys.readouterr().out.strip() == "0"
    assert main(["dump", "--data-dir", str(log_dir), "--count", "--since", "946684800"]) == 0
    assert capsys.readouterr().out.strip() == "60"
    assert main(["dump", "--data-dir", str(log_dir), "--count", "--time-field", "producer",
                 "--since", "1700000000.00001", "--until", "1700000000.00002"]) == 0
    assert capsys.readouterr().out.strip() == "10"


def test_table_output_and_limit(log_dir, capsys):
    assert main(["dump", str(log_dir / "events.bin"), "--format", "table", "--limit", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["stored_at", "seq", "event_id", "prio", "topic"]
    assert len(out) == 4 and "payload-2" in out[3]


def test_missing_file_and_bad_filters_are_clear(tmp_path, log_dir, capsys):
    assert main(["dump", str(tmp_path / "nope.bin")]) == 1
    assert "no such event log" in capsys.readouterr().err
    assert main(["dump", str(log_dir / "events.bin"), "--priority", "URGENT"]) == 2
    assert "allowed: 0-4 or BATCH" in capsys.readouterr().err
    assert main(["dump", str(log_dir / "events.bin"), "--since", "yesterday"]) == 2
    assert "--since 'yesterday' is not allowed" in capsys.readouterr().err


def test_torn_tail_is_reported_not_fatal(log_dir, capsys):
    path = log_dir / "events.bin"
    with open(path, "ab") as f:
        f.write(b"\x5a\x10")  # half an entry header
    assert main(["dump", str(path), "--count"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "60"
    assert "torn entry header" in captured.err
