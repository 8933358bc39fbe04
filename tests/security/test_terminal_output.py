"""Issue 22 item 6: the table forms of `dump` and `tail` print what a client stored without letting it
act on the terminal (escape sequences, carriage returns, fake lines, bidi reordering). Events go in
over a real TCP socket, `tail` reads them over the real subscribe port."""

from __future__ import annotations

import re
import subprocess
import sys

from eventstream.cli.dump import escape_text
from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.service import Service

HOSTILE = [
    ("sec.\x1b[2Jtopic", "\x1b]0;pwned\x07title"),  # clear screen in the topic, window title in the payload
    ("sec.plain", "line1\r\nFAKE 2026-01-01T00:00:00Z  0  0 CRITICAL admin  ok"),
    ("sec.plain", "\u009b31mred\u202eevil\u2066x\u2028y\\z\x7f"),
]
# anything a terminal acts on; a table line may hold none of it
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def test_escape_text_names_every_control_and_keeps_text():
    assert escape_text("héllo wörld ✓") == "héllo wörld ✓"
    assert escape_text("a\nb\rc\td\\e") == "a\\nb\\rc\\td\\\\e"
    assert escape_text("\x1b[31m\x00\x7f\u009b") == "\\x1b[31m\\x00\\x7f\\x9b"
    assert escape_text("\u202eabc\u2028") == "\\u202eabc\\u2028"


def stored(tmp_path):
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.enabled": False, "metrics.enabled": False, "server.subscribe.port": 0,
        "storage.data_dir": str(tmp_path / "data"), "records.payload_bytes": 256})
    svc = Service(cfg).start()
    with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30) as c:
        for i, (topic, payload) in enumerate(HOSTILE):
            c.send(topic, payload.encode(), event_id=i + 1)
        assert c.wait_acked(30) and c.nacked == 0
    return svc


def check_table(out: str, header: int) -> None:
    lines = out.split("\n")
    assert lines[-1] == ""  # ends with a newline, and nothing else broke a line
    lines = lines[:-1]
    assert len(lines) == header + len(HOSTILE), lines
    for line in lines:
        assert not UNSAFE.search(line), f"unescaped control in {line!r}"
    text = "".join(lines)
    assert "\\x1b[2J" in text and "\\x1b]0;pwned\\x07" in text
    assert "line1\\r\\nFAKE" in text
    assert "\\x9b31mred\\u202eevil" in text


def cli(*args) -> str:
    """Run the CLI as a process (its stdout alone, as a terminal would get it)."""
    r = subprocess.run([sys.executable, "-m", "eventstream", *args], capture_output=True, timeout=60,
                       env={"PYTHON_GIL": "0", "EVENTSTREAM_NO_REEXEC": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode("utf-8")


def test_dump_table_escapes_what_clients_stored(tmp_path):
    svc = stored(tmp_path)
    svc.stop()
    check_table(cli("dump", "--data-dir", str(tmp_path / "data"), "--format", "table"), header=1)


def test_tail_table_escapes_what_clients_stored(tmp_path):
    svc = stored(tmp_path)
    try:
        out = cli("tail", "--port", str(svc.subscribe.address[1]), "--format", "table", "sec.*")
    finally:
        svc.stop()
    check_table(out, header=1)
