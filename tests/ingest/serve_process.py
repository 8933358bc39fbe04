"""A real `eventstream serve` child process on ephemeral ports, for ingest tests that need the whole
service (exit codes, /healthz, metrics, the store). Optionally with a fault injected into the child
(`inject_topic`): interning that topic raises, which kills whichever ingest thread decodes it. That
is the one way to kill a worker thread of a real process on purpose; everything else is unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_INJECT = """
import sys
from eventstream.core import topics
_intern = topics.TopicTable.intern
def intern(self, name, _bad=sys.argv.pop(1).encode()):
    if (name.encode() if isinstance(name, str) else bytes(name)) == _bad:
        raise RuntimeError("injected fault: interning " + _bad.decode())
    return _intern(self, name)
topics.TopicTable.intern = intern
from eventstream.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


class ServeProcess:
    def __init__(self, tmp_path: Path, *sets: str, inject_topic: str | None = None, name: str = "serve"):
        self.data = tmp_path / f"{name}-data"
        self.log_path = tmp_path / f"{name}.log"
        ready = tmp_path / f"{name}-ready-{time.monotonic_ns()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTREAM_")}
        env.update(PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1")
        head = [sys.executable, "-X", "gil=0"]
        head += ["-c", _INJECT, inject_topic] if inject_topic else ["-m", "eventstream"]
        args = ["serve", "--port", "0", "--udp-port", "0", "--metrics-port", "0", "--subscribe-port", "0", "--data-dir", str(self.data),
                "--ready-file", str(ready), "--set", "storage.fsync=none", "--set", "logging.format=json"]
        for s in sets:
            args += ["--set", s]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(head + args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=tmp_path)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode} before ready:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"serve not ready within 60 s:\n{self.log_text()}")
            time.sleep(0.02)
        self.tcp_port, self.udp_port, self.metrics_port, self.subscribe_port = map(int, ready.read_text().split())
        self.tcp = ("127.0.0.1", self.tcp_port)
        self.subscribe = ("127.0.0.1", self.subscribe_port)
        self.udp = ("127.0.0.1", self.udp_port)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        """The value of an unlabelled series `name` on /metrics."""
        _status, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not on /metrics")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(30)
