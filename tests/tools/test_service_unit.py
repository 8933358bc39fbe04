"""tools/eventstream.service: the systemd unit parses, has the keys operations rely on, and its command
line is one `eventstream` accepts."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eventstream.cli.main import EXIT_GIL, EXIT_USAGE, build_parser

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "tools" / "eventstream.service"
VENV_EVENTSTREAM = "/opt/eventstream/.venv/bin/eventstream"


def load_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    return unit


def test_unit_has_the_required_keys():
    unit = load_unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert unit["Unit"]["Description"]
    assert svc["Type"] == "notify"
    assert svc["ExecStart"] == f"{VENV_EVENTSTREAM} serve --config /etc/eventstream/eventstream.yaml"
    assert svc["WorkingDirectory"].startswith("/")
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["TimeoutStopSec"] and svc["TimeoutStartSec"]
    assert int(svc["LimitNOFILE"]) >= 4096
    assert svc["Environment"] == "PYTHON_GIL=0"
    assert svc["User"] == "eventstream" and svc["Group"] == "eventstream"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # configuration errors and a GIL that is on do not fix themselves: no restart loop
    assert set(svc["RestartPreventExitStatus"].split()) == {str(EXIT_USAGE), str(EXIT_GIL)}
    # optional, documented but off: the watchdog and CPU pinning
    text = UNIT.read_text()
    assert "\n#WatchdogSec=" in text and "WatchdogSec" not in svc
    assert "\n#CPUAffinity=" in text and "CPUAffinity" not in svc


def test_exec_start_is_a_command_line_eventstream_accepts():
    argv = shlex.split(load_unit()["Service"]["ExecStart"])
    assert argv[0] == VENV_EVENTSTREAM
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.config == "/etc/eventstream/eventstream.yaml"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify also checks that ExecStart's program exists: point it at this venv's `eventstream`
    # (the same program the unit names under /opt/eventstream), everything else unchanged
    program = Path(sys.executable).parent / "eventstream"
    if not program.exists():
        program = Path(sys.executable)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={VENV_EVENTSTREAM} ") == 1
    copy = tmp_path / "eventstream.service"
    copy.write_text(text.replace(f"ExecStart={VENV_EVENTSTREAM} ", f"ExecStart={program} "))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    # unknown keys and unparsable values are only warnings (exit 0): none may be printed for our unit
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "eventstream.service" in line]
    assert r.returncode == 0 and complaints == [], r.stdout + r.stderr
