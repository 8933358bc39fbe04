"""libnuma access, arenas (placement, leaks, error paths), atomic cells vs the atomics public API, waits."""

from __future__ import annotations

import threading
import time

import atomics
import numpy as np
import pytest

from eventstream.core import arena as arena_mod
from eventstream.core import atomic, numa
from eventstream.core.arena import Arena, ArenaClosed, ArenaFull
from eventstream.core.wait import BusySpin, SleepBackoff, Yield, make_wait


def test_numa_queries_answer_for_node_zero():
    assert numa.max_node() >= 0
    if numa.available():
        assert numa.library() is not None
        assert numa.node_cpus(0) and numa.node_size(0) > 0
        assert numa.distance(0, 0) == 10


def test_arena_arrays_are_aligned_zeroed_and_placed():
    with Arena(1 << 20, 0 if numa.available() else -1, name="t") as a:
        x = a.array(100, np.uint64)
        y = a.array(3, np.uint8)
        z = a.array(10, np.float64)
        assert x.ctypes.data % 64 == 0 and z.ctypes.data % 64 == 0 and not x.any()
        x[:] = 7
        y[:] = 1
        assert x.ctypes.data >= a.address and z.ctypes.data + z.nbytes <= a.address + a.size
        rep = a.nodes()
        assert rep["used_bytes"] >= 800 and rep["size_bytes"] == 1 << 20
        if numa.available():
            assert a.backend == "libnuma"
            assert a.node_of(x) == 0
            assert rep["pages_by_node"].get(0, 0) >= 1
        with pytest.raises(ArenaFull, match="make the arena larger"):
            a.array(1 << 20, np.uint8)


def test_arena_no_leaks_across_50_cycles():
    before = (arena_mod.live_arenas(), arena_mod.live_bytes())
    for i in range(50):
        a = Arena(256 << 10, name=f"cycle{i}")
        a.array(1000, np.uint64)[:] = i
        a.close()
        a.close()  # idempotent
    for i in range(50):  # context manager, and an error inside it
        with pytest.raises(RuntimeError), Arena(64 << 10) as a:
            a.array(10)
            raise RuntimeError("boom")
        assert a.closed
    assert (arena_mod.live_arenas(), arena_mod.live_bytes()) == before


def test_arena_errors_are_clear():
    with pytest.raises(ValueError, match="positive integer"):
        Arena(0)
    with pytest.raises(ValueError, match="node"):
        Arena(4096, -5)
    a = Arena(4096)
    a.close()
    with pytest.raises(ArenaClosed):
        a.array(1)


def test_arena_on_missing_node_falls_back_to_plain_memory():
    with Arena(8192, 4000) as a:
        assert a.backend == "mmap"
        a.array(16, np.uint64)[:] = 3


def test_bind_memory_false_gives_plain_memory_everywhere_the_engine_allocates(tmp_path):
    from eventstream.config import load_config
    from eventstream.service import Service

    assert arena_mod.memory_node(0, True) == 0 and arena_mod.memory_node(0, False) == arena_mod.UNBOUND
    with Arena(8192, arena_mod.UNBOUND) as a:
        assert a.backend == "mmap"
    over = {"server.tcp.port": 0, "server.udp.enabled": False, "metrics.enabled": False,
            "server.subscribe.enabled": False, "storage.data_dir": str(tmp_path / "d"), "records.payload_bytes": 64}
    for bind, want in ((False, {"mmap"}), (True, {"libnuma"} if numa.available() else {"mmap"})):
        with Service(load_config(environ={}, overrides={**over, "numa.bind_memory": bind})) as svc:
            rings = [r for q in svc.engine.bus.queues for r in q.rings]
            got = {r._arena.backend for r in rings if getattr(r, "_arena", None) is not None}
            got.add(svc.engine.payloads._arena.backend)
            assert got == want


def test_views_keep_a_forgotten_arena_alive():
    before = arena_mod.live_arenas()
    view = Arena(4096).array(4, np.uint64)
    view[:] = 9  # the arena object is unreachable except through the view
    assert arena_mod.live_arenas() == before + 1 and view.sum() == 36
    del view
    import gc
    gc.collect()
    assert arena_mod.live_arenas() == before


# -- atomics vs the public API ----------------------------------------------------------------------

def test_atomic_ops_match_atomicview_oracle():
    with Arena(4096) as a:
        cells = atomic.CellBlock(a, 2)
        assert cells[1].address - cells[0].address == 64
        mine, ref = cells[0], a.array(1, np.uint64)
        seq = [("store", 5), ("fetch_add", 3), ("cas", (8, 20)), ("cas", (8, 30)), ("exchange", 11),
               ("fetch_add", -12), ("cas", (2**64 - 1, 1)), ("load", None), ("fetch_add", 2**63)]
        with atomics.atomicview(buffer=ref, atype=atomics.UINT) as oracle:
            for op, arg in seq:
                if op == "store":
                    assert mine.store(arg) is None and oracle.store(arg) is None
                elif op == "fetch_add":
                    old = mine.fetch_add(arg)  # negative deltas wrap modulo 2**64
                    assert old == oracle.fetch_add(arg % 2**64)
                elif op == "cas":
                    ok, seen = mine.cas(*arg)
                    res = oracle.cmpxchg_strong(*arg)
                    assert (ok, seen) == (res.success, res.expected), (op, arg)
                elif op == "exchange":
                    assert mine.exchange(arg) == oracle.exchange(arg)
                assert mine.load() == oracle.load()


def test_atomic_fetch_add_from_threads_is_exact(workers):
    with Arena(4096) as a:
        cell = atomic.CellBlock(a, 1)[0]

        def bump():
            for _ in range(5000):
                cell.fetch_add(1)

        for i in range(4):
            workers.start(bump, f"bump-{i}", i)
        workers.join(120)
        assert cell.load() == 20000


def test_atomic_rejects_misaligned_cells():
    with pytest.raises(ValueError, match="8-byte aligned"):
        atomic.Cell(3)


# -- waits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["spin", "yield", "sleep"])
def test_wait_strategies_time_out_and_wake(name):
    w = make_wait(name)
    t0 = time.monotonic()
    assert not w.wait_for(lambda: False, 0.03)
    assert time.monotonic() - t0 >= 0.03
    flag = threading.Event()
    threading.Timer(0.01, flag.set).start()
    assert w.wait_for(flag.is_set, 10.0)
    assert isinstance(make_wait(w), (BusySpin, Yield, SleepBackoff))
    with pytest.raises(ValueError, match="timeout"):
        w.wait_for(lambda: False, None)


def test_make_wait_rejects_unknown_names():
    with pytest.raises(ValueError, match="allowed: spin, yield, sleep"):
        make_wait("nap")


def test_arena_without_libnuma_uses_anonymous_memory(monkeypatch):
    monkeypatch.setattr(numa, "library", lambda: None)
    before = arena_mod.live_arenas()
    with Arena(3 * 4096 + 1, name="nolib") as a:
        assert a.backend == "mmap" and a.size == 4 * 4096
        x = a.array(100, np.uint64)
        x[:] = np.arange(100)
        assert int(x.sum()) == 4950
    assert arena_mod.live_arenas() == before


def test_sleep_backoff_adapts_to_idle_and_resets():
    w = SleepBackoff()
    assert w.first_attempt() == 0
    # a timed-out wait leaves the next one starting where it ended (however few attempts a loaded
    # machine let one 20 ms wait make): a few idle waits reach the sleeping phase
    for _ in range(200):
        assert not w.wait_for(lambda: False, 0.02)
        if w.first_attempt() > w.spins + w.yields:
            break
    assert w.first_attempt() > w.spins + w.yields  # idle: the next wait starts sleeping
    box = [0]

    def soon():
        box[0] += 1
        return box[0] > 2

    assert w.wait_for(soon, 5.0)
    assert w.first_attempt() == 0
