"""PayloadArena: payloads larger than a record's inline capacity, in size-class slabs of NUMA memory.

A record keeps payloads of up to `records.payload_bytes` inline (core/records.py). A larger one is
copied once, at decode, into a slot of this arena, and the record carries where it is: `ext_arena`
(the arena's id in this process, 1..255), `ext_off` (byte offset) and `ext_class` (size class + 1;
0 = inline); `payload_len` is the length as for inline payloads. Handlers get the slot as a
zero-copy view; the processor that released the record's ring slot gives the payload slot back in
the same step (one `release_records` call per batch), so a payload lives exactly as long as its
record is in flight.

Layout: the arena is `arena_bytes` of memory (core/arena.py, on the configured NUMA node) cut into
chunks of `chunk` bytes (the largest possible payload rounded up to a power of two, at least 64 KiB).
A chunk is taken from the shared pool by one size class (powers of two from just above the inline
capacity up to `chunk`) and cut into slots of that size as they are needed (a bump offset; freed
slots are reused first). A chunk whose slots are all free again goes back to the pool at once, so a
class never hoards memory another class waits for (taking it again costs nothing: slots are cut
lazily). Waste is below half a slot per payload.

Concurrency: claims come from every ingest thread, releases from every processor thread. Each
size class has its own small lock (a claim or a release of a whole batch takes each class's lock
once, never per byte), and the chunk pool has one more lock, taken only while a chunk changes hands
(lock order: class, then pool). Why not the rings' CAS cursors: slots are freed out of order
(partitions release independently). Why not core/pool.py's lock-free pool (a Treiber stack), tried
for the free chunks: from Python each CAS is a cffi call of about a microsecond, and taking or
giving back a chunk costs several (head, in-use cell, free count), against about 0.1 µs for an
uncontended lock around a list pop; a claim-then-release loop of 16 payloads of 16 B-16 KB took
1.7x as long per batch with it (2026-12-07). The slot lists cannot use it either: a chunk whose
slots are all free again leaves its class at once, which takes its slots out of the middle of the
class's free slots (a stack only pops its top). The lock is held for a few list operations per
batch; payloads above the inline size cost far more to copy than the lock.

Bounded: `claim` never grows the arena. When a payload does not fit, it claims the longest prefix
that does and says so; ingest then pushes the producer back exactly as for a full ring (the TCP
reader keeps the undecoded bytes and stops reading that connection until there is room; the NATS
source stops fetching; UDP sheds with reason `overflow:payloads`).

A payload's CRC, kept for the log writer: the decoder reads a large payload's bytes once, for the
frame's CRC, as zlib.crc32(payload, seed) where seed is the CRC of the frame bytes before it. For a
record whose payload went to the arena and is at least core/crc.py's COMBINE_MIN_BYTES, it keeps
(seed, that CRC) in the record's unused inline bytes [0, 8) (two u32) and sets the header's padding
byte (offset 63) to CRC_KEPT (`keep_crcs`). The log writer takes them out again (`take_kept_crcs`:
the bytes it stores are zero there, as without them) and derives the entry's CRC with core/crc.py's
recrc instead of a second pass over the payload. A record without them (inline payload, a smaller
one, v1 frames, the NATS source, DLQ replay, records.payload_bytes < 8) is CRC'd by the writer as
before. Views handed out of the arena are read-only, so the kept CRC stays the CRC of the bytes.
"""

from __future__ import annotations

import struct
import threading

import numpy as np

from eventstream.core.arena import Arena
from eventstream.core.records import SMALL_BATCH

MIN_CLASS_BYTES = 64
MIN_CHUNK_BYTES = 64 << 10
DEFAULT_ARENA_BYTES = 128 << 20
MAX_ARENAS = 255  # ids fit the record's u1 `ext_arena`
CRC_KEPT = 1  # the record's padding byte when its first 8 inline bytes hold (seed, crc32(payload, seed))
_PAD_AT = 63  # offset of the padding byte in a record (core/records.py)
_INLINE_AT = 64
_SEED_CRC = struct.Struct("<II")

_registry: list = [None] * (MAX_ARENAS + 1)  # arena id -> PayloadArena (0 = inline, never used)
_registry_lock = threading.Lock()


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def chunk_bytes_for(max_payload: int) -> int:
    """Chunk size of an arena whose largest payload is `max_payload` bytes."""
    return max(pow2_at_least(max_payload), MIN_CHUNK_BYTES)


def arena_by_id(arena_id: int) -> PayloadArena:
    a = _registry[arena_id] if 0 < arena_id <= MAX_ARENAS else None
    if a is None:
        raise ValueError(
            f"record refers to payload arena {arena_id}, which does not exist (closed?); "
            "allowed: records whose payload arena is still open"
        )
    return a


class _Class:
    __slots__ = ("size", "lock", "avail", "used", "bump_ch", "bump_off", "bump_end")

    def __init__(self, size: int):
        self.size = size
        self.lock = threading.Lock()
        self.avail: dict[int, list[int]] = {}  # chunk -> freed slot offsets (only chunks with some)
        self.used = 0  # slots in use
        # the chunk being cut: slots from bump_off to bump_end were never handed out
        self.bump_ch = -1
        self.bump_off = self.bump_end = 0


class PayloadArena:
    """`size_bytes` of payload slots for payloads of `min_payload + 1` .. `max_payload` bytes."""

    def __init__(
        self,
        size_bytes: int,
        max_payload: int,
        *,
        min_payload: int = 0,
        node: int = -1,
        name: str = "payloads",
        key: str = "payloads.arena_bytes",
    ):
        if not isinstance(max_payload, int) or max_payload < 1:
            raise ValueError(f"max_payload={max_payload!r} is not allowed; allowed: an integer >= 1")
        self.chunk = chunk_bytes_for(max_payload)
        if not isinstance(size_bytes, int) or size_bytes < 2 * self.chunk:
            raise ValueError(
                f"{key}={size_bytes!r} is not allowed; allowed: at least {2 * self.chunk} bytes (two "
                f"chunks of {self.chunk} bytes: the largest payload, {max_payload} bytes from "
                "server.tcp.max_frame_bytes, rounded up to a power of two)"
            )
        self.max_payload = max_payload
        self.min_payload = min_payload
        self.nchunks = size_bytes // self.chunk
        self.size = self.nchunks * self.chunk
        self.name = name
        smallest = min(max(MIN_CLASS_BYTES, pow2_at_least(min_payload + 1)), self.chunk)
        sizes = []
        s = smallest
        while s <= self.chunk:
            sizes.append(s)
            s *= 2
        self.class_sizes = sizes
        self._sizes_np = np.array(sizes, dtype=np.int64)
        self._classes = [_Class(s) for s in sizes]
        self._grain = smallest
        self._arena = Arena(self.size, node, name=name)
        self.buf = self._arena.array(self.size, np.uint8, zero=False)  # pages fault in on first use
        self._pool = list(range(self.nchunks - 1, -1, -1))  # free chunks (a stack)
        self._pool_lock = threading.Lock()
        self._chunk_used = [0] * self.nchunks
        self._claimed = bytearray(self.size // smallest)  # 1 = a slot starts here and is claimed
        self._stats_lock = threading.Lock()
        self._stats = {"claimed": 0, "released": 0, "claimed_bytes": 0, "full": 0, "bad_release": 0}
        with _registry_lock:
            free = [i for i in range(1, MAX_ARENAS + 1) if _registry[i] is None]
            if not free:
                self._arena.close()
                raise RuntimeError(
                    f"more than {MAX_ARENAS} payload arenas open in this process; "
                    "allowed: close() arenas that are no longer used"
                )
            self.id = free[0]
            _registry[self.id] = self
        self.closed = False

    # -- claiming ---------------------------------------------------------------------------------
    def class_of(self, sizes: np.ndarray | np.int64) -> np.ndarray:
        """Size-class index (0-based) of each payload size."""
        return np.searchsorted(self._sizes_np, sizes)

    def claim(self, sizes) -> tuple[np.ndarray, np.ndarray]:
        """Slots for payloads of `sizes` bytes, in order: (offsets u8, ext classes u1 = class + 1) for
        the longest prefix that fits now (all of them unless the arena is full). Never waits."""
        sizes = np.asarray(sizes, dtype=np.int64)
        n = len(sizes)
        if n == 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint8)
        if self.closed:
            raise ValueError(f"payload arena {self.name!r} is closed")
        big = int(sizes.max())
        if big > self.chunk:
            raise ValueError(
                f"payload of {big} bytes does not fit payload arena {self.name!r}; allowed: "
                f"0..{self.max_payload} bytes (server.tcp.max_frame_bytes)"
            )
        cls = self.class_of(sizes).tolist()
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(cls):
            g = groups.get(c)
            if g is None:
                groups[c] = [i]
            else:
                g.append(i)
        offs = [0] * n
        got = [False] * n
        cut = n
        for c, idx in groups.items():
            taken = self._take(c, len(idx))
            for i, o in zip(idx, taken, strict=False):  # taken: the prefix that fit
                offs[i] = o
                got[i] = True
            if len(taken) < len(idx):
                cut = min(cut, idx[len(taken)])
        back = [i for i in range(cut, n) if got[i]]
        sizes_l = sizes.tolist()
        with self._stats_lock:  # every slot taken counts, also those given back below
            self._stats["claimed"] += cut + len(back)
            self._stats["claimed_bytes"] += sum(sizes_l[:cut]) + sum(sizes_l[i] for i in back)
            if cut < n:
                self._stats["full"] += 1
        if back:
            self.release([offs[i] for i in back], [cls[i] + 1 for i in back])
        return np.array(offs[:cut], dtype=np.uint64), np.array(cls[:cut], dtype=np.uint8) + 1

    def _take(self, c: int, k: int) -> list[int]:
        cl = self._classes[c]
        size, used = cl.size, self._chunk_used
        out: list[int] = []
        with cl.lock:
            while len(out) < k:
                if cl.avail:  # freed slots first (their chunks are cut already)
                    ch, free = next(iter(cl.avail.items()))
                    m = min(k - len(out), len(free))
                    out.extend(free[len(free) - m :])
                    del free[len(free) - m :]
                    used[ch] += m
                    if not free:
                        del cl.avail[ch]
                    continue
                if cl.bump_ch >= 0 and cl.bump_off < cl.bump_end:  # cut more of the current chunk
                    m = min(k - len(out), (cl.bump_end - cl.bump_off) // size)
                    out.extend(range(cl.bump_off, cl.bump_off + m * size, size))
                    cl.bump_off += m * size
                    used[cl.bump_ch] += m
                    continue
                with self._pool_lock:
                    ch = self._pool.pop() if self._pool else -1
                if ch < 0:
                    break
                cl.bump_ch, cl.bump_off, cl.bump_end = ch, ch * self.chunk, (ch + 1) * self.chunk
            cl.used += len(out)
            claimed, grain = self._claimed, self._grain
            for o in out:
                claimed[o // grain] = 1
        return out

    def has_room(self, size: int) -> bool:
        """Whether a payload of `size` bytes would get a slot now (a hint: others claim meanwhile)."""
        cl = self._classes[int(self.class_of(np.int64(size)))]
        return bool(cl.avail) or cl.bump_off < cl.bump_end or bool(self._pool)

    # -- releasing --------------------------------------------------------------------------------
    def release(self, offsets, ext_classes) -> None:
        """Give slots back (a batch; offsets and ext classes as claim() returned them)."""
        offs = offsets.tolist() if isinstance(offsets, np.ndarray) else list(offsets)
        ecl = ext_classes.tolist() if isinstance(ext_classes, np.ndarray) else list(ext_classes)
        if not offs:
            return
        groups: dict[int, list[int]] = {}
        for o, e in zip(offs, ecl, strict=True):
            g = groups.get(e - 1)
            if g is None:
                groups[e - 1] = [o]
            else:
                g.append(o)
        bad = done = 0
        chunk, grain, claimed, used, size_all = self.chunk, self._grain, self._claimed, self._chunk_used, self.size
        for c, sel in groups.items():
            if not 0 <= c < len(self._classes):
                bad += len(sel)
                continue
            cl = self._classes[c]
            n_done = 0
            with cl.lock:
                for o in sel:
                    if o >= size_all or o % cl.size or not claimed[o // grain]:
                        bad += 1  # never claimed, or released twice: ignored (counted)
                        continue
                    claimed[o // grain] = 0
                    ch = o // chunk
                    used[ch] -= 1
                    n_done += 1
                    if used[ch] == 0:  # all free: the chunk goes back, any class may take it
                        cl.avail.pop(ch, None)
                        if cl.bump_ch == ch:
                            cl.bump_ch, cl.bump_off, cl.bump_end = -1, 0, 0
                        with self._pool_lock:
                            self._pool.append(ch)
                        continue
                    free = cl.avail.get(ch)
                    if free is None:
                        cl.avail[ch] = [o]
                    else:
                        free.append(o)
                cl.used -= n_done
            done += n_done
        with self._stats_lock:
            self._stats["released"] += done
            self._stats["bad_release"] += bad

    # -- access -----------------------------------------------------------------------------------
    def view(self, offset: int, n: int) -> np.ndarray:
        """The payload at `offset` as a zero-copy uint8 view (valid until its slot is released)."""
        return self.buf[offset : offset + n]

    def statistics(self) -> dict:
        with self._stats_lock:
            st: dict[str, object] = dict(self._stats)
        used = sum(cl.used * cl.size for cl in self._classes)
        st.update(
            bytes=self.size,
            chunk_bytes=self.chunk,
            chunks=self.nchunks,
            chunks_free=len(self._pool),
            used_bytes=used,
            slots_used={cl.size: cl.used for cl in self._classes if cl.used},
        )
        return st

    def placement(self) -> dict:
        return self._arena.nodes()

    def close(self) -> None:
        """Free the memory (idempotent); views of it become invalid."""
        if self.closed:
            return
        self.closed = True
        with _registry_lock:
            if _registry[self.id] is self:
                _registry[self.id] = None
        self._arena.close()

    def __enter__(self) -> PayloadArena:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PayloadArena {self.name!r} id={self.id} {self.size} bytes chunk={self.chunk}>"


# -- records that may carry payloads in an arena ---------------------------------------------------
def has_ext(records: np.ndarray) -> bool:
    """Does any record of the batch keep its payload in an arena?"""
    if len(records) <= SMALL_BATCH:
        return any(records["ext_class"].tolist())
    return bool(records["ext_class"].any())


def release_records(records: np.ndarray) -> None:
    """Give back the arena slots of every record of a batch that has one (no-op for inline-only)."""
    ext = records["ext_class"]
    if len(records) <= SMALL_BATCH:
        if not any(ext.tolist()):
            return
    elif not ext.any():
        return
    idx = np.flatnonzero(ext)
    ids = records["ext_arena"][idx]
    for aid in np.unique(ids).tolist():
        sel = idx[ids == aid]
        a = _registry[aid] if 0 < aid <= MAX_ARENAS else None
        if a is not None:
            a.release(records["ext_off"][sel], ext[sel])


def keep_crcs(records: np.ndarray, idx: np.ndarray, seeds: np.ndarray, crcs: np.ndarray) -> None:
    """Keep (seed, zlib.crc32(payload, seed)) in records[idx] (arena payloads, records.payload_bytes
    >= 8) for the log writer; see the module doc. A constant number of numpy operations."""
    if len(idx) == 0:
        return
    size = records.dtype.itemsize
    raw = records.view(np.uint8).reshape(len(records), size)
    pair = np.empty((len(idx), 2), dtype="<u4")
    pair[:, 0] = seeds
    pair[:, 1] = crcs
    raw[idx, _INLINE_AT : _INLINE_AT + 8] = pair.view(np.uint8).reshape(len(idx), 8)
    raw[idx, _PAD_AT] = CRC_KEPT


def take_kept_crcs(raw: np.ndarray) -> tuple[list[int], list[list[int]]]:
    """The (seed, crc) pairs keep_crcs kept in the records whose bytes are the rows of `raw` (uint8,
    one row per record), zeroing them (and the marker) in `raw`: (row numbers, [seed, crc] each).
    A constant number of numpy operations; none kept when the records have fewer than 8 inline bytes."""
    if raw.shape[1] < _INLINE_AT + 8:
        return [], []
    at = np.flatnonzero(raw[:, _PAD_AT] == CRC_KEPT)
    if len(at) == 0:
        return [], []
    pairs = raw[at, _INLINE_AT : _INLINE_AT + 8].copy().view("<u4").reshape(len(at), 2).tolist()
    raw[at, _PAD_AT : _INLINE_AT + 8] = 0
    return at.tolist(), pairs


def payload_view(records: np.ndarray, i: int):
    """Record i's payload as a zero-copy memoryview (inline, or read-only in its arena)."""
    r = records[i]
    n = int(r["payload_len"])
    if r["ext_class"]:
        return memoryview(arena_by_id(int(r["ext_arena"])).view(int(r["ext_off"]), n)).toreadonly()
    if n == 0:
        return memoryview(b"")
    return memoryview(records["payload"][i, :n])


def payload_views(records: np.ndarray) -> list:
    """Every record's payload as a zero-copy memoryview (valid while the records are in flight;
    read-only for payloads in an arena)."""
    lens = records["payload_len"].tolist()
    ext = records["ext_class"].tolist()
    pl = records["payload"] if "payload" in (records.dtype.names or ()) else None
    out = []
    empty = memoryview(b"")
    if not any(ext):
        if pl is None:
            return [empty] * len(lens)
        return [memoryview(pl[i, :n]) if n else empty for i, n in enumerate(lens)]
    offs = records["ext_off"].tolist()
    aids = records["ext_arena"].tolist()
    for i, n in enumerate(lens):
        if ext[i]:
            out.append(memoryview(arena_by_id(aids[i]).view(offs[i], n)).toreadonly())
        elif n and pl is not None:
            out.append(memoryview(pl[i, :n]))
        else:
            out.append(empty)
    return out


def payload_of(record) -> bytes:
    """The payload bytes of one record (inline or in its payload arena)."""
    n = int(record["payload_len"])
    if int(record["ext_class"]):
        return arena_by_id(int(record["ext_arena"])).view(int(record["ext_off"]), n).tobytes()
    return record["payload"][:n].tobytes() if n else b""


def payload_list(records: np.ndarray) -> list[bytes]:
    """Every record's payload as bytes (copies: safe to keep after the records are released)."""
    return [bytes(v) for v in payload_views(records)]
