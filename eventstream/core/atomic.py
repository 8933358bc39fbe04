"""64-bit atomic cells in arena memory, operated through the `atomics` package's own op table.

Why not `atomics.atomicview`: its public API costs 17-52 µs per call here (buffer export, bytes
conversions, validation). The function pointers behind it - `Patomic.ops(8)`, the patomic C table -
cost 1-3 µs per call when called directly with raw addresses. This module calls exactly those
pointers (same library, same implementation, same memory orders), and is tested against
`atomicview` as an oracle.

Operands: the C functions read/write their operands through pointers. ctypes objects must not be
shared between threads on a free-threaded build, so every thread gets its own operand buffers
(`threading.local`), created on the thread's first call.

Cells: `CellBlock(arena, n)` places `n` cells 64 bytes apart (one cache line each), so a producer's
cursor and a consumer's cursor never share a line (no false sharing).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
from atomics._impl.enums import MemoryOrder
from atomics._impl.patomic import Patomic

RELAXED = int(MemoryOrder.RELAXED)
ACQUIRE = int(MemoryOrder.ACQUIRE)
RELEASE = int(MemoryOrder.RELEASE)
ACQ_REL = int(MemoryOrder.ACQ_REL)
SEQ_CST = int(MemoryOrder.SEQ_CST)

CACHE_LINE = 64
_MASK = (1 << 64) - 1

_ops = Patomic.ops(8)
_load = _ops.fp_load
_store = _ops.fp_store
_exchange = _ops.xchg_ops.fp_exchange
_cas = _ops.xchg_ops.fp_cmpxchg_strong
_fetch_add = _ops.unsigned_ops.fp_fetch_add
_fetch_sub = _ops.unsigned_ops.fp_fetch_sub
if not all((_load, _store, _exchange, _cas, _fetch_add, _fetch_sub)):  # pragma: no cover
    raise ImportError("the atomics package has no lock-free 64-bit operations on this platform")


_ADDRS = {
    name: ctypes.cast(fp, ctypes.c_void_p).value
    for name, fp in (
        ("load", _load),
        ("store", _store),
        ("exchange", _exchange),
        ("cas", _cas),
        ("fetch_add", _fetch_add),
    )
}
_PROTOS = {
    name: type(fp)
    for name, fp in (
        ("load", _load),
        ("store", _store),
        ("exchange", _exchange),
        ("cas", _cas),
        ("fetch_add", _fetch_add),
    )
}


class _Operands(threading.local):
    """Per-thread operand buffers, their addresses, and per-thread function-pointer objects.

    The function pointers are the op table's own addresses wrapped in the op table's own prototypes
    (classes built once, at import); each thread gets its own wrapper objects so that two threads
    never touch the same ctypes object (on a free-threaded build that would be a shared refcount
    bouncing between CPUs at best, a data race in ctypes at worst).
    """

    def __init__(self):
        for name, addr in _ADDRS.items():
            setattr(self, name, _PROTOS[name](addr))
        self.a = ctypes.c_uint64(0)
        self.b = ctypes.c_uint64(0)
        self.res = ctypes.c_uint64(0)
        self.pa = ctypes.addressof(self.a)
        self.pb = ctypes.addressof(self.b)
        self.pres = ctypes.addressof(self.res)


_tls = _Operands()


def load(addr: int, order: int = SEQ_CST) -> int:
    o = _tls
    o.load(addr, order, o.pres)
    return o.res.value


def store(addr: int, value: int, order: int = SEQ_CST) -> None:
    o = _tls
    o.a.value = value & _MASK
    o.store(addr, o.pa, order)


def exchange(addr: int, value: int, order: int = SEQ_CST) -> int:
    o = _tls
    o.a.value = value & _MASK
    o.exchange(addr, o.pa, order, o.pres)
    return o.res.value


def cas(addr: int, expected: int, desired: int, success: int = SEQ_CST, failure: int = SEQ_CST) -> tuple[bool, int]:
    """Compare-and-swap. Returns (swapped, value seen): on failure the value seen is the current one."""
    o = _tls
    o.a.value = expected & _MASK
    o.b.value = desired & _MASK
    ok = o.cas(addr, o.pa, o.pb, success, failure)
    return bool(ok), o.a.value


def fetch_add(addr: int, delta: int, order: int = SEQ_CST) -> int:
    """Add `delta` (wrapping modulo 2**64; negative deltas subtract) and return the previous value."""
    o = _tls
    o.a.value = delta & _MASK
    o.fetch_add(addr, o.pa, order, o.pres)
    return o.res.value


class Cell:
    """One 64-bit atomic cell at a fixed address (the memory belongs to an arena)."""

    __slots__ = ("address", "_keep")

    def __init__(self, address: int, keep=None):
        if address % 8:
            raise ValueError(f"atomic cell address {address:#x} is not 8-byte aligned; allowed: multiples of 8")
        self.address = address
        self._keep = keep  # the array owning the memory, so it outlives the cell

    def load(self, order: int = SEQ_CST) -> int:
        return load(self.address, order)

    def store(self, value: int, order: int = SEQ_CST) -> None:
        store(self.address, value, order)

    def exchange(self, value: int, order: int = SEQ_CST) -> int:
        return exchange(self.address, value, order)

    def cas(self, expected: int, desired: int) -> tuple[bool, int]:
        return cas(self.address, expected, desired)

    def fetch_add(self, delta: int, order: int = SEQ_CST) -> int:
        return fetch_add(self.address, delta, order)

    def __repr__(self) -> str:
        return f"<Cell {self.address:#x} = {self.load()}>"


class CellBlock:
    """`n` cells from `arena`, each alone on its own 64-byte cache line."""

    def __init__(self, arena, n: int):
        self.memory = arena.array(n * (CACHE_LINE // 8), np.uint64, align=CACHE_LINE)
        base = self.memory.ctypes.data
        self.cells = [Cell(base + i * CACHE_LINE, self.memory) for i in range(n)]

    def __getitem__(self, i: int) -> Cell:
        return self.cells[i]

    def __len__(self) -> int:
        return len(self.cells)


def address_of(array: np.ndarray, index: int = 0) -> int:
    """Address of element `index` of a (u)int64 array, for cells packed in an array (tables)."""
    if array.dtype.itemsize != 8:
        raise ValueError(f"atomic cells are 64-bit; got an array of {array.dtype}; allowed: int64/uint64 arrays")
    return array.ctypes.data + index * array.strides[0]
