"""core/crc.py against zlib: the CRC of the same bytes under another initial value, and the CRC of a
concatenation, derived without reading the bytes again, equal zlib.crc32's for any data and inits."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.core import crc

MIB = 1 << 20
_DATA = np.random.default_rng(20).bytes(4 * MIB)  # lengths 0..4 MiB are prefixes of it, from any offset
u32 = st.integers(0, 0xFFFFFFFF)
lengths = st.one_of(st.integers(0, 64), st.integers(0, 4 * MIB), st.sampled_from([crc.COMBINE_MIN_BYTES, MIB, 4 * MIB]))


def data(offset: int, n: int) -> memoryview:
    offset = min(offset, len(_DATA) - n)
    return memoryview(_DATA)[offset : offset + n]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=lengths, offset=st.integers(0, 4 * MIB), v1=u32, v2=u32)
def test_recrc_equals_zlib_under_the_new_init(n, offset, v1, v2):
    d = data(offset, n)
    assert crc.recrc(zlib.crc32(d, v1), v1, n, v2) == zlib.crc32(d, v2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=lengths, cut=st.floats(0, 1), offset=st.integers(0, 4 * MIB), v=u32)
def test_combine_equals_zlib_of_the_concatenation(n, cut, offset, v):
    d = data(offset, n)
    k = int(n * cut)
    assert crc.combine(zlib.crc32(d[:k], v), zlib.crc32(d[k:]), n - k) == zlib.crc32(d, v)


@settings(max_examples=200, deadline=None)
@given(v=u32, n=st.integers(0, (1 << 32) - 1))
def test_shift_is_the_generic_polynomial_product(v, n):
    assert crc.shift(v, n) == crc.multmodp(crc.x8nmodp(n), v)


def test_shift_of_zero_bytes_and_zero_value():
    assert crc.shift(0x12345678, 0) == 0x12345678
    assert crc.shift(0, 12345) == 0
    assert crc.recrc(0xDEADBEEF, 7, 100, 7) == 0xDEADBEEF


def test_length_out_of_range_names_the_range():
    with pytest.raises(ValueError, match=r"length -1 is not allowed; allowed: 0\.\.4294967295"):
        crc.shift(1, -1)
    with pytest.raises(ValueError, match=r"allowed: 0\.\.4294967295"):
        crc.shift(1, 1 << 32)
