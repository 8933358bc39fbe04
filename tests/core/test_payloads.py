"""PayloadArena: size classes, claim/release in batches, full -> a prefix (never growth), threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from eventstream.core import payloads as pl
from eventstream.core.payloads import PayloadArena
from eventstream.core.records import record_dtype

MIB = 1 << 20


@pytest.fixture
def arena():
    a = PayloadArena(4 * MIB, MIB - 4, min_payload=448, name="test.payloads")
    yield a
    a.close()


def test_classes_and_bounds(arena):
    assert arena.chunk == MIB and arena.nchunks == 4
    assert arena.class_sizes[0] == 512 and arena.class_sizes[-1] == MIB
    offs, cls = arena.claim([449, 512, 513, 1024, 1025, MIB - 4])
    sizes = np.array(arena.class_sizes)[cls.astype(int) - 1]
    assert sizes.tolist() == [512, 512, 1024, 1024, 2048, MIB]
    assert (offs % sizes == 0).all()  # every slot aligned to its size inside its chunk
    with pytest.raises(ValueError, match=r"allowed: 0\.\.1048572 bytes"):
        arena.claim([MIB + 1])
    arena.release(offs, cls)
    assert arena.statistics()["used_bytes"] == 0


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"payloads\.arena_bytes=1000 is not allowed; allowed: at least 2097152"):
        PayloadArena(1000, MIB - 4)


def test_full_claims_a_prefix_and_never_grows(arena):
    # 4 chunks of 1 MiB: four 1 MiB payloads fit, the fifth does not
    offs, cls = arena.claim([MIB - 4] * 5)
    assert len(offs) == 4
    st = arena.statistics()
    assert st["full"] == 1 and st["chunks_free"] == 0 and st["bytes"] == 4 * MIB
    assert not arena.has_room(600)  # every chunk is taken by the 1 MiB class
    # a mixed batch stops at the first payload that does not fit, and keeps nothing after it
    arena.release(offs[:1], cls[:1])
    assert arena.has_room(600)
    o2, c2 = arena.claim([600, MIB - 4, 700])
    assert len(o2) == 1
    assert arena.statistics()["slots_used"] == {MIB: 3, 1024: 1}
    arena.release(o2, c2)
    arena.release(offs[1:], cls[1:])
    assert arena.statistics()["used_bytes"] == 0


def test_double_release_is_ignored_and_counted(arena):
    offs, cls = arena.claim([1000, 1000])
    arena.release(offs, cls)
    arena.release(offs, cls)
    assert arena.statistics()["bad_release"] == 2
    assert arena.statistics()["released"] == 2


def test_records_views_and_release(arena):
    dt = record_dtype(16)
    r = np.zeros(3, dt)
    r["payload_len"] = [3, 5000, 0]
    r["payload"][0, :3] = np.frombuffer(b"abc", np.uint8)
    offs, cls = arena.claim([5000])
    big = np.random.default_rng(1).bytes(5000)
    arena.buf[int(offs[0]):int(offs[0]) + 5000] = np.frombuffer(big, np.uint8)
    r["ext_off"][1], r["ext_class"][1], r["ext_arena"][1] = offs[0], cls[0], arena.id
    views = pl.payload_views(r)
    assert [bytes(v) for v in views] == [b"abc", big, b""]
    assert views[1] == big  # a memoryview compares equal to bytes of the same content
    # zero copy: the view is the arena's memory
    assert np.frombuffer(views[1], np.uint8).ctypes.data == arena.buf[int(offs[0]):].ctypes.data
    assert pl.has_ext(r) and not pl.has_ext(r[[0, 2]])
    pl.release_records(r)
    assert arena.statistics()["used_bytes"] == 0


def test_many_threads_claim_and_release_without_loss_or_overlap(arena):
    """Producers claim slots of random sizes and write a pattern; a consumer thread checks and
    releases them. No slot is handed out twice while in use; everything comes back."""
    n_threads, rounds = 4, 150
    handoff: list = []
    cond = threading.Condition()
    errors: list = []
    done = [0]

    def producer(k: int) -> None:
        rng = np.random.default_rng(k)
        for _ in range(rounds):
            sizes = rng.integers(449, 70_000, size=int(rng.integers(1, 6)))
            offs, cls = arena.claim(sizes)
            for o, n in zip(offs.tolist(), sizes[:len(offs)].tolist()):
                arena.buf[o:o + n] = k + 1
            with cond:
                handoff.append((k, offs, cls, sizes[:len(offs)]))
                cond.notify_all()
        with cond:
            done[0] += 1
            cond.notify_all()

    def consumer() -> None:
        seen = 0
        while True:
            with cond:
                if not cond.wait_for(lambda: handoff or done[0] == n_threads, timeout=30):
                    errors.append("consumer timed out")
                    return
                if not handoff:
                    return
                items = list(handoff)
                handoff.clear()
            for k, offs, cls, sizes in items:
                for o, n in zip(offs.tolist(), sizes.tolist()):
                    if not (arena.buf[o:o + n] == k + 1).all():
                        errors.append(f"slot {o} of producer {k} was overwritten")
                arena.release(offs, cls)
                seen += len(offs)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
    cons = threading.Thread(target=consumer)
    cons.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    cons.join(60)
    assert not cons.is_alive() and not any(t.is_alive() for t in threads)
    assert errors == []
    st = arena.statistics()
    assert st["claimed"] == st["released"] and st["used_bytes"] == 0 and st["bad_release"] == 0


def test_registry_ids_are_reused_after_close():
    a = PayloadArena(2 * MIB, 1000)
    aid = a.id
    assert pl.arena_by_id(aid) is a
    a.close()
    with pytest.raises(ValueError, match="does not exist"):
        pl.arena_by_id(aid)
    b = PayloadArena(2 * MIB, 1000)
    try:
        assert b.id == aid
    finally:
        b.close()
