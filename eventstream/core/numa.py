"""libnuma, reached through the library py-libnuma already loaded.

Why reuse py-libnuma's CDLL instead of loading our own: one handle per process, and py-libnuma's own
helpers (topology, bitmasks) keep working on the same library state. Every prototype this project
calls is declared here exactly once, at import, because building ctypes prototypes concurrently on a
free-threaded build is racy.

When libnuma is missing (no shared library, or `numa_available() < 0`), `library()` returns None and
every query degrades to a single-node answer; callers (Arena) fall back to ordinary memory.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, c_int, c_long, c_longlong, c_size_t, c_ulong, c_void_p

MPOL_F_NODE = 1 << 0
MPOL_F_ADDR = 1 << 1

_PAGE = os.sysconf("SC_PAGE_SIZE")

try:  # py-libnuma loads libnuma at import and raises if the library cannot be found
    import numa as _pynuma

    _LIB = _pynuma.LIBNUMA
    _bitmask_t = _pynuma.bitmask_t
except Exception:  # noqa: BLE001  # pragma: no cover - how py-libnuma fails without libnuma depends on the host
    _LIB = None
    _bitmask_t = None


def _declare(lib) -> bool:
    """Declare argtypes/restypes of every libnuma entry point we use; False if one is missing."""
    try:
        protos = {
            "numa_available": ([], c_int),
            "numa_max_node": ([], c_int),
            "numa_node_size64": ([c_int, POINTER(c_longlong)], c_longlong),
            "numa_distance": ([c_int, c_int], c_int),
            "numa_allocate_cpumask": ([], POINTER(_bitmask_t)),
            "numa_bitmask_free": ([POINTER(_bitmask_t)], None),
            "numa_bitmask_isbitset": ([POINTER(_bitmask_t), ctypes.c_uint], c_int),
            "numa_node_to_cpus": ([c_int, POINTER(_bitmask_t)], c_int),
            "numa_alloc_onnode": ([c_size_t, c_int], c_void_p),
            "numa_alloc_local": ([c_size_t], c_void_p),
            "numa_free": ([c_void_p, c_size_t], None),
            "get_mempolicy": ([POINTER(c_int), POINTER(c_ulong), c_ulong, c_void_p, c_ulong], c_long),
            "move_pages": ([c_int, c_ulong, POINTER(c_void_p), POINTER(c_int), POINTER(c_int), c_int], c_long),
        }
        for name, (args, res) in protos.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = res
    except AttributeError:
        return False
    return True


if _LIB is not None and not _declare(_LIB):  # pragma: no cover - ancient libnuma
    _LIB = None

_AVAILABLE = _LIB is not None and _LIB.numa_available() >= 0


def library():
    """The libnuma CDLL (shared with py-libnuma), or None when libnuma cannot be used."""
    return _LIB if _AVAILABLE else None


def available() -> bool:
    return _AVAILABLE


def max_node() -> int:
    return int(_LIB.numa_max_node()) if _AVAILABLE else 0


def node_cpus(node: int) -> list[int]:
    """CPUs of `node` (all CPUs of the machine on a host without libnuma)."""
    if not _AVAILABLE:
        return sorted(os.sched_getaffinity(0)) if node == 0 else []
    mask = _LIB.numa_allocate_cpumask()
    try:
        if _LIB.numa_node_to_cpus(int(node), mask) < 0:
            return []
        return [c for c in range(mask.contents.size) if _LIB.numa_bitmask_isbitset(mask, c)]
    finally:
        _LIB.numa_bitmask_free(mask)


def node_size(node: int) -> int:
    """Total memory of `node` in bytes (0 if unknown)."""
    if not _AVAILABLE:
        return 0
    free = c_longlong(0)
    size = _LIB.numa_node_size64(int(node), ctypes.byref(free))
    return max(int(size), 0)


def distance(a: int, b: int) -> int:
    if not _AVAILABLE:
        return 10 if a == b else 20
    return int(_LIB.numa_distance(int(a), int(b)))


def node_of_address(addr: int) -> int:
    """NUMA node holding the page at `addr` (faults the page in if untouched); -1 if unknown."""
    if not _AVAILABLE:
        return -1
    node = c_int(-1)
    rc = _LIB.get_mempolicy(ctypes.byref(node), None, 0, c_void_p(int(addr)), MPOL_F_NODE | MPOL_F_ADDR)
    return int(node.value) if rc == 0 else -1


def pages_by_node(addr: int, size: int) -> dict[int, int]:
    """Count the resident pages of [addr, addr+size) per node with move_pages (query mode).

    Pages never touched are reported under -1 (not yet placed). Does not fault anything in.
    """
    npages = (int(size) + _PAGE - 1) // _PAGE
    if npages == 0:
        return {}
    if not _AVAILABLE:
        return {-1: npages}
    out: dict[int, int] = {}
    chunk = 4096
    base = int(addr) - int(addr) % _PAGE
    for first in range(0, npages, chunk):
        k = min(chunk, npages - first)
        pages = (c_void_p * k)(*[base + (first + i) * _PAGE for i in range(k)])
        status = (c_int * k)()
        if _LIB.move_pages(0, k, pages, None, status, 0) != 0:
            out[-1] = out.get(-1, 0) + k
            continue
        for s in status:
            key = s if s >= 0 else -1
            out[key] = out.get(key, 0) + 1
    return out


def page_size() -> int:
    return _PAGE
