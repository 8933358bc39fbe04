"""The GIL guard: library check, CLI re-exec, session check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from eventstream.runtime import gil

FREE_THREADED = gil.is_free_threaded_build()


def run_py(code, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHON_GIL", "EVENTSTREAM_NO_REEXEC")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=60)


def test_this_session_runs_with_the_gil_off_or_explicitly_allowed():
    assert not gil.gil_enabled() or gil.gil_allowed_by_env()


def test_require_gil_off_allows_when_told(monkeypatch):
    monkeypatch.setattr(gil, "gil_enabled", lambda: True)
    gil.require_gil_off(allow_gil=True)
    with pytest.raises(gil.GilEnabledError, match="--allow-gil"):
        gil.require_gil_off(allow_gil=False, what="test engine")


@pytest.mark.skipif(not FREE_THREADED, reason="needs the free-threaded build")
def test_importing_atomics_without_gil0_turns_the_gil_on_and_the_guard_refuses():
    r = run_py(
        "import atomics, sys\n"
        "from eventstream.runtime import gil\n"
        "print(sys._is_gil_enabled())\n"
        "try:\n    gil.require_gil_off()\nexcept gil.GilEnabledError as e:\n    print('REFUSED', e)\n"
    )
    assert r.stdout.splitlines()[0] == "True"
    assert "REFUSED" in r.stdout and "PYTHON_GIL=0" in r.stdout


@pytest.mark.skipif(not FREE_THREADED, reason="needs the free-threaded build")
def test_with_python_gil_0_imports_keep_the_gil_off():
    r = run_py("import eventstream, atomics, numpy, sys; print(sys._is_gil_enabled())", PYTHON_GIL="0")
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.skipif(not FREE_THREADED, reason="needs the free-threaded build")
def test_cli_reexecs_itself_with_gil_off():
    code = ("import sys; sys.argv=['eventstream', 'config', 'check']; "
            "from eventstream.runtime import gil; gil.reexec_without_gil(); print('not reexeced')")
    r = run_py(code)
    # re-executed as `python -X gil=0 -m eventstream config check`, which prints "config ok"
    assert "config ok" in r.stdout and "not reexeced" not in r.stdout, r.stderr


@pytest.mark.skipif(not FREE_THREADED, reason="needs the free-threaded build")
def test_cli_reports_gil_state_after_reexec(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\nfrom eventstream.runtime import gil\ngil.reexec_without_gil()\n"
        "import atomics\nprint(sys._xoptions.get('gil'), sys._is_gil_enabled())\n"
    )
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHON_GIL", "EVENTSTREAM_NO_REEXEC")}
    r = subprocess.run([sys.executable, str(script)], env=e, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "0 False", r.stderr


@pytest.mark.skipif(not FREE_THREADED, reason="needs the free-threaded build")
def test_serve_refuses_with_gil_on_and_exit_code_3():
    e = {k: v for k, v in os.environ.items() if k != "EVENTSTREAM_ALLOW_GIL"}
    e.update(PYTHON_GIL="1", EVENTSTREAM_NO_REEXEC="1")
    r = subprocess.run([sys.executable, "-m", "eventstream", "serve", "--set", "server.tcp.port=0",
                        "--set", "server.udp.port=0", "--set", "metrics.port=0", "--set", "server.subscribe.port=0"],
                       env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert "refuses to run with the GIL enabled" in r.stderr


@pytest.mark.skipif(not FREE_THREADED, reason="needs the free-threaded build")
def test_test_session_refuses_gil_on(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    conftest = os.path.join(os.path.dirname(os.path.dirname(__file__)), "conftest.py")
    (tmp_path / "conftest.py").write_text(open(conftest).read())
    e = {k: v for k, v in os.environ.items() if k != "EVENTSTREAM_ALLOW_GIL"}
    e["PYTHON_GIL"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       env=e, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "EVENTSTREAM_ALLOW_GIL=1" in r.stdout + r.stderr
    e["EVENTSTREAM_ALLOW_GIL"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       env=e, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
