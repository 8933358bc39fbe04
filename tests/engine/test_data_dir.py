"""An unusable storage.data_dir stops `eventstream serve` with exit 2 naming the key (issue #11 item 10).

Tests run as root, where chmod does not stop writes: unwritable directories are taken from /proc and
/sys (they exist but refuse new files) and paths under a regular file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eventstream.config import load_config
from eventstream.errors import StartupError
from eventstream.service import Service

REPO = Path(__file__).resolve().parents[2]


def unwritable_dirs(tmp_path: Path) -> list[str]:
    """Existing directories in which creating a file fails, for this user."""
    out = []
    for d in ("/proc/self", "/sys/kernel"):
        try:
            fd = os.open(os.path.join(d, ".es-probe"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError:
            if os.path.isdir(d):
                out.append(d)
        else:  # writable after all: not a case for this test
            os.close(fd)
            os.unlink(os.path.join(d, ".es-probe"))
    return out


def serve(data_dir: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON_GIL="0", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0", "--metrics-port", "0", "--subscribe-port", "0",
         "--data-dir", data_dir], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "regular-file"
    f.write_text("not a directory\n")
    return f


def test_existing_but_unwritable_data_dir_exits_2_naming_the_key(tmp_path):
    dirs = unwritable_dirs(tmp_path)
    if not dirs:
        pytest.skip("no existing unwritable directory on this machine (/proc/self, /sys/kernel)")
    for d in dirs:
        proc = serve(d, tmp_path)
        assert proc.returncode == 2, (d, proc.stderr[-2000:])
        assert "storage.data_dir" in proc.stderr and d in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("sub", ["", "data", "data/deeper"], ids=["the-file-itself", "under-a-file", "deep-under-a-file"])
def test_data_dir_at_or_under_a_regular_file_exits_2(tmp_path, a_file, sub):
    d = str(a_file / sub) if sub else str(a_file)
    proc = serve(d, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "storage.data_dir" in proc.stderr


def test_service_start_raises_startup_error_and_leaves_no_probe(tmp_path):
    dirs = unwritable_dirs(tmp_path)
    if not dirs:
        pytest.skip("no existing unwritable directory on this machine (/proc/self, /sys/kernel)")
    cfg = load_config(environ={}, overrides={"server.tcp.port": 0, "server.udp.port": 0, "metrics.enabled": False, "server.subscribe.port": 0,
                                             "storage.data_dir": dirs[0]})
    with pytest.raises(StartupError, match=r"storage\.data_dir: cannot write in"):
        Service(cfg).start()
    good = tmp_path / "data"
    cfg = load_config(environ={}, overrides={"server.tcp.port": 0, "server.udp.port": 0, "metrics.enabled": False, "server.subscribe.port": 0,
                                             "storage.data_dir": str(good), "records.payload_bytes": 64})
    with Service(cfg):
        pass
    assert not [p for p in good.iterdir() if p.name.startswith(".write-probe-")]
