"""Deterministic identities: event origins, output event ids and partition hashes.

Every output a flow writes into the engine carries an event id computed from what produced it, never
from a counter or the clock: (flow, operator, origin of the input event) for per-event paths, and
(flow, operator, key, window start or sequence) for stateful operators. Replaying the same log from a
snapshot therefore makes the same ids, and the engine's (topic, event id) deduplication stores each
output once.

Keys are hashed with a stable function (not Python's `hash`, which is salted per process for str and
bytes) so a key lands in the same partition in every run.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

M64 = (1 << 64) - 1
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix(a: np.ndarray, b) -> np.ndarray:
    """splitmix64(a * golden + b) over uint64 arrays (wrapping arithmetic); never 0."""
    a = np.asarray(a, dtype=np.uint64)
    z = a * _GOLD + np.asarray(b, dtype=np.uint64)
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    z = z ^ (z >> _S31)
    z[z == 0] = 1  # 0 means "no id" to the engine
    return z


def mix_int(a: int, b: int) -> int:
    """mix() for two Python ints."""
    return int(mix(np.array([a & M64], dtype=np.uint64), b & M64)[0])


def name_hash(name: str) -> int:
    """A stable 64-bit hash of a name (flow, operator, topic)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


_F64 = struct.Struct("<d")


def key_hash(key) -> int:
    """A stable 64-bit hash of one key: ints, floats, str, bytes, bool, None and tuples of them."""
    if isinstance(key, bool) or key is None:
        return int(bool(key)) + 0x5BD1E995
    if isinstance(key, int):
        return key & M64
    if isinstance(key, (np.integer,)):
        return int(key) & M64
    if isinstance(key, str):
        return name_hash(key)
    if isinstance(key, (bytes, bytearray, memoryview)):
        return int.from_bytes(hashlib.blake2b(bytes(key), digest_size=8).digest(), "little")
    if isinstance(key, (float, np.floating)):
        return int.from_bytes(_F64.pack(float(key)), "little")
    if isinstance(key, tuple):
        h = 0x7E57ED
        for k in key:
            h = mix_int(h, key_hash(k))
        return h
    raise TypeError(
        f"key {key!r} of type {type(key).__name__} is not allowed; allowed: int, float, str, "
        "bytes, bool, None or a tuple of them (keys must hash the same in every run)"
    )


class KeyHasher:
    """key_hash over a key column, with a bounded cache for per-event Python keys."""

    def __init__(self, max_cached: int = 1 << 20):
        self._cache: dict = {}
        self._max = max_cached

    def hashes(self, keys) -> np.ndarray:
        if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
            return keys.astype(np.uint64)
        if isinstance(keys, np.ndarray) and keys.dtype.kind in "US":
            keys = keys.tolist()
        cache = self._cache
        out = []
        for k in keys.tolist() if isinstance(keys, np.ndarray) else keys:
            try:
                h = cache.get(k)
            except TypeError:  # unhashable: key_hash says what is allowed
                h = None
            if h is None:
                h = key_hash(k)
                if len(cache) < self._max:
                    cache[k] = h
            out.append(h)
        return np.array(out, dtype=np.uint64)

    def one(self, key) -> int:
        return int(self.hashes([key])[0])


def partition_of(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of each key hash (mixed first: sequential int keys spread evenly)."""
    if partitions == 1:
        return np.zeros(len(hashes), dtype=np.intp)
    return (mix(hashes, 0x51ED) % np.uint64(partitions)).astype(np.intp)
