"""`eventstream tail` (in-process and as a process) and the asyncio clients, against a real service."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from subscribe_helpers import send, sub_port

from eventstream.cli.main import main
from eventstream.client import AsyncSender, SubscribeError, aio_subscribe, subscribe


def out_lines(capsys) -> list[dict]:
    """The JSON lines tail printed (the in-process service's log lines share stdout)."""
    return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]


def test_tail_prints_stored_events_as_json_lines(service, capsys):
    svc = service()
    send(svc, [("orders.eu", b"o1"), ("users.x", b"u1"), ("orders.us", b"\xff\x00")])
    assert main(["tail", "--port", str(sub_port(svc)), "orders.*"]) == 0
    lines = out_lines(capsys)
    assert [x["topic"] for x in lines] == ["orders.eu", "orders.us"] or \
        sorted(x["topic"] for x in lines) == ["orders.eu", "orders.us"]
    by_topic = {x["topic"]: x for x in lines}
    assert by_topic["orders.eu"]["payload"] == "o1" and by_topic["orders.us"]["payload_b64"] == "/wA="
    assert all(x["stored_at"].endswith("Z") and x["offset"] in (0, 1, 2) for x in lines)
    assert main(["tail", "--port", str(sub_port(svc)), "--from", "2", "--format", "table", "*"]) == 0
    out = [x for x in capsys.readouterr().out.splitlines() if x.split()[0] in ("offset", "2")]
    assert out[0].split()[:2] == ["offset", "stored_at"] and len(out) == 2


def test_tail_with_a_group_commits_what_it_printed(service, capsys):
    svc = service()
    send(svc, [("g", b"%d" % i) for i in range(10)])
    port = str(sub_port(svc))
    assert main(["tail", "--port", port, "--group", "cli", "--limit", "4", "g"]) == 0
    assert [x["offset"] for x in out_lines(capsys)] == [0, 1, 2, 3]
    assert main(["tail", "--port", port, "--group", "cli", "g"]) == 0
    assert [x["offset"] for x in out_lines(capsys)] == list(range(4, 10))


@pytest.mark.parametrize("argv, expect", [
    (["tail", "--from", "yesterday", "*"], "start 'yesterday' is not allowed; allowed: earliest, latest"),
    (["tail", "--limit", "-1", "*"], "--limit -1 is not allowed"),
    (["tail", "--group", "a b", "*"], "--group 'a b' is not allowed; allowed:"),
    (["tail", "--credit", "0", "*"], "--credit 0 is not allowed"),
])
def test_tail_argument_errors_name_what_is_allowed(argv, expect, capsys):
    assert main(argv) == 2
    assert expect in capsys.readouterr().err


def test_tail_without_a_server_says_so(capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert main(["tail", "--port", str(port), "*"]) == 1
    assert "server.subscribe.enabled" in capsys.readouterr().err


def test_tail_follow_as_a_process(service):
    svc = service()
    send(svc, [("live.x", b"a"), ("other", b"no")])
    proc = subprocess.Popen([sys.executable, "-m", "eventstream", "tail", "-f", "--from", "earliest", "--port",
                             str(sub_port(svc)), "--limit", "3", "live.*"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHON_GIL="0"))
    try:
        send(svc, [("live.y", b"b"), ("other", b"no"), ("live.x", b"c")], start_id=10)  # before or after it joins
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert [json.loads(x)["payload"] for x in out.decode().splitlines()] == ["a", "b", "c"]


def test_asyncio_send_and_subscribe(service):
    svc = service()

    async def run():
        sender = await AsyncSender.connect("127.0.0.1", svc.tcp.address[1])
        for i in range(20):
            await sender.send("aio.t", b"%d" % i, event_id=i + 1)
        await sender.flush(30)
        assert sender.acked == 20 and not sender.nacks
        await sender.close()
        sub = await aio_subscribe("127.0.0.1", sub_port(svc), "aio.*", group="ag", credit=8, follow=False)
        got = [ev async for ev in sub]
        assert await sub.commit() == 20
        await sub.close()
        return got

    got = asyncio.run(asyncio.wait_for(run(), 30))
    assert [e.payload for e in got] == [b"%d" % i for i in range(20)]
    assert [e.offset for e in got] == list(range(20))


def test_subscribe_error_for_commit_without_group(service):
    svc = service()
    with subscribe("127.0.0.1", sub_port(svc), "*") as s, pytest.raises(SubscribeError, match="needs a group"):
        s.commit()
