"""The dedup snapshot (engine/dedup_snapshot.py): a start loads the tables from `dedup.snap` and reads
only the log after the position it covers; a snapshot that is torn, damaged or stale is ignored and
the tables are rebuilt from the whole log. Whatever happens to the file, no dedup key is lost: a
resend of every ACKed event after a restart is stored once. Real servers, sockets and kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.core.dedup import Deduplicator, MemoryBudget
from eventstream.core.topics import TopicTable
from eventstream.engine import dedup_snapshot as ds
from eventstream.service import Service
from eventstream.storage.reader import EventLogReader

SNAP = ds.FILE_NAME


def overrides(data: Path, **more) -> dict:
    return {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
            "storage.data_dir": str(data), "records.payload_bytes": 64, "storage.fsync": "none",
            "dedup.snapshot_interval_s": 3600.0, **more}


def send(port: int, ids, topic: str = "orders", priority: int = 2) -> None:
    with TcpClient("127.0.0.1", port, version=2, timeout=30) as c:
        for i in ids:
            c.send(topic if isinstance(topic, str) else topic(i), b"p%d" % i, priority, i)
        assert c.wait_acked(30), "not every event was ACKed"


def stored_ids(data: Path) -> list[int]:
    return sorted(EventLogReader(data / "events.bin").read().records["event_id"].tolist())


def start_serve(tmp_path: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0", "--metrics-port", "0",
         "--subscribe-port", "0", "--data-dir", str(data), "--ready-file", str(ready),
         "--set", "records.payload_bytes=64", "--set", "storage.fsync=none", *extra],
        env=dict(os.environ, PYTHON_GIL="0"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("serve did not become ready within 60 s")
        time.sleep(0.02)
    return proc, int(ready.read_text().split()[0])


def kill9(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    return err


def restart_and_resend(data: Path, ids, topic="orders", **more) -> tuple[dict, int]:
    """Start in-process, resend `ids`, stop: (what the start's rebuild did, dedup hits)."""
    svc = Service(load_config(environ={}, overrides=overrides(data, **more))).start()
    try:
        rebuilt = dict(svc.engine.dedup_start)
        send(svc.tcp.address[1], ids, topic)
        return rebuilt, svc.metrics.dedup_hits_total()
    finally:
        svc.stop()


# -- the file -----------------------------------------------------------------------------------------


def filled_tables(n: int, seed: int = 3) -> tuple[dict[str, list[Deduplicator]], dict, TopicTable, list]:
    rng = np.random.default_rng(seed)
    topics = TopicTable()
    for k in range(5):
        topics.intern(f"t{k}")
    budget = MemoryBudget(1 << 28)
    tables = {"transactional": [Deduplicator(64, 3600, budget=budget) for _ in range(2)],
              "batch": [Deduplicator(64, 3600, budget=budget)]}
    tokens = {tier: [threading.Lock() for _ in ds_] for tier, ds_ in tables.items()}
    keys = []
    for ds_ in tables.values():
        for d in ds_:
            ids = rng.integers(1, 2**63, n, dtype=np.uint64)
            tags = rng.integers(1, 6, n).astype(np.uint64) | (rng.integers(0, 3, n).astype(np.uint64) << np.uint64(32))
            d.commit(ids, tags)
            keys.append((ids, tags))
    return tables, tokens, topics, keys


def test_a_snapshot_puts_every_key_back_where_it_was(tmp_path):
    tables, tokens, topics, keys = filled_tables(5000)
    snap = ds.take(tables, tokens, topics, lambda: (123, 4567))
    assert snap is not None and snap.keys == 15000
    ds.write(tmp_path / SNAP, snap)
    assert ds.read_head(tmp_path / SNAP) == (123, 4567)
    back = ds.read(tmp_path / SNAP)
    fresh = {tier: [Deduplicator(64, 3600, budget=MemoryBudget(1 << 28)) for _ in v] for tier, v in tables.items()}
    topics2 = TopicTable()
    assert ds.restore(back, fresh, topics2, 3600) is None
    assert [topics2.name(i) for i in range(1, 6)] == [f"t{k}" for k in range(5)]
    k = 0
    for tier, ds_ in fresh.items():
        for p, d in enumerate(ds_):
            ids, tags = keys[k]
            k += 1
            assert d.seen(ids, tags).all()  # every key, found by probing from its hash
            assert not d.seen(ids, tags ^ np.uint64(1 << 40)).any()  # the exact pair, nothing else
            assert len(d) == len(tables[tier][p])


def test_expired_keys_stay_out_of_sight_and_live_ones_keep_their_age(tmp_path):
    tables, tokens, topics, keys = filled_tables(2000)
    snap = ds.take(tables, tokens, topics, lambda: (1, 1))
    assert snap is not None
    t = snap.tables[0]
    old = np.arange(len(t.walls)) % 2 == 0
    t.walls[old] -= np.uint64(7200 * 10**9)  # stored two hours ago: outside a 1-hour window
    t.walls[~old] -= np.uint64(60 * 10**9)  # a minute ago
    ds.write(tmp_path / SNAP, snap)
    fresh = {tier: [Deduplicator(64, 3600, budget=MemoryBudget(1 << 28)) for _ in v] for tier, v in tables.items()}
    assert ds.restore(ds.read(tmp_path / SNAP), fresh, TopicTable(), 3600) is None
    d = fresh[t.tier][t.partition]
    assert not d.seen(t.ids[old], t.tags[old]).any()
    assert d.seen(t.ids[~old], t.tags[~old]).all()
    assert not d.seen(t.ids[~old], t.tags[~old], now=time.monotonic() + 3600 - 59).any()  # expire on time


def test_a_snapshot_is_refused_when_its_topic_ids_are_taken_in_this_run(tmp_path):
    tables, tokens, topics, _ = filled_tables(100)
    snap = ds.take(tables, tokens, topics, lambda: (1, 1))
    assert snap is not None
    fresh = {tier: [Deduplicator(64, 3600, budget=MemoryBudget(1 << 28)) for _ in v] for tier, v in tables.items()}
    now = TopicTable()
    now.intern("t1")  # id 1 here, id 2 in the snapshot
    why = ds.restore(snap, fresh, now, 3600)
    assert why is not None and "'t0' has id 2" in why
    assert all(len(d) == 0 for v in fresh.values() for d in v)


@pytest.mark.parametrize("damage", ["truncated", "body_byte", "header_byte", "empty"])
def test_a_torn_or_damaged_snapshot_is_refused(tmp_path, damage):
    tables, tokens, topics, _ = filled_tables(3000)
    path = tmp_path / SNAP
    ds.write(path, ds.take(tables, tokens, topics, lambda: (1, 2)))
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) - 100]
    elif damage == "body_byte":
        raw[len(raw) // 2] ^= 0x10
    elif damage == "header_byte":
        raw[20] ^= 0x01
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(ds.SnapshotError):
        ds.read(path)
    assert ds.PendingRead(path, 3600).result() is None


def test_kill9_while_a_snapshot_is_written_leaves_the_last_whole_one(tmp_path):
    """A process killed with SIGKILL in the middle of writing: the temporary file is torn, the
    snapshot before it is whole and still read."""
    tables, tokens, topics, _ = filled_tables(1000)
    path = tmp_path / SNAP
    ds.write(path, ds.take(tables, tokens, topics, lambda: (1, 111)))
    writer = (
        "import numpy as np, sys\n"
        "from pathlib import Path\n"
        "from eventstream.engine import dedup_snapshot as ds\n"
        "n = 30_000_000\n"
        "a = np.arange(1, n + 1, dtype=np.uint64)\n"
        "img = ds.TableImage('batch', 0, 1 << 26, 5, a.astype(np.uint32), a, a, a)\n"
        "print('go', flush=True)\n"
        "ds.write(Path(sys.argv[1]), ds.Snapshot(9, 999, 0, [], [img]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHON_GIL="0"))
    tmp = path.with_name(path.name + ".tmp")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 1 << 20):
        assert proc.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert tmp.exists() and tmp.stat().st_size < 28 * 30_000_000  # torn
    assert ds.read_head(path) == (1, 111)
    assert ds.read(path).keys == 3000
    with pytest.raises(ds.SnapshotError):
        ds.read(tmp)


# -- a server -------------------------------------------------------------------------------------------


def test_clean_stop_saves_a_snapshot_and_the_start_reads_only_the_log_after_it(tmp_path):
    data = tmp_path / "data"
    svc = Service(load_config(environ={}, overrides=overrides(data))).start()
    try:
        send(svc.tcp.address[1], range(1, 401))
    finally:
        svc.stop()
    assert ds.read(data / SNAP).keys == 400
    rebuilt, hits = restart_and_resend(data, range(1, 401))
    assert (rebuilt["from_snapshot"], rebuilt["replayed"]) == (400, 0)
    assert hits == 400
    assert stored_ids(data) == list(range(1, 401))


def test_kill9_after_a_snapshot_replays_the_log_after_it(tmp_path):
    """Run 1 stops cleanly (snapshot of ids 1..300); run 2 loads it, stores 301..600 and is killed
    with SIGKILL (no newer snapshot); run 3 loads run 1's snapshot and reads 301..600 from the log:
    a resend of all 600 is stored once."""
    data = tmp_path / "data"
    svc = Service(load_config(environ={}, overrides=overrides(data))).start()
    try:
        send(svc.tcp.address[1], range(1, 301))
    finally:
        svc.stop()
    first = ds.read_head(data / SNAP)
    proc, port = start_serve(tmp_path, data, "--set", "dedup.snapshot_interval_s=3600")
    try:
        send(port, range(301, 601), topic=lambda i: f"new{i % 3}")  # topics the snapshot never saw
    finally:
        kill9(proc)
    assert ds.read_head(data / SNAP) == first  # nothing newer was saved
    svc = Service(load_config(environ={}, overrides=overrides(data))).start()
    try:
        assert (svc.engine.dedup_start["from_snapshot"], svc.engine.dedup_start["replayed"]) == (300, 300)
        send(svc.tcp.address[1], range(1, 301))
        send(svc.tcp.address[1], range(301, 601), topic=lambda i: f"new{i % 3}")
        assert svc.metrics.dedup_hits_total() == 600
    finally:
        svc.stop()
    assert stored_ids(data) == list(range(1, 601))


def test_the_snapshot_thread_saves_while_the_log_grows_and_kill9_keeps_every_key(tmp_path):
    data = tmp_path / "data"
    proc, port = start_serve(tmp_path, data, "--set", "dedup.snapshot_interval_s=0.2")
    try:
        send(port, range(1, 501))
        size = (data / "events.bin").stat().st_size
        deadline = time.monotonic() + 30
        while (ds.read_head(data / SNAP) or (0, 0))[1] < size:  # a snapshot covering all 500
            assert time.monotonic() < deadline, "no snapshot covered the log within 30 s"
            time.sleep(0.05)
        send(port, range(501, 801))
    finally:
        kill9(proc)
    rebuilt, hits = restart_and_resend(data, range(1, 801))
    assert rebuilt["from_snapshot"] >= 500 and rebuilt["keys"] == 800
    assert hits == 800
    assert stored_ids(data) == list(range(1, 801))


@pytest.mark.parametrize("stale", ["log_replaced", "log_cut", "torn", "tiers_differ"])
def test_a_stale_or_torn_snapshot_is_ignored_and_the_whole_log_read(tmp_path, stale):
    data = tmp_path / "data"
    svc = Service(load_config(environ={}, overrides=overrides(data))).start()
    try:
        send(svc.tcp.address[1], range(1, 201), topic=lambda i: f"t{i % 4}")
    finally:
        svc.stop()
    snap = ds.read(data / SNAP)
    more: dict = {}
    if stale == "log_replaced":  # another log in the directory: the file the snapshot covers is gone
        snap.log_created_ns += 1
        ds.write(data / SNAP, snap)
    elif stale == "log_cut":  # the snapshot covers more than the log holds (a power loss cut it)
        snap.log_offset = (data / "events.bin").stat().st_size + 1
        ds.write(data / SNAP, snap)
    elif stale == "torn":
        raw = (data / SNAP).read_bytes()
        (data / SNAP).write_bytes(raw[: len(raw) // 2])
    else:  # another partition count: the keys would be in the wrong tables
        more = {"processors.transactional.max_workers": 3}
    rebuilt, hits = restart_and_resend(data, range(1, 201), lambda i: f"t{i % 4}", **more)
    assert (rebuilt["from_snapshot"], rebuilt["replayed"]) == (0, 200)
    assert hits == 200
    assert stored_ids(data) == list(range(1, 201))
