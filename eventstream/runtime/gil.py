"""The GIL must stay off.

`atomics` imports cffi, and importing cffi 1.17 re-enables the GIL on a free-threaded build unless the
interpreter started with ``PYTHON_GIL=0`` or ``-X gil=0``. Entry points therefore (1) re-execute
themselves with ``-X gil=0`` when needed and (2) check, after every import, that the GIL is still off.
"""

from __future__ import annotations

import os
import sys
import sysconfig


class GilEnabledError(RuntimeError):
    pass


def is_free_threaded_build() -> bool:
    return sysconfig.get_config_var("Py_GIL_DISABLED") == 1


def gil_enabled() -> bool:
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def gil_forced_off() -> bool:
    """True when this interpreter was started with the GIL explicitly disabled."""
    xopt = sys._xoptions.get("gil")
    if xopt is not None:
        return str(xopt) == "0"
    return os.environ.get("PYTHON_GIL") == "0"


def gil_allowed_by_env() -> bool:
    return os.environ.get("EVENTSTREAM_ALLOW_GIL", "") not in ("", "0", "false", "no")


def reexec_without_gil(argv: list[str] | None = None) -> None:
    """Replace this process with the same command under ``-X gil=0`` when that is needed.

    Does nothing on a GIL build, when the GIL is already forced off, when the user asked for the GIL
    (PYTHON_GIL=1 or -X gil=1, used by comparison benchmarks), or when EVENTSTREAM_NO_REEXEC is set.
    """
    if not is_free_threaded_build() or gil_forced_off() or os.environ.get("EVENTSTREAM_NO_REEXEC"):
        return
    if os.environ.get("PYTHON_GIL") == "1" or sys._xoptions.get("gil") == "1":
        return
    argv = list(sys.argv if argv is None else argv)
    env = dict(os.environ, PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1")
    if argv and argv[0].endswith(("__main__.py", "-c")) or not argv or not os.path.exists(argv[0]):
        args = [sys.executable, "-X", "gil=0", "-m", "eventstream", *argv[1:]]
    else:
        args = [sys.executable, "-X", "gil=0", argv[0], *argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def require_gil_off(allow_gil: bool = False, what: str = "eventstream") -> None:
    """Refuse to go on when the GIL is on, unless explicitly allowed."""
    if not gil_enabled() or allow_gil:
        return
    if not is_free_threaded_build():
        hint = (
            f"this interpreter ({sys.executable}, {sys.version.split()[0]}) is not a free-threaded build; "
            "run under python3.13t (tools/bootstrap.sh finds or builds one, `make run` uses it)"
        )
    else:
        hint = (
            "the GIL was re-enabled (importing cffi does this unless the interpreter starts with "
            "PYTHON_GIL=0 or -X gil=0); start with PYTHON_GIL=0"
        )
    raise GilEnabledError(
        f"{what} refuses to run with the GIL enabled: {hint}. "
        "To run anyway (for comparisons only), pass --allow-gil / allow_gil=True."
    )
