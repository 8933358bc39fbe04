"""Arena: one page-aligned block of NUMA memory handing out numpy arrays (bump allocation).

Why an arena: rings, atomic cells, pools and dedup tables all want their memory on the node of the
threads that touch it, freed exactly once, and viewed as numpy arrays with no copy. One libnuma
allocation per structure keeps `numa_free` bookkeeping trivial (one address, one size) and lets a
placement report cover everything the structure owns.

Lifetime: `close()` frees the block (idempotent, also called by the context manager and, with a
warning, by garbage collection of a forgotten arena). Arrays handed out keep the arena object alive,
so a forgotten arena is never freed under a live view; after an explicit `close()` the views must not
be used any more (their owner closes the arena only when it is done with them).
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import weakref

import numpy as np
import structlog

from eventstream.core import numa

log = structlog.get_logger("eventstream.arena")

ALIGN = 64

_stats_lock = threading.Lock()  # bookkeeping only (create/close), never on a hot path
_live = {"arenas": 0, "bytes": 0}
_warned_fallback = False


class ArenaFull(MemoryError):
    pass


class ArenaClosed(ValueError):
    pass


def live_arenas() -> int:
    """Arenas allocated and not yet freed in this process (for leak tests)."""
    return _live["arenas"]


def live_bytes() -> int:
    return _live["bytes"]


def _account(arenas: int, nbytes: int) -> None:
    with _stats_lock:
        _live["arenas"] += arenas
        _live["bytes"] += nbytes


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("numa_fallback", reason=reason, using="anonymous mmap")


_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)  # Linux


def _advise_huge_pages(addr: int, size: int) -> None:
    """Ask for transparent huge pages over a large block (best effort; Linux's THP in `madvise` mode):
    zeroing a 400 MB dedup table then faults in 200 pages instead of 100,000."""
    if size < (4 << 20):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # a handle of our own: ctypes objects are not shared across threads
        libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size), ctypes.c_int(_MADV_HUGEPAGE))
    except (OSError, AttributeError):
        pass


UNBOUND = -2  # node value: plain anonymous memory, libnuma not asked (numa.bind_memory: false)


def memory_node(node: int, bind_memory: bool) -> int:
    """The node to give Arena for the `numa.node` and `numa.bind_memory` keys (the one place they meet)."""
    return node if bind_memory else UNBOUND


class _Block:
    """The raw memory and how to give it back; freed at most once."""

    def __init__(self, size: int, node: int, huge_pages: bool = False):
        self.size = size
        self.addr = 0
        self.backend = "mmap"
        self._mmap: mmap.mmap | None = None
        lib = numa.library() if node != UNBOUND else None
        if lib is not None and (node < 0 or node <= numa.max_node()):
            addr = lib.numa_alloc_local(size) if node < 0 else lib.numa_alloc_onnode(size, node)
            if not addr:
                raise MemoryError(f"numa_alloc of {size} bytes on node {node} failed")
            self.addr = int(addr)
            self.backend = "libnuma"
        else:
            if node == UNBOUND:
                pass  # asked for (numa.bind_memory: false): no warning
            elif lib is None:
                _warn_fallback("libnuma is not available")
            else:
                _warn_fallback(f"node {node} does not exist (max node {numa.max_node()})")
            self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        if huge_pages:
            _advise_huge_pages(self.addr, size)
        self.freed = False
        self._free_lock = threading.Lock()

    def free(self) -> bool:
        with self._free_lock:
            if self.freed:
                return False
            self.freed = True
        if self.backend == "libnuma":
            numa.library().numa_free(ctypes.c_void_p(self.addr), self.size)
        else:
            assert self._mmap is not None  # the mmap backend
            try:
                self._mmap.close()
            except BufferError:  # a view is still exported: the mapping goes when the view does
                pass
        _account(-1, -self.size)
        return True


class _View:
    """The buffer behind one arena array: its base, so every view keeps the arena object alive.

    (No reference from the arena back to its arrays: a cycle through ctypes/numpy objects would never
    be collected.)
    """

    __slots__ = ("arena", "raw")

    def __init__(self, arena: Arena, start: int, nbytes: int):
        self.arena = arena
        self.raw = (ctypes.c_char * max(nbytes, 1)).from_address(arena.address + start)

    def __buffer__(self, flags):
        return memoryview(self.raw).cast("B")


def _finalize(block: _Block, name: str) -> None:
    if block.free():
        log.warning("arena_not_closed", name=name, bytes=block.size, hint="call close() or use `with`")


class Arena:
    """`size_bytes` of memory on `node` (-1: the calling thread's local node; UNBOUND: plain memory)."""

    def __init__(self, size_bytes: int, node: int = -1, *, name: str = "", huge_pages: bool = False):
        if not isinstance(size_bytes, int) or size_bytes <= 0:
            raise ValueError(f"Arena size_bytes={size_bytes!r} is not allowed; allowed: a positive integer")
        if not isinstance(node, int) or node < UNBOUND:
            raise ValueError(
                f"Arena node={node!r} is not allowed; allowed: -1 (local), a node id >= 0 or UNBOUND (-2: plain memory)"
            )
        page = numa.page_size()
        self.size = (size_bytes + page - 1) // page * page
        self.node = node
        self.name = name
        self._block = _Block(self.size, node, huge_pages)
        _account(1, self.size)
        self._finalizer = weakref.finalize(self, _finalize, self._block, name)
        self._offset = 0
        self._alloc_lock = threading.Lock()  # allocation happens at construction time, not on hot paths

    # -- allocation -------------------------------------------------------------------------------
    @property
    def address(self) -> int:
        return self._block.addr

    @property
    def backend(self) -> str:
        return self._block.backend

    @property
    def used(self) -> int:
        return self._offset

    @property
    def closed(self) -> bool:
        return self._block.freed

    def array(self, n: int, dtype=np.uint8, *, align: int = ALIGN, zero: bool = True) -> np.ndarray:
        """A zeroed array of `n` elements of `dtype` inside the arena, `align`-byte aligned.

        `zero=False`: not written now (fresh memory reads as zero anyway), so its pages are faulted in
        by their first use instead (large, sparsely used areas such as the payload arena)."""
        if self.closed:
            raise ArenaClosed(f"arena {self.name!r} is closed; allocate from an open arena")
        dtype = np.dtype(dtype)
        nbytes = int(n) * dtype.itemsize
        with self._alloc_lock:
            start = (self._offset + align - 1) // align * align
            if start + nbytes > self.size:
                raise ArenaFull(
                    f"arena {self.name!r} has {self.size - start} bytes left, {nbytes} requested "
                    f"({n} x {dtype}); allowed: at most {self.size} bytes in total - make the arena larger"
                )
            self._offset = start + nbytes
        raw = np.frombuffer(_View(self, start, nbytes), dtype=np.uint8)
        if zero:
            raw[:] = 0  # fresh memory is zero already; writing it faults the pages in on this node now
        return raw.view(dtype)

    def node_of(self, array: np.ndarray) -> int:
        """NUMA node of the first page of `array` (-1 if unknown)."""
        if array.size == 0:
            return -1
        return numa.node_of_address(array.ctypes.data)

    def nodes(self) -> dict:
        """Placement report: where the arena's resident pages are (move_pages query)."""
        by_node = {} if self.closed else numa.pages_by_node(self.address, self._offset or self.size)
        return {
            "name": self.name,
            "backend": self.backend,
            "requested_node": self.node,
            "size_bytes": self.size,
            "used_bytes": self._offset,
            "pages_by_node": by_node,
            "closed": self.closed,
        }

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the memory (exactly once; later calls do nothing)."""
        self._block.free()
        self._finalizer.detach()

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._offset}/{self.size} bytes"
        return f"<Arena {self.name!r} {self.backend} node={self.node} {state}>"


def owned_arena(arena: Arena | None, size_bytes: int, node: int, name: str) -> tuple[Arena, bool]:
    """The arena a structure should use: the caller's, or a new one it owns (and must close)."""
    if arena is not None:
        return arena, False
    return Arena(size_bytes, node, name=name), True
