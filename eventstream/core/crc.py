"""CRC-32 shift and combine: the CRC of bytes under a new initial value without reading them again.

zlib.crc32(data, value) is affine in `value`: for the same n = len(data) bytes,

    zlib.crc32(data, v2) == zlib.crc32(data, v1) ^ shift(v1 ^ v2, n)

where shift(v, n) multiplies v by x^(8n) modulo the CRC-32 polynomial, in zlib's reflected
representation (bit 31 is x^0; zlib's crc32.c calls it multmodp(x2nmodp(n, 3), v)). So once a large
payload's CRC is known under one initial value, its CRC under any other follows in O(log n) 32-bit
steps instead of another pass over its bytes (`recrc`). Python's zlib has no crc32_combine, hence
this module.

How shift is cheap in Python: multiplication by a fixed x^(8 * 2^j) is a linear map of 32 bits,
kept as four 256-entry tables (one per byte of v, built on first use). shift(v, n)
applies the map of each set bit j of n: four lookups and three XORs per bit, about 1 µs each.

COMBINE_MIN_BYTES is the one threshold: below it a plain pass over the bytes is cheaper than shift
(bench/crc.py on the 2-core dev machine, 2026-12-07: zlib.crc32 runs at about 1 GB/s, recrc takes
20-25 µs whatever the length, so they cross at 16 KiB; docs/benchmarks.md; with ISA-L, below, a pass
is several times faster and they would cross higher: kept at 16 KiB, the same on every machine); the
decoder keeps a payload's CRC for the log writer only from this size on, and the writer recomputes
everything below it.

`crc32(data, value=0)`: the same function as zlib.crc32 (same polynomial, same chaining), computed by
ISA-L's crc32_gzip_refl (Debian's libisal2, loaded with cffi; carry-less multiplication: 256 KiB in
about 30 µs against zlib's 85 µs here) for buffers of FAST_MIN_BYTES or more, by zlib below that
(the call through cffi costs 1.5-2 µs: the two break even at about 4 KiB) or when the library is not
installed (`IMPL` says which; only in a process that has cffi loaded, see crc32). It is used where
large buffers are checked: a BATCH frame's CRC, a large payload's, the log writer's pass over an
arena payload or a batch entry's payloads.
"""

from __future__ import annotations

import sys
import zlib

POLY = 0xEDB88320  # CRC-32 (IEEE 802.3, zlib) reflected
X0 = 1 << 31  # the polynomial 1 (x^0) in the reflected representation
FAST_MIN_BYTES = 4096  # below: zlib.crc32 (see the module doc)
COMBINE_MIN_BYTES = 16 << 10  # payloads from this size on keep their CRC for the writer (see above)


def _isal_crc32():
    """ISA-L's zlib-compatible CRC-32 as f(data, value), or None when libisal is not installed (or
    does not give zlib's values on a few probes)."""
    try:
        import cffi  # type: ignore[import-untyped]

        ffi = cffi.FFI()
        ffi.cdef("uint32_t crc32_gzip_refl(uint32_t init_crc, const unsigned char *buf, uint64_t len);")
        lib = ffi.dlopen("libisal.so.2")
    except (ImportError, OSError):
        return None
    from_buffer, refl, slow = ffi.from_buffer, lib.crc32_gzip_refl, zlib.crc32

    def fast(data, value: int = 0) -> int:
        buf = from_buffer(data)
        n = len(buf)
        if n < FAST_MIN_BYTES:
            return slow(data, value)
        return refl(value, buf, n)

    probe = bytes(range(256)) * 40
    for value in (0, 1, 0xFFFFFFFF, 0x12345678):
        if fast(probe, value) != slow(probe, value) or fast(probe[7:], value) != slow(probe[7:], value):
            return None
    return fast


_impl = None  # the function crc32 calls, chosen on the first call once cffi is loaded (see crc32)
IMPL = "zlib"  # which one it is: "isa-l" or "zlib"


def crc32(data, value: int = 0) -> int:
    """zlib.crc32(data, value), computed by ISA-L where it is installed (see the module doc).

    ISA-L is loaded through cffi, and importing cffi turns the GIL back on in a process that did not
    start with PYTHON_GIL=0: so the choice is made only in a process that has cffi loaded already (the
    engine's, through core/atomic.py); until then, and in clients, this is zlib.crc32."""
    f = _impl
    if f is None:
        if "_cffi_backend" not in sys.modules:
            return zlib.crc32(data, value)
        f = _choose()
    return f(data, value)


def _choose():
    global _impl, IMPL
    fast = _isal_crc32()
    IMPL = "zlib" if fast is None else "isa-l"
    _impl = fast or zlib.crc32
    return _impl


_MAX_BITS = 32  # lengths below 4 GiB (frames are at most 64 MiB)


def multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (reflected, 32-bit values), as zlib's multmodp."""
    m = X0
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return p


def x8nmodp(n: int) -> int:
    """x^(8n) modulo the polynomial: the operator that moves a CRC past n bytes (zlib's x2nmodp(n, 3))."""
    p = X0
    k = 3
    while n:
        if n & 1:
            p = multmodp(_x2n()[k], p)
        n >>= 1
        k += 1
    return p


_x2n_table: list[int] = []
_byte_tables: list = [None] * _MAX_BITS  # per bit j of a length: four byte tables, built on first use


def _x2n() -> list[int]:
    """x^(2^k) mod P for k = 0..(_MAX_BITS + 3)."""
    if not _x2n_table:
        t = [1 << 30]  # x^1
        for _ in range(_MAX_BITS + 3):
            t.append(multmodp(t[-1], t[-1]))
        _x2n_table[:] = t  # a race computes the same table twice: harmless
    return _x2n_table


def _table(j: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """The map v -> v * x^(8 * 2^j) as four 256-entry tables, one per byte of v (linear: an entry is
    the XOR of the images of its set bits)."""
    t = _byte_tables[j]
    if t is None:
        op = _x2n()[j + 3]  # x^(8 * 2^j) = x^(2^(j + 3))
        per_byte = []
        for byte in range(4):
            basis = [multmodp(op, 1 << (8 * byte + b)) for b in range(8)]
            row = [0] * 256
            for i in range(1, 256):
                low = i & -i
                row[i] = row[i ^ low] ^ basis[low.bit_length() - 1]
            per_byte.append(row)
        t = _byte_tables[j] = tuple(per_byte)  # a race builds the same tables twice: harmless
    return t


def shift(v: int, n: int) -> int:
    """v * x^(8n) mod P: what a CRC register value v becomes after n zero bytes (no post-conditioning;
    see the module doc for what it is for). O(log n) table steps."""
    if n < 0 or n >= 1 << _MAX_BITS:
        raise ValueError(f"length {n} is not allowed; allowed: 0..{(1 << _MAX_BITS) - 1}")
    tables = _byte_tables
    j = 0
    while n:
        if n & 1:
            t0, t1, t2, t3 = tables[j] or _table(j)
            v = t0[v & 0xFF] ^ t1[(v >> 8) & 0xFF] ^ t2[(v >> 16) & 0xFF] ^ t3[v >> 24]
        n >>= 1
        j += 1
    return v


def recrc(crc: int, seed: int, n: int, new_seed: int) -> int:
    """zlib.crc32(data, new_seed) given crc = zlib.crc32(data, seed) and n = len(data)."""
    if seed == new_seed:
        return crc
    return crc ^ shift(seed ^ new_seed, n)


def combine(crc1: int, crc2: int, n2: int) -> int:
    """zlib.crc32(a + b) given crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and n2 = len(b) (zlib's
    crc32_combine)."""
    return crc2 ^ shift(crc1, n2)
