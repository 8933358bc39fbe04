"""Frame boundaries: find complete frames in a byte buffer and catch framing errors (sans-I/O).

The Python loop only follows length fields (one precompiled struct call per frame, and a numpy stride
check that swallows whole runs of equal-length frames in one step); validating the first byte and
the minimum length is vectorized, or plain Python for a few frames, where numpy's fixed cost per call
would dominate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eventstream.core.records import SMALL_BATCH
from eventstream.protocol.frames import LENGTH, MAX_PRIORITY, V1_HEADER_BYTES, V2_HEADER_BYTES, V2_MAGIC

# SMALL_BATCH (core/records.py, the engine's one threshold): up to this many frames per feed are decoded
# one by one with precompiled structs: the vectorized path has ~100-200 µs of fixed numpy cost per
# call, which at low load (a frame or two per read) is most of an event's ingest latency; per frame
# the struct path costs a few µs.

_NEED = [V1_HEADER_BYTES if b <= MAX_PRIORITY else V2_HEADER_BYTES if b == V2_MAGIC else 0 for b in range(256)]
_NEED_ARR = np.array(_NEED, dtype=np.int64)


def scan(src, pos: int, end: int, max_frame_bytes: int, *, arrays: bool = False) -> tuple[Any, Any, int, str | None]:
    """Find complete frames in src[pos:end]: (offsets, lengths, position after the last, fatal reason).
    Offsets and lengths are lists of ints; with `arrays`, int64 numpy arrays when there are more than
    SMALL_BATCH frames (the decoder's vectorized path takes them as they are: no conversions back and
    forth per read).

    Stops at the first incomplete frame (fatal None) or the first framing error (fatal = its reason,
    position = offset of the bad frame). The Python loop only follows length fields (on free-threaded
    3.13 every bytecode counts); validation of the first byte and the minimum length is vectorized
    afterwards, and an incomplete frame that can already be seen to be bad fails at once.
    """
    offs: list[int] = []
    add = offs.append
    pieces: list[np.ndarray] = []  # with `arrays`: the offsets so far, long uniform runs as np.arange
    unpack = LENGTH.unpack_from
    prev = -1
    cooldown = 0
    while end - pos >= 4:
        length = unpack(src, pos)[0]
        nxt = pos + 4 + length
        if nxt > end or length > max_frame_bytes:
            break
        add(pos)
        if length == prev and end - pos >= 8 * (4 + length):
            if cooldown:
                cooldown -= 1
            else:
                stride = 4 + length
                run = _uniform_run(src, pos, end, stride)
                if arrays and run >= 16:
                    pieces.append(np.asarray(offs, dtype=np.int64))
                    pieces.append(np.arange(pos + stride, pos + run * stride, stride, dtype=np.int64))
                    offs = []
                    add = offs.append
                else:
                    offs.extend(range(pos + stride, pos + run * stride, stride))
                pos += run * stride
                prev = -1
                if run < 16:  # short runs do not pay for the numpy call: try again later
                    cooldown = 32
                continue
        prev = length
        pos = nxt
    if pieces:
        if offs:
            pieces.append(np.asarray(offs, dtype=np.int64))
        return _checked(src, np.concatenate(pieces), None, pos, end, max_frame_bytes)
    lens = [0] * len(offs)
    if 0 < len(offs) <= SMALL_BATCH:  # a few frames: plain Python beats the numpy calls' fixed cost
        lens = []
        for k, o in enumerate(offs):
            ln = (offs[k + 1] if k + 1 < len(offs) else pos) - o - 4
            first = src[min(o + 4, end - 1)]
            need = _NEED[first]
            if need == 0 or ln < need:
                return offs[:k], lens, o, _framing_reason(ln, first, max_frame_bytes)
            lens.append(ln)
    elif offs:
        return _checked(src, np.asarray(offs, dtype=np.int64), None if arrays else offs, pos, end, max_frame_bytes)
    return _tail(src, offs, lens, pos, end, max_frame_bytes)


def _checked(src, oa: np.ndarray, offs: list[int] | None, pos: int, end: int, max_frame_bytes: int):
    """scan's vectorized check of the frames at `oa` (first byte, minimum length): arrays when `offs`
    (the same offsets as a list) is None, else lists; a framing error's prefix as lists."""
    lns = np.diff(oa, append=pos) - 4
    firsts = np.frombuffer(src, dtype=np.uint8, count=end)[np.minimum(oa + 4, end - 1)]
    needs = _NEED_ARR[firsts]
    bad = np.flatnonzero((needs == 0) | (lns < needs))
    if len(bad):
        k = int(bad[0])
        reason = _framing_reason(int(lns[k]), int(firsts[k]), max_frame_bytes)
        del firsts
        return oa[:k].tolist(), lns[:k].tolist(), int(oa[k]), reason
    del firsts
    if offs is None:
        return _tail(src, oa, lns, pos, end, max_frame_bytes)
    return _tail(src, offs, lns.tolist(), pos, end, max_frame_bytes)


def _tail(src, offs, lens, pos: int, end: int, max_frame_bytes: int) -> tuple[Any, Any, int, str | None]:
    """scan's answer once the complete frames are known: whether the incomplete rest at `pos` is
    already bad (fatal) or may still become a frame."""
    if end - pos >= 4:
        length = LENGTH.unpack_from(src, pos)[0]
        first = src[pos + 4] if end - pos > 4 else None
        if (
            length > max_frame_bytes
            or length == 0
            or (first is not None and (not _NEED[first] or length < _NEED[first]))
        ):
            return offs, lens, pos, _framing_reason(length, first, max_frame_bytes)
    return offs, lens, pos, None


def _framing_reason(length: int, first: int | None, max_frame_bytes: int) -> str:
    if length > max_frame_bytes:
        return (
            f"frame length {length} exceeds max_frame_bytes {max_frame_bytes} "
            f"(allowed: {V1_HEADER_BYTES + 1}..{max_frame_bytes})"
        )
    if length == 0 or first is None:
        return "frame length 0 is too short for any header (v1 needs >= 4, v2 >= 26)"
    need = _NEED[first]
    if not need:
        return (
            f"first byte {first:#04x} is not a protocol version; allowed: 0x00..0x04 "
            f"(v1 priority) or {V2_MAGIC:#04x} (v2 magic)"
        )
    return f"frame length {length} is too short for a v{1 if need == 3 else 2} header ({need} bytes)"


def _uniform_run(src, pos: int, end: int, stride: int) -> int:
    """How many complete frames from `pos` repeat the first one's length field (>= 1).

    Reads the length fields as one strided column of 32-bit words (no rows copied), over a window
    that grows 8x while every one matches, so a run costs O(run), not O(buffer).
    """
    total = (end - pos) // stride
    window = min(total, 64)
    while True:
        col = np.ndarray((window,), dtype=np.uint32, buffer=src, offset=pos, strides=(stride,))
        bad = col != col[0]
        del col
        if bad.any():
            return max(int(bad.argmax()), 1)
        if window == total:
            return total
        window = min(total, window * 8)
