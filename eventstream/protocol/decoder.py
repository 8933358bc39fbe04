"""Sans-I/O frame decoder: bytes in (any split), record batches and errors out.

How it stays cheap per frame: a short Python loop only finds frame boundaries (one precompiled
struct call per frame, and a numpy stride check that swallows whole runs of equal-length frames in one
step). Everything else is vectorized over the batch of boundaries: the fixed headers are gathered into
big-endian numpy arrays, validated with array comparisons, topics are grouped with np.unique and
interned once per distinct topic, payloads are copied with one fancy-indexing gather. The only other
per-frame Python call is zlib.crc32 on v2 frames, except in a long run of frames of one size, whose
CRCs are computed by columns (_crc_columns: one table lookup per byte position over all the frames).
`bench/ingest.py --reader` measures the reader's CPU per event.

BATCH frames (kind 11) carry many events: their fixed 24-byte record table is read with one
numpy.frombuffer, their one CRC is checked once, topics are interned once per batch, and payloads are
copied with a constant number of numpy operations per batch. A batch of N events takes N consecutive
indices (ACKs count events, a rejected event is NACKed by its own index). The records of a read are
written into one array (each BATCH frame its slice), not concatenated afterwards.

Errors: a *framing* error (unknown first byte, length over max_frame_bytes, length too short for its
header) means frame boundaries can no longer be trusted: it is reported with fatal=True and the decoder
stops (the connection must close). A *content* error rejects only its own frame.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from eventstream.core.crc import COMBINE_MIN_BYTES, crc32
from eventstream.core.payloads import keep_crcs
from eventstream.core.records import FLAG_ACK_SHIFT, FLAG_V2, record_dtype
from eventstream.core.topics import TopicLimitError
from eventstream.protocol.frames import (
    BATCH_HEAD,
    BATCH_RECORD_BYTES,
    BATCH_RECORD_DTYPE,
    DEFAULT_MAX_FRAME_BYTES,
    KIND_BATCH,
    KIND_EVENT,
    KIND_NAMES,
    LENGTH_BYTES,
    MAX_PRIORITY,
    MAX_TOPIC_BYTES,
    V1_HEAD,
    V1_HEADER_BYTES,
    V1_HEADER_DTYPE,
    V2_HEAD,
    V2_HEADER_BYTES,
    V2_HEADER_DTYPE,
    V2_MAGIC,
)
from eventstream.protocol.framing import SMALL_BATCH, scan

_EMPTY_INDICES = np.zeros(0, dtype=np.uint64)
TOPIC_REFUSED = 0xFFFFFFFF  # topic_id() of a new topic past the table's bound (never a real id)


@dataclass(slots=True)
class FrameError:
    """One rejected frame: where it was, whether the stream is lost, why, and what could be parsed."""

    index: int  # 1-based frame number on this stream (connection or UDP socket)
    fatal: bool  # framing error: the connection must close
    reason: str
    event_id: int = 0
    topic: str = ""
    priority: int = -1  # -1 = not parsed
    version: int = 0  # 0 = not parsed
    error_class: str = "framing"  # framing | topic_len | kind | priority | payload_too_large | topic_utf8 | crc
    #                               | too_many_topics | batch | forbidden (a topic table's own class)


class TopicInterner(Protocol):
    """What the decoder needs of a topic table (core.topics.TopicTable, or a gate in front of one):
    the id of a name, or TopicLimitError (a subclass names its class) to refuse it."""

    def intern(self, name: bytes | str) -> int: ...


_NO_STORE = bytearray()
_MIN_STORE = 64 << 10


class FrameDecoder:
    """Decode one byte stream (a TCP connection) into record batches.

    feed(data) -> (records, errors); feed_indexed also returns each record's 1-based frame index (used
    for NACKs). After a fatal error the decoder is `failed` and ignores further input.
    """

    def __init__(
        self,
        topics: TopicInterner,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        payload_bytes: int = 448,
        conn_id: int = 0,
        ack_default: int = 0,
        payloads=None,
    ):
        """`ack_default`: the ACK mode (core.records.ACK_*) stored in v2 records whose frame asks for
        none (flags bits 0-1 = 0). `payloads`: the PayloadArena (core/payloads.py) for payloads over
        `payload_bytes`; without one such a payload is rejected (payload_too_large).

        When the arena has no room for a payload, decoding stops before that frame: the frames from
        there on stay buffered (`arena_blocked` = the bytes the first of them needs) until the caller
        feeds again (feed(b"")) once `payloads.has_room(arena_blocked)`: the producer is pushed back."""
        self.topics = topics
        self.ack_default = ack_default & 3
        self.max_frame_bytes = max_frame_bytes
        self.dtype = record_dtype(payload_bytes)
        self.payload_bytes = payload_bytes
        self.conn_id = conn_id
        self.principal_key = 0  # stamped into every record (`principal`): set by ingest/tenants.admit
        self.frames_seen = 0
        self.failed = False
        # bytes of incomplete frames, kept for the next feed: the first `_have` bytes of `_store` (a buffer
        # reused while the stream keeps splitting frames across reads, let go once nothing is kept)
        self._store = _NO_STORE
        self._have = 0
        self._topic_cache: dict[bytes, int] = {}
        self.topic_limit_reason = ""
        # reason and class per refused topic name (a table's TopicLimitError may carry its own
        # `error_class`, e.g. "forbidden" from a connection's TopicGate, ingest/tenants.py); bounded
        self.topic_refusals: dict[bytes, tuple[str, str]] = {}
        self.payloads = payloads
        self.max_payload = payloads.max_payload if payloads is not None else payload_bytes
        # payloads from this size on that go to the arena keep their CRC for the log writer (one pass
        # over their bytes, not two: core/payloads.py); 0 = none do (no arena, or no 8 inline bytes)
        keeps = payloads is not None and payload_bytes >= 8
        self.crc_keep_min = max(COMBINE_MIN_BYTES, payload_bytes + 1) if keeps else 0
        self.arena_blocked = 0  # bytes the first undecoded frame needs in the payload arena (0: none)
        self.arena_stop = -1  # set by decode_frames: position of the frame it stopped at, -1 = none
        self.next_index = 1  # set by decode_frames: the index after the last event (or frame) it consumed
        self.batch_skip = 0  # events of the first buffered BATCH frame already delivered (the arena was full)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back until the rest arrives."""
        return self._have

    def feed(self, data) -> tuple[np.ndarray, list[FrameError]]:
        records, _indices, errors = self.feed_indexed(data)
        return records, errors

    def feed_indexed(
        self, data, urgent: bytes | None = None, handover=None
    ) -> tuple[np.ndarray, np.ndarray, list[FrameError]]:
        """Decode `data` (records, 1-based frame indices, errors). With `urgent` (256 bytes, non-zero
        at the priorities to decode first) and `handover(records, indices)`: in a read of whole v2
        EVENT frames with inline payloads, the frames of those priorities are decoded and handed over
        before the others are decoded (their order among themselves kept; indices are the frames'
        own); the result is then the others."""
        if self.failed:
            return np.zeros(0, self.dtype), _EMPTY_INDICES, []
        if not self._have and len(data) >= _ONE_V2_MIN and data[LENGTH_BYTES] == V2_MAGIC:
            # the usual read at low load: exactly one whole v2 EVENT frame, nothing buffered
            length = _LENGTH.unpack_from(data, 0)[0]
            if len(data) == LENGTH_BYTES + length and length <= self.max_frame_bytes:
                first = self.frames_seen + 1
                one = _decode_small(self, data, [0], [length], first, None)
                if one is not None:  # else (a content error, a payload for the arena): the general path
                    self.arena_blocked = 0
                    self.arena_stop, self.batch_skip = -1, 0
                    self.frames_seen = self.next_index = first
                    self.next_index += 1
                    return one[0], one[1], one[2]
        have = self._have
        if have:  # the rest of a frame: appended behind the bytes kept (one copy, into a reused buffer)
            end = have + len(data)
            store = self._store if end <= len(self._store) else self._grow(end)
            store[have:end] = data
            src = memoryview(store)[:end]
        else:  # decoded where it lies (the reader's buffer): only an incomplete tail is copied
            src = data
            end = len(src)
        offs, lens, pos, fatal = scan(src, 0, end, self.max_frame_bytes, arrays=True)
        self.arena_blocked = 0
        parted = None
        if urgent is not None and len(offs) > 1 and not self.batch_skip:
            parted = self._urgent_then_rest(src, offs, lens, urgent, handover)
        if parted is not None:
            records, indices, errors, bad_at = parted
        else:
            records, indices, errors, bad_at = decode_frames(
                self, src, offs, lens, self.frames_seen + 1, skip=self.batch_skip
            )
        stop = self.arena_stop
        consumed = self.next_index - 1  # frames_seen after what decode_frames consumed
        if stop >= 0:  # the payload arena is full: keep the frames from `stop` on for later
            self.arena_stop = -1
            self.frames_seen = consumed
            self._keep(src, int(offs[stop]), end, have)
        elif bad_at is not None:  # a header whose topic runs past the frame end: already the last error
            self.frames_seen = consumed
            self.failed = True
            self._keep(src, end, end, have)
        elif fatal is not None:
            self.frames_seen = consumed + 1
            version = 2 if end - pos > 4 and src[pos + 4] == V2_MAGIC else 0
            errors.append(FrameError(self.frames_seen, True, fatal, version=version))
            self.failed = True
            self._keep(src, end, end, have)
        else:
            self.frames_seen = consumed
            self._keep(src, pos, end, have)
        return records, indices, errors

    def _keep(self, src, at: int, end: int, had: int) -> None:
        """Keep src[at:end] (frames not complete, or not decoded yet) at the start of the buffer for
        the next feed; `had` > 0: src is the buffer itself (a move within it, memmove). Nothing to keep:
        the buffer is let go (an idle connection holds no memory)."""
        n = end - at
        if n == 0:
            self._have = 0
            self._store = _NO_STORE
        elif had:
            if at:
                m = memoryview(self._store)
                m[:n] = m[at:end]
                m.release()
            self._have = n
        else:
            store = self._store if n <= len(self._store) else self._grow(n)
            store[:n] = src[at:end]
            self._have = n

    def _grow(self, need: int) -> bytearray:
        """A buffer of at least `need` bytes holding the bytes kept so far (grown by a quarter at least,
        as a bytearray grows: a frame arriving in many reads costs few copies)."""
        store = bytearray(max(need, len(self._store) * 5 // 4, _MIN_STORE))
        if self._have:
            store[: self._have] = memoryview(self._store)[: self._have]
        self._store = store
        return store

    def _urgent_then_rest(self, src, offs, lens, urgent: bytes, handover):
        """feed_indexed's `urgent` split: None when it does not apply (then nothing was handed over).
        The urgent frames are decoded with struct calls and handed over; then the whole read is decoded
        as usual (frame indices, errors and runs of equal frames as without the split) and what was
        handed over is left out of the result."""
        up = _urgent_positions(src, offs, lens, urgent, self.payload_bytes)
        if up is None:
            return None
        index = self.frames_seen + 1
        if isinstance(offs, np.ndarray):  # framing.scan's arrays (a read of more than SMALL_BATCH frames)
            uoffs, ulens = offs[up].tolist(), lens[up].tolist()
        else:
            uoffs, ulens = [offs[j] for j in up], [lens[j] for j in up]
        got = _decode_small(self, src, uoffs, ulens, index, None)
        if got is None:  # a content error among them: decode the read as one (the errors in frame order)
            return None
        handover(got[0], np.asarray(up, dtype=np.uint64) + np.uint64(index))
        records, indices, errors, bad_at = decode_frames(self, src, offs, lens, index)
        assert bad_at is None and self.arena_stop < 0  # excluded by _urgent_positions
        handed = np.zeros(len(offs), dtype=bool)
        handed[up] = True
        if len(indices):
            keep = ~handed[(indices - np.uint64(index)).astype(np.intp)]
            records, indices = records[keep], indices[keep]
        if errors:  # (the struct path accepted them: never reported twice)
            errors = [e for e in errors if not handed[e.index - index]]
        return records, indices, errors, None

    # topic interning with a per-decoder cache (one dict lookup per distinct topic per batch)
    def topic_id(self, name: bytes) -> int:
        """Topic id for `name`, 0 when it is not UTF-8, TOPIC_REFUSED when it is new and the topic
        table is full (not cached: the answer is the same until restart, but the cache is for hits)."""
        tid = self._topic_cache.get(name)
        if tid is None:
            refused = self.topic_refusals.get(name)
            if refused is not None:  # asked again (the vectorized path after the small one): the same answer,
                self.topic_limit_reason = refused[0]  # and a tenant's quota counts the refusal once
                return TOPIC_REFUSED
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                tid = 0
            else:
                try:
                    tid = self.topics.intern(name)
                except TopicLimitError as exc:
                    self.topic_limit_reason = str(exc)
                    if len(self.topic_refusals) < 1024:
                        self.topic_refusals[bytes(name)] = (str(exc), getattr(exc, "error_class", "too_many_topics"))
                    return TOPIC_REFUSED
            if len(self._topic_cache) < 4096:
                self._topic_cache[name] = tid
        return tid


# content-error codes (0 = fine)
(
    _OK,
    _E_TOPIC_LEN,
    _E_KIND,
    _E_PRIORITY,
    _E_TOO_LARGE,
    _E_UTF8,
    _E_CRC,
    _E_SHORT,
    _E_TOPICS,
    _E_FLAGS,
    _E_TOPIC_INDEX,
) = range(11)
_E_DONE = 255  # a BATCH record delivered by an earlier feed (the payload arena was full then)


def decode_frames(
    dec: FrameDecoder,
    src,
    offs: list[int] | np.ndarray,
    lens: list[int] | np.ndarray,
    first_index: int,
    ingest_ts: int | None = None,
    skip: int = 0,
):
    """Vectorized decode of complete frames at `offs` in `src`.

    Returns (records, indices, errors, bad_at): bad_at is the position in `offs` of a frame whose
    topic runs past its end, or of a BATCH frame whose tables do not fit it (a framing error: frames
    from there on are not decoded; its error is last in `errors`), else None. Sets dec.next_index to
    the index after the last event consumed (a BATCH frame of N events takes N indices; a frame
    refused as a whole takes one) and, when the payload arena stopped decoding (dec.arena_stop >= 0)
    inside a BATCH frame, dec.batch_skip to how many of its events were delivered: pass it back as
    `skip` when the same frame is decoded again.
    """
    dec.arena_stop = -1
    dec.batch_skip = 0
    n = len(offs)
    if n == 0:
        dec.next_index = first_index
        return np.zeros(0, dec.dtype), _EMPTY_INDICES, [], None
    at = _batch_positions(src, offs)
    if not at:
        return _decode_singles(dec, src, offs, lens, first_index, ingest_ts)
    if ingest_ts is None:
        ingest_ts = time.monotonic_ns()
    # one record array for the whole read, each BATCH frame decoded straight into its slice: with
    # 512-byte records, concatenating the pieces afterwards cost as much as decoding them. Room: a
    # frame's event count, bounded by what its length can hold (24 bytes a record), 1 per single frame.
    room = n - len(at)
    for b in at:
        room += min(
            _BATCH_COUNT.unpack_from(src, int(offs[b]) + _BATCH_COUNT_AT)[0], int(lens[b]) // BATCH_RECORD_BYTES
        )
    dst = np.zeros(room, dec.dtype)
    vdst = dst.view(np.dtype((np.void, dec.dtype.itemsize)))
    filled = 0
    idxs, errors = [], []
    bad_at = None
    index = first_index
    a = 0
    for b in at + [n]:
        if a < b:  # a run of single frames
            r, i, e, bad = _decode_singles(dec, src, offs[a:b], lens[a:b], index, ingest_ts)
            if len(r):  # (opaque rows: a structured copy goes field by field)
                vdst[filled : filled + len(r)] = r.view(vdst.dtype)
                filled += len(r)
            idxs.append(i)
            errors.extend(e)
            if dec.arena_stop >= 0:
                dec.arena_stop += a
                break
            if bad is not None:
                bad_at = a + bad
                break
            index = dec.next_index
        if b == n:
            break
        r, i, e, fatal = _decode_batch(
            dec, src, int(offs[b]), int(lens[b]), index, skip if b == 0 else 0, ingest_ts, dst[filled:]
        )
        filled += len(r)
        idxs.append(i)
        errors.extend(e)
        if dec.arena_stop >= 0:
            dec.arena_stop = b
            break
        if fatal:
            bad_at = b
            break
        index = dec.next_index
        a = b + 1
    return dst[:filled], idxs[0] if len(idxs) == 1 else np.concatenate(idxs), errors, bad_at


URGENT_SMALL = 64  # at most this many urgent frames in a read are decoded first (with struct calls)


def _urgent_positions(src, offs, lens, urgent: bytes, cap: int) -> list[int] | None:
    """Positions of the frames whose priority `urgent` marks, when every frame is a v2 EVENT frame whose
    topic fits it and whose payload is inline (at most `cap` bytes: no payload arena, so decoding cannot
    stop part way), some but not all are marked, and at most URGENT_SMALL of them; else None."""
    n = len(offs)
    if n <= 4 * SMALL_BATCH:  # plain ints; the cheap question first (a bulk-only read stops there)
        if isinstance(offs, np.ndarray):
            offs, lens = offs.tolist(), lens.tolist()
        up = [j for j in range(n) if lens[j] >= V2_HEADER_BYTES and urgent[src[offs[j] + LENGTH_BYTES + 2]]]
        if not up or len(up) == n:
            return None
        for j in range(n):
            o = offs[j] + LENGTH_BYTES
            length = lens[j]
            if length < V2_HEADER_BYTES or src[o] != V2_MAGIC or src[o + 1] != KIND_EVENT:
                return None
            if not 0 <= length - V2_HEADER_BYTES - ((src[o + 20] << 8) | src[o + 21]) <= cap:
                return None
    else:
        ln = np.asarray(lens, dtype=np.int64)
        if int(ln.min()) < V2_HEADER_BYTES:
            return None
        arr = np.frombuffer(src, dtype=np.uint8)
        at = np.asarray(offs, dtype=np.int64) + LENGTH_BYTES
        plen = ln - V2_HEADER_BYTES - ((arr[at + 20].astype(np.int64) << 8) | arr[at + 21])
        ok = bool(((arr[at] == V2_MAGIC) & (arr[at + 1] == KIND_EVENT) & (plen >= 0) & (plen <= cap)).all())
        hit = np.frombuffer(urgent, dtype=np.uint8)[arr[at + 2]] != 0
        del arr
        if not ok:
            return None
        k = int(np.count_nonzero(hit))
        if not 0 < k <= URGENT_SMALL or k == n:
            return None
        up = np.flatnonzero(hit).tolist()
    return up if len(up) <= URGENT_SMALL else None


def _batch_positions(src, offs: list[int] | np.ndarray) -> list[int]:
    """Positions in `offs` of BATCH frames (v2 magic, kind 11)."""
    if len(offs) <= 4 * SMALL_BATCH:
        return [
            j
            for j, o in enumerate(offs)
            if src[o + LENGTH_BYTES + 1] == KIND_BATCH and src[o + LENGTH_BYTES] == V2_MAGIC
        ]
    arr = np.frombuffer(src, dtype=np.uint8)
    o = np.asarray(offs, dtype=np.int64) + LENGTH_BYTES
    out = np.flatnonzero((arr[o + 1] == KIND_BATCH) & (arr[o] == V2_MAGIC)).tolist()
    del arr
    return out


def _decode_singles(dec: FrameDecoder, src, offs, lens, first_index: int, ingest_ts: int | None):
    # offs, lens: lists of ints, or int64 arrays (framing.scan's `arrays`)
    """decode_frames for frames that are not BATCH frames (v1, v2 EVENT, and anything refused)."""
    n = len(offs)
    dtype = dec.dtype
    if n <= SMALL_BATCH:
        if isinstance(offs, np.ndarray):  # (a few frames between BATCH frames: plain ints for the struct path)
            offs, lens = offs.tolist(), lens.tolist()
        small = _decode_small(dec, src, offs, lens, first_index, ingest_ts)
        if small is not None:
            dec.next_index = first_index + n
            return small
    arr = np.frombuffer(src, dtype=np.uint8)
    off = np.asarray(offs, dtype=np.int64)
    length = np.asarray(lens, dtype=np.int64)
    first = arr[off + LENGTH_BYTES]
    v2 = first == V2_MAGIC
    err = np.zeros(n, dtype=np.uint8)
    rec = np.zeros(n, dtype=dtype)
    hdr = np.where(v2, V2_HEADER_BYTES, V1_HEADER_BYTES)
    tlen = np.zeros(n, dtype=np.int64)
    crc = np.zeros(n, dtype=np.uint32)
    kind = np.full(n, KIND_EVENT, dtype=np.uint8)
    i1 = np.flatnonzero(~v2)
    if len(i1):
        h = _gather(arr, off[i1], V1_HEADER_DTYPE)
        tlen[i1] = h["topic_len"]
        rec["priority"][i1] = h["priority"]
    i2 = np.flatnonzero(v2)
    if len(i2):
        h = _gather(arr, off[i2], V2_HEADER_DTYPE)
        tlen[i2] = h["topic_len"]
        kind[i2] = h["kind"]
        crc[i2] = h["crc32"]
        rec["priority"][i2] = h["priority"]
        rec["event_id"][i2] = h["event_id"]
        rec["producer_ts"][i2] = h["timestamp_ns"]
        rec["crc32"][i2] = h["crc32"]
        mode = h["flags"] & 3  # bits 0-1: the ACK mode the frame asks for, 0 = the connection's
        if dec.ack_default:
            mode[mode == 0] = dec.ack_default
        rec["flags"][i2] = FLAG_V2 | (mode << FLAG_ACK_SHIFT)
    plen = length - hdr - tlen
    tstart = off + LENGTH_BYTES + hdr
    err[plen > dec.max_payload] = _E_TOO_LARGE
    err[rec["priority"] > MAX_PRIORITY] = _E_PRIORITY
    err[kind != KIND_EVENT] = _E_KIND
    err[(tlen == 0) | (tlen > MAX_TOPIC_BYTES)] = _E_TOPIC_LEN
    short = (plen < 0) & (err == _OK)
    bad_at = None
    if short.any():
        bad_at = int(np.flatnonzero(short)[0])
        err[bad_at] = _E_SHORT
    live = n if bad_at is None else bad_at + 1
    ok = err[:live] == _OK
    okidx = np.flatnonzero(ok)
    if len(okidx):
        _fill_topics(dec, arr, rec, err, okidx, tstart, tlen)
    v2ok = okidx[v2[okidx] & (err[okidx] == _OK)]
    kept = None  # frame j -> (seed, crc32(payload, seed)) for payloads of dec.crc_keep_min bytes or more
    if len(v2ok) and dec.crc_keep_min:
        big = plen[v2ok] >= dec.crc_keep_min
        if big.any():
            kept = _kept_crcs_singles(src, v2ok[big], tstart, tlen, plen, crc, err)
            v2ok = v2ok[~big]
    if len(v2ok):  # each v2 frame's own CRC (topic and payload)
        got = _crc_columns(arr, tstart[v2ok], (off + LENGTH_BYTES + length)[v2ok])
        if got is None:  # one zlib call per frame, iterated in C
            mv = memoryview(src)
            spans = map(slice, tstart[v2ok].tolist(), (off + LENGTH_BYTES + length)[v2ok].tolist())
            got = np.fromiter(map(zlib.crc32, map(mv.__getitem__, spans)), dtype=np.uint32, count=len(v2ok))
            mv.release()
        err[v2ok[got != crc[v2ok]]] = _E_CRC
    keep = np.flatnonzero(err[:live] == _OK) if bad_at is None else np.flatnonzero(err[:bad_at] == _OK)
    ext = None
    if len(keep) and dec.payloads is not None:
        big = plen[keep] > dec.payload_bytes
        if big.any():
            ext = np.flatnonzero(big)
            offs_ext, cls_ext = dec.payloads.claim(plen[keep[ext]])
            if len(offs_ext) < len(ext):  # the arena is full: stop before the first that did not fit
                stop = int(keep[ext[len(offs_ext)]])
                dec.arena_stop = stop
                dec.next_index = first_index + stop
                dec.arena_blocked = int(plen[stop])
                live = stop
                if bad_at is not None and bad_at >= stop:
                    bad_at = None
                keep = keep[keep < stop]
                ext = ext[: len(offs_ext)]
    if len(keep) == n:  # every frame kept (the usual read): no copy
        out = rec
    else:  # opaque rows: a structured fancy-index copy goes field by field
        out = rec.view(np.dtype((np.void, dtype.itemsize)))[keep].view(dtype)
    if len(keep):
        pl = plen[keep]
        out["payload_len"] = pl
        out["conn_id"] = dec.conn_id
        out["principal"] = dec.principal_key
        out["ingest_ts"] = time.monotonic_ns() if ingest_ts is None else ingest_ts
        pstart = (tstart + tlen)[keep]
        if ext is not None:
            _copy_ext(dec.payloads, arr, out, pstart, pl, ext, offs_ext, cls_ext)
            pl = pl.copy()
            pl[ext] = 0
        _copy_payloads(arr, out, pstart, pl)
        if kept is not None and ext is not None:
            _keep(out, ext, keep[ext], kept)
    errors = []
    bad = np.flatnonzero(err[:live] != _OK)
    if len(bad):
        errors = [
            _describe(dec, arr, int(j), first_index + int(j), int(err[j]), rec, v2, kind, tstart, tlen, plen, length)
            for j in bad.tolist()
        ]
    del arr
    if dec.arena_stop < 0:
        dec.next_index = first_index + (n if bad_at is None else bad_at + 1)
    return out, (first_index + keep).astype(np.uint64), errors, bad_at


_BATCH_BODY = LENGTH_BYTES + V2_HEADER_BYTES  # a BATCH frame's topic table starts here
_BATCH_COUNT = struct.Struct(">I")  # a BATCH frame's event count (BATCH_HEAD's sixth field)
_BATCH_COUNT_AT = 8
_VOID_ROW = np.dtype((np.void, BATCH_RECORD_BYTES))


def _decode_batch(dec: FrameDecoder, src, o: int, length: int, first_index: int, skip: int, ingest_ts: int, dst):
    """Decode the BATCH frame at `o` whose events from `skip` on are still to deliver; `first_index` is
    the index of event `skip`. Its records are written to the start of `dst` (zeroed records with room
    for its count). Returns (records: that part of dst, indices, errors, fatal); sets dec.next_index,
    and dec.arena_stop = 0 and dec.batch_skip when the payload arena stopped it part way."""
    _l, _m, _k, reserved, hflags, count, tcount, tbytes, zeros, crc = BATCH_HEAD.unpack_from(src, o)
    base = first_index - skip  # index of event 0
    body = o + _BATCH_BODY
    end = o + LENGTH_BYTES + length
    table_at = body + tbytes
    pay_at = table_at + BATCH_RECORD_BYTES * count
    empty = dst[:0]
    if count == 0 or tcount == 0 or pay_at > end:
        dec.next_index = first_index + 1
        need = V2_HEADER_BYTES + tbytes + BATCH_RECORD_BYTES * count
        reason = (
            f"batch frame of {count} events and topic_count {tcount} is not allowed; allowed: 1 or more of each"
            if count == 0 or tcount == 0
            else f"batch frame length {length} is too short for its {tbytes}-byte topic table and {count} "
            f"records of {BATCH_RECORD_BYTES} bytes (needs >= {need})"
        )
        return empty, _EMPTY_INDICES, [FrameError(first_index, True, reason, version=2)], True
    dec.next_index = base + count
    kept = None  # event j -> (seed, crc32(payload, seed)) for payloads of dec.crc_keep_min bytes or more
    mv = memoryview(src)
    try:
        if dec.crc_keep_min and end - pay_at >= dec.crc_keep_min:
            got, kept = _batch_crc_keeping(dec.crc_keep_min, src, mv, body, end, table_at, pay_at, count)
        else:
            got = crc32(mv[body:end])
        crc_ok = got == crc
        names = []
        whole = None
        if reserved or hflags > 3 or any(zeros):
            whole = ("batch header reserved bits are not 0 (byte 6, flags bits 2-7, bytes 18-25); allowed: 0", "batch")
        elif not crc_ok:
            whole = ("crc32 mismatch (zlib.crc32 of the batch's topic table, record table and payloads)", "crc")
        else:
            p = body
            for _ in range(tcount):
                if p >= table_at:
                    break
                tl = src[p]
                names.append(bytes(mv[p + 1 : p + 1 + tl]))
                p += 1 + tl
            if p != table_at or len(names) != tcount:
                whole = (
                    f"batch topic table of {tbytes} bytes does not hold exactly its topic_count {tcount} "
                    "topics (u8 length + name each)",
                    "batch",
                )
    finally:
        mv.release()
    if whole is None:
        # a copy (src may be the decoder's buffer, which shrinks later), made as opaque rows: a
        # structured copy goes field by field
        table = np.frombuffer(src, dtype=_VOID_ROW, count=count, offset=table_at).copy().view(BATCH_RECORD_DTYPE)
        plen = table["payload_len"].astype(np.int64)
        carried = end - pay_at
        if int(plen.sum()) != carried:
            whole = (
                f"batch payload lengths sum to {int(plen.sum())} bytes but the frame carries {carried}; allowed: equal",
                "batch",
            )
    if whole is not None:
        errors = [FrameError(base + j, False, whole[0], version=2, error_class=whole[1]) for j in range(skip, count)]
        return empty, _EMPTY_INDICES, errors, False
    prio = table["priority"]
    rflags = table["flags"]
    ti = table["topic"].astype(np.int64)
    err = np.zeros(count, dtype=np.uint8)
    err[plen > dec.max_payload] = _E_TOO_LARGE
    err[prio > MAX_PRIORITY] = _E_PRIORITY
    err[rflags > 3] = _E_FLAGS
    inrange = ti < tcount
    err[~inrange] = _E_TOPIC_INDEX
    err[:skip] = _E_DONE
    tid_of = np.zeros(tcount, dtype=np.uint32)
    terr = np.zeros(tcount, dtype=np.uint8)
    live = err == _OK
    if tcount == 1:
        used = [0] if live.any() else []
    else:
        used = np.flatnonzero(np.bincount(ti[live], minlength=tcount)).tolist()
    for k in used:  # per distinct topic of the batch, not per event
        name = names[k]
        if not name:
            terr[k] = _E_TOPIC_LEN
            continue
        tid = dec.topic_id(name)
        if tid == TOPIC_REFUSED:
            terr[k] = _E_TOPICS
        elif tid == 0:
            terr[k] = _E_UTF8
        else:
            tid_of[k] = tid
    if tcount == 1:  # (the usual batch: one topic)
        tsafe = None
        if terr[0]:
            err[live] = terr[0]
    else:
        tsafe = np.where(inrange, ti, 0)
        err[live] = terr[tsafe[live]]
    keep = np.flatnonzero(err == _OK)
    whole_kept = len(keep) == count
    ext = offs_ext = cls_ext = None
    stop = count
    if len(keep) and dec.payloads is not None:
        big = plen[keep] > dec.payload_bytes
        if big.any():
            ext = np.flatnonzero(big)
            offs_ext, cls_ext = dec.payloads.claim(plen[keep[ext]])
            if len(offs_ext) < len(ext):  # the arena is full: deliver up to the first that did not fit
                stop = int(keep[ext[len(offs_ext)]])
                keep = keep[keep < stop]
                whole_kept = False
                ext = ext[: len(offs_ext)]
                dec.arena_stop = 0
                dec.batch_skip = stop
                dec.arena_blocked = int(plen[stop])
                dec.next_index = base + stop
    out = dst[: len(keep)]
    if len(keep):
        t = table if whole_kept else table[keep]
        pl = plen if whole_kept else plen[keep]
        out["priority"] = t["priority"]
        out["event_id"] = t["event_id"]
        out["producer_ts"] = t["timestamp_ns"]
        mode = t["flags"] & 3
        default = (hflags & 3) or dec.ack_default
        if default:
            mode[mode == 0] = default
        out["flags"] = FLAG_V2 | (mode << FLAG_ACK_SHIFT)
        out["topic_id"] = tid_of[0] if tsafe is None else tid_of[tsafe[keep]]
        out["conn_id"] = dec.conn_id
        out["principal"] = dec.principal_key
        out["ingest_ts"] = ingest_ts
        out["payload_len"] = pl
        starts = pay_at + np.cumsum(plen) - plen
        arr = np.frombuffer(src, dtype=np.uint8)
        try:
            pstart = starts if whole_kept else starts[keep]
            if ext is not None:
                _copy_ext(dec.payloads, arr, out, pstart, pl, ext, offs_ext, cls_ext)
                pl = pl.copy()
                pl[ext] = 0
            if ext is None and whole_kept and int(plen.min()) == int(plen.max()):
                w = int(plen[0])  # every event the same size and all of them kept: one reshape
                if w:
                    out["payload"][:, :w] = arr[pay_at : pay_at + count * w].reshape(count, w)
            else:
                _copy_packed(arr, out, pstart, pl)
            if kept is not None and ext is not None:
                _keep(out, ext, keep[ext], kept)
        finally:
            del arr
    errors = []
    bad = np.flatnonzero((err[:stop] != _OK) & (err[:stop] != _E_DONE))
    if len(bad):
        errors = [_describe_batch(dec, base + j, int(err[j]), table[j], names, tcount) for j in bad.tolist()]
    return out, (base + keep).astype(np.uint64), errors, False


def _kept_crcs_singles(src, big: np.ndarray, tstart, tlen, plen, crc, err) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CRC check of the v2 frames `big` (large payloads), reading each payload once as
    zlib.crc32(payload, zlib.crc32(topic)) (the frame's CRC); marks mismatches in `err`. Returns
    (frames, seeds, crcs) for _keep. Per frame: its payload is large, zlib's pass dominates."""
    seeds = np.zeros(len(big), dtype=np.uint32)
    crcs = np.zeros(len(big), dtype=np.uint32)
    mv = memoryview(src)
    try:
        for k, (t, tl, n) in enumerate(zip(tstart[big].tolist(), tlen[big].tolist(), plen[big].tolist(), strict=True)):
            seed = zlib.crc32(mv[t : t + tl])  # (a topic: a few bytes)
            seeds[k] = seed
            crcs[k] = crc32(mv[t + tl : t + tl + n], seed)
    finally:
        mv.release()
    err[big[crcs != crc[big]]] = _E_CRC
    return big, seeds, crcs


def _batch_crc_keeping(kmin: int, src, mv, body: int, end: int, table_at: int, pay_at: int, count: int):
    """zlib.crc32 of a BATCH frame's bytes [body, end), computed in pieces so that each payload of
    `kmin` bytes or more is read once as zlib.crc32(payload, seed), seed = the CRC of the bytes before
    it: (the frame's CRC, (events, seeds, crcs) for _keep or None). The same value as one call."""
    plen = np.frombuffer(src, dtype=BATCH_RECORD_DTYPE, count=count, offset=table_at)["payload_len"].astype(np.int64)
    big = np.flatnonzero(plen >= kmin)
    if len(big) == 0 or int(plen.sum()) != end - pay_at:  # (a length mismatch is refused after the CRC)
        return crc32(mv[body:end]), None
    starts = (pay_at + np.cumsum(plen) - plen)[big].tolist()
    seeds = np.zeros(len(big), dtype=np.uint32)
    crcs = np.zeros(len(big), dtype=np.uint32)
    c, p = 0, body
    for k, (s, n) in enumerate(zip(starts, plen[big].tolist(), strict=True)):
        c = crc32(mv[p:s], c)
        seeds[k] = c
        c = crc32(mv[s : s + n], c)
        crcs[k] = c
        p = s + n
    return crc32(mv[p:end], c), (big, seeds, crcs)


def _keep(out: np.ndarray, ext: np.ndarray, ext_src: np.ndarray, kept) -> None:
    """Keep the payload CRCs of the arena records out[ext] (frame or event ext_src each) that have
    one in `kept` (frames or events, seeds, crcs; sorted): payloads.keep_crcs."""
    where, seeds, crcs = kept
    pos = np.searchsorted(where, ext_src)
    pos = np.minimum(pos, len(where) - 1)
    hit = where[pos] == ext_src
    if hit.any():
        keep_crcs(out, ext[hit], seeds[pos[hit]], crcs[pos[hit]])


def _copy_packed(arr: np.ndarray, out: np.ndarray, pstart: np.ndarray, pl: np.ndarray) -> None:
    """Copy payloads lying at arr[pstart[i]:pstart[i] + pl[i]] into out[i]'s inline bytes, with a
    constant number of numpy operations over the payload bytes (no n x width gather)."""
    total = int(pl.sum())
    if total == 0:
        return
    rows = np.repeat(np.arange(len(pl)), pl)
    within = np.arange(total) - np.repeat(np.cumsum(pl) - pl, pl)
    out["payload"][rows, within] = arr[np.repeat(pstart, pl) + within]


def _describe_batch(dec, index: int, code: int, row, names: list[bytes], tcount: int) -> FrameError:
    """The FrameError of one refused event of a BATCH frame (rare path)."""
    prio = int(row["priority"])
    ti = int(row["topic"])
    name = names[ti] if ti < tcount else b""
    topic = name.decode("utf-8", "replace")
    plen = int(row["payload_len"])
    if code == _E_TOPIC_LEN:
        reason = f"topic_len 0 is not allowed; allowed: 1..{MAX_TOPIC_BYTES}"
    elif code == _E_PRIORITY:
        reason = f"priority {prio} is not allowed; allowed: 0..{MAX_PRIORITY}"
    elif code == _E_TOO_LARGE:
        if dec.payloads is None:
            reason = (
                f"payload of {plen} bytes exceeds the inline capacity of {dec.payload_bytes} "
                f"bytes (records.payload_bytes; no payload arena here; allowed: 0..{dec.payload_bytes})"
            )
        else:
            reason = (
                f"payload of {plen} bytes exceeds the largest payload of {dec.max_payload} bytes "
                f"(server.tcp.max_frame_bytes; allowed: 0..{dec.max_payload})"
            )
    elif code == _E_UTF8:
        reason = "topic is not valid UTF-8"
    elif code == _E_TOPICS:
        reason, cls = _refusal(dec, name)
        return FrameError(index, False, reason, int(row["event_id"]), topic, prio, 2, cls)
    elif code == _E_FLAGS:
        reason = f"batch record flags {int(row['flags'])} are not allowed; allowed: 0..3 (bits 0-1: the ACK mode)"
    else:
        reason = f"batch topic index {ti} is not allowed; allowed: 0..{tcount - 1} (the batch's topic table)"
    return FrameError(index, False, reason, int(row["event_id"]), topic, prio, 2, _CLASSES[code])


# the record header (core/records.py) as a struct: event_id, producer_ts, ingest_ts, seq, topic_id,
# conn_id, payload_len, crc32, priority, flags, attempts, (ext_off, ext_class, ext_arena), principal, padding
_RECORD_HEAD = struct.Struct("<QQQQIIIIBBB10xHx")


_LENGTH = struct.Struct(">I")
_ONE_V2_MIN = LENGTH_BYTES + V2_HEADER_BYTES + 1  # the smallest whole v2 EVENT frame (a 1-byte topic)


def _decode_small(dec: FrameDecoder, src, offs: list[int], lens: list[int], first_index: int, ingest_ts: int | None):
    """Decode a few frames with struct calls; None when any frame has a content problem (the
    vectorized path then decodes the lot and describes the errors)."""
    n = len(offs)
    size = dec.dtype.itemsize
    cap = dec.payload_bytes
    buf = bytearray(n * size)
    ts = time.monotonic_ns() if ingest_ts is None else ingest_ts
    conn = dec.conn_id
    who = dec.principal_key
    mv = memoryview(src)
    try:
        for i in range(n):
            o = offs[i]
            end = o + LENGTH_BYTES + lens[i]
            if src[o + LENGTH_BYTES] == V2_MAGIC:
                _, _, kind, prio, wflags, eid, pts, tl, crc = V2_HEAD.unpack_from(src, o)
                if kind != KIND_EVENT:
                    return None
                t0 = o + LENGTH_BYTES + V2_HEADER_BYTES
                flags = FLAG_V2 | (((wflags & 3) or dec.ack_default) << FLAG_ACK_SHIFT)
            else:
                _, prio, tl = V1_HEAD.unpack_from(src, o)
                eid = pts = crc = flags = 0
                t0 = o + LENGTH_BYTES + V1_HEADER_BYTES
            plen = end - t0 - tl
            if prio > MAX_PRIORITY or not 0 < tl <= MAX_TOPIC_BYTES or not 0 <= plen <= cap:
                return None
            tid = dec.topic_id(bytes(mv[t0 : t0 + tl]))
            if not tid or tid == TOPIC_REFUSED or (flags and zlib.crc32(mv[t0:end]) != crc):
                return None
            base = i * size
            _RECORD_HEAD.pack_into(buf, base, eid, pts, ts, 0, tid, conn, plen, crc, prio, flags, 0, who)
            if plen:
                buf[base + 64 : base + 64 + plen] = mv[end - plen : end]
    finally:
        mv.release()
    return (np.frombuffer(buf, dtype=dec.dtype), np.arange(first_index, first_index + n, dtype=np.uint64), [], None)


def _evenly_spaced_rows(arr: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray | None:
    """arr[starts[i] : starts[i] + width] for every i as one (n, width) strided VIEW when the starts
    are evenly spaced (frames of one size back to back: the usual pipelined read) and every row lies
    inside arr, else None (the caller gathers with an index array: n * width indices)."""
    n = len(starts)
    if n < 2:
        return None
    first = int(starts[0])
    step = int(starts[1]) - first
    if step <= 0 or first + step * (n - 1) + width > len(arr) or int(starts[-1]) != first + step * (n - 1):
        return None
    if not (np.diff(starts) == step).all():
        return None
    return np.lib.stride_tricks.as_strided(arr[first:], shape=(n, width), strides=(step, 1), writeable=False)


# zlib.crc32 of many short spans of one length at once (_crc_columns): CRC-32 is affine in the
# message bits, so an L-byte span's CRC is the XOR over its positions i of rows[i][byte i] (byte i's
# contribution), XOR zlib.crc32(L zero bytes). One table lookup and one XOR over all the frames per
# byte position, instead of one zlib call (~0.45 µs of Python call overhead on 3.13t) per frame.
_CRC_BYTE = np.arange(256, dtype=np.uint32)
for _ in range(8):
    _CRC_BYTE = np.where(_CRC_BYTE & 1, (_CRC_BYTE >> 1) ^ np.uint32(0xEDB88320), _CRC_BYTE >> 1).astype(np.uint32)
_CRC_ROWS: dict[int, tuple[np.ndarray, int]] = {}  # span length -> (rows, crc of zero bytes); a few lengths
_CRC_COLUMNS_MAX = 160  # longer spans: zlib's own speed per byte wins
_CRC_COLUMNS_PER_BYTE = 8  # at least 8 frames per byte of span (two numpy calls per byte position)


def _crc_rows(width: int) -> tuple[np.ndarray, int]:
    got = _CRC_ROWS.get(width)
    if got is None:
        rows = np.empty((width, 256), dtype=np.uint32)
        row = _CRC_BYTE  # the last byte's contribution; each byte after it shifts it by one zero byte
        rows[width - 1] = row
        for i in range(width - 2, -1, -1):
            row = _CRC_BYTE[row & 0xFF] ^ (row >> 8)
            rows[i] = row
        got = (rows, zlib.crc32(bytes(width)))
        if len(_CRC_ROWS) < 16:
            _CRC_ROWS[width] = got
    return got


def _crc_columns(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """zlib.crc32(arr[starts[i]:ends[i]]) for every i when the spans have one length and lie evenly
    spaced (frames of one size back to back: the pipelined read) and there are enough of them to
    beat a zlib call per span; else None."""
    n = len(starts)
    width = int(ends[0]) - int(starts[0])
    if not 0 < width <= _CRC_COLUMNS_MAX or n < _CRC_COLUMNS_PER_BYTE * width or not (ends - starts == width).all():
        return None
    spans = _evenly_spaced_rows(arr, starts, width)
    if spans is None:
        return None
    rows, zero = _crc_rows(width)
    cols = np.ascontiguousarray(spans.T)  # byte i of every span, contiguous
    out = np.full(n, zero, dtype=np.uint32)
    part = np.empty(n, dtype=np.uint32)
    for i in range(width):
        np.take(rows[i], cols[i], out=part)
        out ^= part
    return out


def _gather(arr: np.ndarray, off: np.ndarray, dt: np.dtype) -> np.ndarray:
    rows = _evenly_spaced_rows(arr, off, dt.itemsize)
    if rows is None:
        rows = arr[off[:, None] + np.arange(dt.itemsize)]
    return np.ascontiguousarray(rows).view(dt).reshape(len(off))


def _fill_topics(dec, arr, rec, err, okidx, tstart, tlen) -> None:
    tl = tlen[okidx]
    width = int(tl.max())
    cols = np.arange(width)
    same_len = bool((tl == tl[0]).all())
    rows = _evenly_spaced_rows(arr, tstart[okidx], width) if same_len else None
    if rows is None:
        idx = np.minimum(tstart[okidx][:, None] + cols, len(arr) - 1)
        rows = arr[idx]
        rows[cols >= tl[:, None]] = 0
    if same_len and (rows == rows[0]).all():
        tid = dec.topic_id(rows[0, : int(tl[0])].tobytes())
        if tid == TOPIC_REFUSED:
            err[okidx] = _E_TOPICS
        elif tid:
            rec["topic_id"][okidx] = tid
        else:
            err[okidx] = _E_UTF8
        return
    keyed = np.concatenate([rows, tl.astype(">u2").view(np.uint8).reshape(-1, 2)], axis=1)
    keys = np.ascontiguousarray(keyed).view(f"V{width + 2}").ravel()
    uniq, inverse = np.unique(keys, return_inverse=True)
    ids = np.empty(len(uniq), dtype=np.uint32)
    for k, u in enumerate(uniq):
        b = bytes(u)
        ids[k] = dec.topic_id(b[: int.from_bytes(b[-2:], "big")])
    tids = ids[inverse.ravel()]
    refused = tids == TOPIC_REFUSED
    tids[refused] = 0
    rec["topic_id"][okidx] = tids
    err[okidx[tids == 0]] = _E_UTF8
    err[okidx[refused]] = _E_TOPICS


def _copy_payloads(arr: np.ndarray, out: np.ndarray, pstart: np.ndarray, pl: np.ndarray) -> None:
    width = int(pl.max())
    if width == 0:
        return
    cols = np.arange(width)
    if (pl == width).all():
        rows = _evenly_spaced_rows(arr, pstart, width)
        out["payload"][:, :width] = arr[pstart[:, None] + cols] if rows is None else rows
        return
    idx = np.minimum(pstart[:, None] + cols, len(arr) - 1)
    g = arr[idx]
    g[cols >= pl[:, None]] = 0
    out["payload"][:, :width] = g


def _copy_ext(arena, arr, out, pstart, pl, ext, offs, cls) -> None:
    """Copy the payloads of out[ext] into their claimed arena slots (one copy each; they are large)."""
    out["ext_off"][ext] = offs
    out["ext_class"][ext] = cls
    out["ext_arena"][ext] = arena.id
    dst, src = memoryview(arena.buf), memoryview(arr)
    for o, s, n in zip(offs.tolist(), pstart[ext].tolist(), pl[ext].tolist(), strict=True):
        dst[o : o + n] = src[s : s + n]
    dst.release()
    src.release()


def _describe(dec, arr, j, index, code, rec, v2, kind, tstart, tlen, plen, length) -> FrameError:
    """The FrameError of frame j (rare path: per-error Python is fine)."""
    version = 2 if v2[j] else 1
    prio = int(rec["priority"][j])
    tl = int(tlen[j])
    topic = ""
    if 0 < tl <= MAX_TOPIC_BYTES and plen[j] >= 0:
        s = int(tstart[j])
        topic = arr[s : s + tl].tobytes().decode("utf-8", "replace")
    if code == _E_TOPIC_LEN:
        reason = f"topic_len {tl} is not allowed; allowed: 1..{MAX_TOPIC_BYTES}"
    elif code == _E_KIND:
        k = int(kind[j])
        reason = (
            f"frame kind {k} ({KIND_NAMES.get(k, 'unknown')}) is not allowed from a client; "
            "allowed: 1 (EVENT), 11 (BATCH)"
        )
    elif code == _E_PRIORITY:
        reason = f"priority {prio} is not allowed; allowed: 0..{MAX_PRIORITY}"
    elif code == _E_TOO_LARGE:
        if dec.payloads is None:
            reason = (
                f"payload of {int(plen[j])} bytes exceeds the inline capacity of {dec.payload_bytes} "
                f"bytes (records.payload_bytes; no payload arena here; allowed: 0..{dec.payload_bytes})"
            )
        else:
            reason = (
                f"payload of {int(plen[j])} bytes exceeds the largest payload of {dec.max_payload} bytes "
                f"(server.tcp.max_frame_bytes; allowed: 0..{dec.max_payload})"
            )
    elif code == _E_UTF8:
        reason = "topic is not valid UTF-8"
    elif code == _E_CRC:
        reason = "crc32 mismatch (zlib.crc32 of topic bytes then payload bytes)"
    elif code == _E_TOPICS:
        s = int(tstart[j])
        reason, cls = _refusal(dec, arr[s : s + tl].tobytes())
        return FrameError(index, False, reason, int(rec["event_id"][j]), topic, prio, version, cls)
    else:
        reason = (
            f"frame length {int(length[j])} is too short for its v{version} header and topic_len {tl} "
            f"(needs >= {(V2_HEADER_BYTES if version == 2 else V1_HEADER_BYTES) + tl})"
        )
    eid = int(rec["event_id"][j])
    return FrameError(index, code == _E_SHORT, reason, eid, topic, prio, version, _CLASSES[code])


def _refusal(dec, name: bytes) -> tuple[str, str]:
    """(reason, class) of a frame whose topic the table refused."""
    return dec.topic_refusals.get(bytes(name)) or (dec.topic_limit_reason or "too_many_topics", "too_many_topics")


_CLASSES = {
    _E_TOPIC_LEN: "topic_len",
    _E_KIND: "kind",
    _E_PRIORITY: "priority",
    _E_TOO_LARGE: "payload_too_large",
    _E_UTF8: "topic_utf8",
    _E_CRC: "crc",
    _E_SHORT: "framing",
    _E_TOPICS: "too_many_topics",
    _E_FLAGS: "batch",
    _E_TOPIC_INDEX: "batch",
}
