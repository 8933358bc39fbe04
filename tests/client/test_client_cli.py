"""`eventstream send` and `eventstream load` against real servers."""

from __future__ import annotations

import io
import json
import re

from eventstream.cli.main import main


def json_line(out: str) -> dict:
    """The command's JSON object. The test's server logs to the same stdout from its own threads, and a
    log line's text and its newline are two writes, so the object may follow a log line on one line."""
    found = re.findall(r'\{"sent": .*\}', out)
    assert found, f"no JSON summary in the output: {out!r}"
    return json.loads(found[-1])


def test_send_one_event_from_flags(servers, capsys):
    tcp, _ = servers
    srv = tcp()
    rc = main(["send", "--port", str(srv.address[1]), "--topic", "orders", "--payload", "hello",
               "--priority", "4", "--event-id", "77", "--json"])
    out = json_line(capsys.readouterr().out)
    assert rc == 0 and out == {"sent": 1, "acked": 1, "nacked": 0, "nacks": []}
    rec = srv.test_sink.records()
    assert rec["event_id"].tolist() == [77] and rec["priority"].tolist() == [4]
    assert srv.test_sink.payloads() == [b"hello"]


def test_send_json_lines_from_stdin(servers, capsys, monkeypatch):
    tcp, _ = servers
    srv = tcp()
    lines = ['{"topic": "a", "payload": "1"}', "", '{"topic": "b", "payload_hex": "00ff", "priority": 0}']
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["send", "--port", str(srv.address[1])]) == 0
    assert "sent 2, acked 2, nacked 0" in capsys.readouterr().out
    assert sorted(srv.test_sink.payloads()) == [b"\x00\xff", b"1"]  # two queues (priorities 2 and 0)


def test_send_bad_json_line_is_a_usage_error(servers, capsys, monkeypatch):
    tcp, _ = servers
    srv = tcp()
    monkeypatch.setattr("sys.stdin", io.StringIO('{"payload": "no topic"}\n'))
    assert main(["send", "--port", str(srv.address[1])]) == 2
    assert "stdin line 1" in capsys.readouterr().err


def test_load_tcp_json(servers, capsys):
    tcp, _ = servers
    srv = tcp()
    rc = main(["load", "--port", str(srv.address[1]), "-n", "3000", "-c", "3", "--priority-mix", "0:1,2:2,4:1",
               "--payload-bytes", "64", "--json"])
    out = json_line(capsys.readouterr().out)
    assert rc == 0
    assert out["sent"] == 3000 and out["acked"] == 3000 and out["nacked"] == 0
    for key in ("events_per_s", "ack_p50_us", "ack_p99_us", "ack_p999_us"):
        assert out[key] > 0
    recs = srv.test_sink.records()
    assert len(recs) == 3000 and set(recs["priority"].tolist()) == {0, 2, 4}
    assert (recs["payload_len"] == 64).all()


def test_load_udp_and_v1(servers, capsys):
    tcp, udp = servers
    u = udp()
    assert main(["load", "--udp", "--port", str(u.address[1]), "-n", "500", "--json"]) == 0
    out = json_line(capsys.readouterr().out)
    assert out["sent"] == 500 and out["acked"] == 0 and out["ack_p50_us"] is None
    assert u.test_sink.wait_for(500, 10)
    t = tcp()
    assert main(["load", "--protocol", "1", "--port", str(t.address[1]), "-n", "500", "--rate", "5000",
                 "--no-progress"]) == 0
    assert "events/s" in capsys.readouterr().out
    assert t.test_sink.wait_for(500, 10)


def test_load_rejects_a_bad_priority_mix(capsys):
    assert main(["load", "--priority-mix", "9:1"]) == 2
    assert "--priority-mix" in capsys.readouterr().err
