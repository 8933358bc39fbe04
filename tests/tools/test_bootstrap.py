"""tools/bootstrap.sh: interpreter discovery order and its errors (candidates are mocked; no build)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "tools" / "bootstrap.sh"


def fake_python(path: Path, free_threaded: bool) -> Path:
    """A script that behaves like an interpreter: the real one, with Py_GIL_DISABLED as we say."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flag = "1" if free_threaded else "0"
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-c" ]; then exec {sys.executable} -c "import sysconfig; '
        f"sysconfig.get_config_var = lambda k, _g=sysconfig.get_config_var: {flag} if k == 'Py_GIL_DISABLED' else _g(k); "
        f'exec(compile(\'\'\'$2\'\'\', \'-c\', \'exec\'))"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    path.chmod(0o755)
    return path


def run(args, env_extra, tmp_path):
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    env.update(env_extra)
    return subprocess.run(["bash", str(BOOTSTRAP), *args], env=env, capture_output=True, text=True, timeout=60)


def test_env_python_that_is_not_free_threaded_is_refused(tmp_path):
    py = fake_python(tmp_path / "gil" / "python3", free_threaded=False)
    r = run(["--find"], {"EVENTSTREAM_PYTHON": str(py)}, tmp_path)
    assert r.returncode != 0
    assert "is not a free-threaded build" in r.stderr
    assert "Py_GIL_DISABLED" in r.stderr


def test_env_python_that_does_not_exist_is_refused(tmp_path):
    r = run(["--find"], {"EVENTSTREAM_PYTHON": str(tmp_path / "nope")}, tmp_path)
    assert r.returncode != 0
    assert "is not an executable" in r.stderr


def test_env_python_wins_over_path_and_cache(tmp_path):
    env_py = fake_python(tmp_path / "env" / "python3.13t", True)
    fake_python(tmp_path / "bin" / "python3.13t", True)
    fake_python(tmp_path / "cache" / "eventstream" / "cpython-3.13.15t" / "bin" / "python3.13t", True)
    r = run(["--find"], {"EVENTSTREAM_PYTHON": str(env_py)}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(env_py)


def test_path_python313t_comes_before_the_cache(tmp_path):
    on_path = fake_python(tmp_path / "bin" / "python3.13t", True)
    fake_python(tmp_path / "cache" / "eventstream" / "cpython-3.13.15t" / "bin" / "python3.13t", True)
    r = run(["--find"], {}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(on_path)


def test_gil_python313t_on_path_is_skipped_for_the_cache(tmp_path):
    fake_python(tmp_path / "bin" / "python3.13t", False)
    cached = fake_python(tmp_path / "cache" / "eventstream" / "cpython-3.13.15t" / "bin" / "python3.13t", True)
    r = run(["--find"], {}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(cached)


def test_nothing_found_says_how_to_get_one(tmp_path):
    (tmp_path / "bin").mkdir()
    r = run(["--find"], {}, tmp_path)
    assert r.returncode == 1
    assert "no free-threaded python found" in r.stderr


def test_missing_build_dependencies_are_named_as_debian_packages(tmp_path):
    # a PATH with bash tools but no gcc or make
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "cat", "sed", "dirname", "mkdir", "sha256sum", "cut", "nproc"):
        src = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if src:
            os.symlink(src, bin_dir / tool)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([str(bin_dir / "bash"), str(BOOTSTRAP), "--check-build-deps"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "sudo apt-get install" in r.stderr
    assert "gcc" in r.stderr and "make" in r.stderr
    assert "libnuma1" in r.stderr


def test_build_dependencies_present_here():
    r = subprocess.run(["bash", str(BOOTSTRAP), "--check-build-deps"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_unknown_option_names_the_allowed_ones(tmp_path):
    r = run(["--bogus"], {}, tmp_path)
    assert r.returncode != 0
    assert "unknown option '--bogus'" in r.stderr and "--find" in r.stderr


@pytest.mark.skipif(not (ROOT.parent / "shared" / "toolchain" / "SHA256SUMS").exists(), reason="no shared toolchain")
def test_shared_tarball_checksum_matches_the_pinned_one():
    sums = (ROOT.parent / "shared" / "toolchain" / "SHA256SUMS").read_text()
    pinned = next(line.split("=", 1)[1] for line in BOOTSTRAP.read_text().splitlines() if line.startswith("PY_SHA256="))
    assert pinned in sums


def test_install_stamp_reinstalls_only_for_a_changed_pyproject_or_a_new_extra(tmp_path):
    """The venv's python is a fake that records pip calls; bootstrap must call pip only when needed."""
    pip_log = tmp_path / "pip.log"
    real = fake_python(tmp_path / "real" / "python3.13t", True)
    venv_py = tmp_path / "venv" / "bin" / "python"
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> {pip_log}; exit 0; fi\n'
                       f'exec {real} "$@"\n')
    venv_py.chmod(0o755)

    def boot(**env):
        r = run(["--venv"], {"EVENTSTREAM_PYTHON": str(real), "EVENTSTREAM_VENV": str(tmp_path / "venv"), **env},
                tmp_path)
        assert r.returncode == 0, r.stderr
        calls = pip_log.read_text().splitlines() if pip_log.exists() else []
        pip_log.unlink(missing_ok=True)
        return [c for c in calls if " -e " in c]

    assert boot() == ["-m pip install --disable-pip-version-check -q -e .[dev]"]
    assert boot() == []  # nothing changed
    assert boot(EVENTSTREAM_EXTRAS="bench") == ["-m pip install --disable-pip-version-check -q -e .[bench,dev]"]
    assert boot() == []  # the bench extra stays installed for plain runs
    assert (tmp_path / "venv" / ".eventstream-installed").read_text().split()[1] == "bench,dev"
