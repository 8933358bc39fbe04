"""core.crc.crc32 is zlib.crc32 (same values, same chaining) whichever implementation computes it:
ISA-L where libisal is installed and cffi is loaded (the engine's process), zlib otherwise; a process
without cffi (a client) is never made to import it."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

import eventstream.core.atomic  # noqa: F401 - loads cffi, as the engine does
from eventstream.core import crc


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=9000),
    value=st.integers(0, 0xFFFFFFFF),
    cut=st.integers(0, 64),
)
def test_same_values_as_zlib(data, value, cut):
    assert crc.crc32(data, value) == zlib.crc32(data, value)
    view = memoryview(data)[cut:]  # a slice of a buffer, as the decoder and the writer pass them
    assert crc.crc32(view, value) == zlib.crc32(view, value)
    assert crc.crc32(view.toreadonly()) == zlib.crc32(view)


def test_chained_over_large_buffers_as_zlib():
    data = os.urandom(600_000)
    mv = memoryview(data)
    c = 0
    for a, b in ((0, 3000), (3000, 300_000), (300_000, 300_001), (300_001, 600_000)):
        c = crc.crc32(mv[a:b], c)
    assert c == zlib.crc32(data)
    assert crc.IMPL in ("isa-l", "zlib")


def test_a_process_without_cffi_does_not_load_it():
    code = (
        "import sys, zlib\n"
        "from eventstream.core import crc\n"
        "b = bytes(range(256)) * 400\n"
        "assert crc.crc32(b, 7) == zlib.crc32(b, 7)\n"
        "print('_cffi_backend' in sys.modules, crc.IMPL)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=True)
    assert out.stdout.split() == ["False", "zlib"]
