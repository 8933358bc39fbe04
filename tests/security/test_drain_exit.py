"""Issue 22 item 6: a drain that cannot finish is not reported as a clean stop. A real `eventstream serve`
whose transactional handler never returns gets SIGTERM: it exits 1 after server.drain_timeout_s and
says why; the same server with a handler that returns exits 0."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from eventstream.client import TcpClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ingest"))
from serve_process import ServeProcess  # noqa: E402

HANDLER = '''
import threading
from pathlib import Path

def stuck(batch):
    Path("entered").write_text("x")  # the test waits for this before it stops the server
    threading.Event().wait()  # never returns

def fine(batch):
    Path("entered").write_text("x")
'''


def run_and_stop(tmp_path: Path, handler: str) -> tuple[int, str, float]:
    (tmp_path / "drainhandlers.py").write_text(HANDLER)
    srv = ServeProcess(tmp_path, f"processors.transactional.handler=drainhandlers:{handler}",
                       "server.drain_timeout_s=1", "server.ack=accepted")
    try:
        with TcpClient(*srv.tcp, timeout=30) as c:
            c.send("drain.t", b"x", 2, 1)  # MEDIUM: the transactional tier
            assert c.wait_acked(30)
        entered = tmp_path / "entered"
        deadline = time.monotonic() + 30
        while not entered.exists():
            assert time.monotonic() < deadline, "the handler never got the event:\n" + srv.log_text()
            assert srv.proc.poll() is None, srv.log_text()
            time.sleep(0.02)
        t0 = time.monotonic()
        code = srv.terminate(timeout=60)
        return code, srv.log_text(), time.monotonic() - t0
    finally:
        srv.kill()


def test_a_drain_that_times_out_exits_1_and_says_why(tmp_path):
    code, log, _ = run_and_stop(tmp_path, "stuck")
    assert code == 1, log
    assert "drain_timed_out" in log and "worker_stuck" in log
    assert "server.drain_timeout_s=1" in log  # the stderr line names the key


def test_a_complete_drain_exits_0(tmp_path):
    code, log, _ = run_and_stop(tmp_path, "fine")
    assert code == 0, log
    assert "drain_timed_out" not in log
