"""Service.stop while a processor is still inside its handler past the stop timeout.

Found by the stress runner: a full-scale mixed-load run crashed with SIGSEGV while the main thread was
in Service.stop -> bus.close -> arena free and two transactional workers were still handling a batch
(their records are views into ring memory). stop() used to free the rings even when the manager
reported that a worker did not finish. The child process below reproduces it deterministically: a
handler that holds its batch until after stop() returned, then reads it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import sys, threading, time
    sys.path.insert(0, {stress!r})
    from stress_helpers import service_config
    from eventstream.client import TcpClient
    from eventstream.service import Service

    entered, release, done = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def stuck(batch):
        entered.set()
        release.wait(30)
        seen.append((len(batch), int(batch.records["payload_len"].sum())))  # reads ring memory after stop()
        done.set()

    # ACK mode `accepted`: the events are ACKed while the handler holds them
    svc = Service(service_config({data!r}, **{{"server.ack": "accepted"}}), handlers={{"transactional": stuck}}).start()
    with TcpClient(*svc.tcp.address, version=2, timeout=30) as c:
        for i in range(100):
            c.send("busy", b"x" * 64, priority=2, event_id=i + 1)
        assert c.wait_acked(30)
    assert entered.wait(30), "handler never called"
    svc.stop(timeout=0.5)  # the worker is still inside the handler
    # allocate and touch memory so a freed ring would be reused/unmapped
    junk = [bytearray(1 << 20) for _ in range(64)]
    release.set()
    assert done.wait(30), "handler did not finish"
    print("ok", seen)
""")


def test_stop_does_not_free_rings_under_a_running_worker(tmp_path, tally):
    code = CHILD.format(stress=str(Path(__file__).resolve().parent), data=str(tmp_path / "data"))
    env = dict(os.environ, PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1")
    out = subprocess.run([sys.executable, "-X", "gil=0", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"child exited {out.returncode} (-11 = SIGSEGV):\n{out.stderr[-3000:]}"
    # the batch the handler held (its size depends on how the client's sends were read) still reads
    # 64 bytes of payload per event after stop(): its ring memory was not freed under it
    m = re.search(r"^ok \[\((\d+), (\d+)\)\]$", out.stdout, re.M)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) == 64 * int(m.group(1)), out.stdout[-2000:]
    tally.add(moved=100, lost=0)
