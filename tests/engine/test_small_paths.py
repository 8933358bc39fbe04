"""The plain-int paths for a few records (the realtime lane at low load) give the same answers as the
vectorized paths: routing, dedup lookups and commits, event-log entries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.config import load_config
from eventstream.core.dedup import Deduplicator
from eventstream.core.topics import TopicTable
from eventstream.engine import idempotency
from eventstream.engine.bus import SMALL, EventBusMulti
from eventstream.storage import format as fmt

from engine_fixtures import DTYPE, make_records

few = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=SMALL)


@pytest.fixture(scope="module")
def bus():
    cfg = load_config(environ={}, overrides={"records.payload_bytes": DTYPE.itemsize - 64,
                                             "processors.transactional.max_workers": 3,
                                             "processors.batch.max_workers": 2})
    b = EventBusMulti(cfg, DTYPE)
    yield b
    b.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=few)
def test_small_routing_matches_the_vectorized_one(bus, rows):
    topics = TopicTable()
    recs = make_records(topics, len(rows), topic=[f"t{t}" for _p, t, _i in rows])
    recs["priority"] = [p for p, _t, _i in rows]
    small = [(q.name, r.name, None if s is None else s.tolist()) for q, r, s in bus._split_small(recs)]
    many = [(q.name, r.name, None if s is None else s.tolist()) for q, r, s in bus._split_many(recs)]
    assert small == many
    # every record goes to exactly one destination
    placed = sorted(i for _q, _r, s in small for i in (range(len(recs)) if s is None else s))
    assert placed == list(range(len(recs)))


@settings(max_examples=200, deadline=None)
@given(rows=few, committed=st.lists(st.integers(0, 3), max_size=4))
def test_few_duplicates_match_the_vectorized_ones(rows, committed):
    topics = TopicTable()
    ids = [i for _p, _t, i in rows]
    recs = make_records(topics, len(rows), topic=[f"t{t}" for _p, t, _i in rows], ids=ids)
    a, b = Deduplicator(64, 60.0), Deduplicator(64, 60.0)
    try:
        for d in (a, b):  # the same history in both tables
            earlier = make_records(topics, len(committed), topic="t0", ids=committed) if committed else None
            if earlier is not None:
                d.commit(*idempotency.key_columns(earlier))
        pairs, skip = idempotency.duplicates_few(recs, a)
        probed, skipv = idempotency.duplicates(recs, b)
        assert pairs == list(zip(probed.ids.tolist(), probed.tags.tolist()))
        assert skip == skipv.tolist()
        # the kept keys, committed either way, leave the same table behind
        a.commit_few([p for p, s in zip(pairs, skip) if not s])
        probed.select(~skipv).commit(b)
        ids_, tags_ = idempotency.key_columns(recs)
        assert a.seen(ids_, tags_).tolist() == b.seen(ids_, tags_).tolist()
        assert all(a.seen_few([p for p in pairs if p[0]]))
        assert len(a) == len(b)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("n", [1, 2, fmt.SMALL_BATCH, fmt.SMALL_BATCH + 1, 50])
def test_event_log_entries_are_the_same_bytes_either_way(n, monkeypatch):
    rng = np.random.default_rng(n)
    batch = np.zeros(n, DTYPE)
    batch.view(np.uint8)[:] = rng.integers(0, 256, n * DTYPE.itemsize, dtype=np.uint8)
    batch["ext_class"] = 0  # payloads inline (arena payloads make KIND_RECORD_EXT entries)
    ids = rng.integers(1, 1000, n).astype(np.uint32)
    small = fmt._record_entries_small(batch, ids.tolist(), 1_700_000_000_000_000_000)
    monkeypatch.setattr(fmt, "SMALL_BATCH", 0)
    vectorized = fmt._record_entries_v1(batch, ids, 1_700_000_000_000_000_000)  # version 1 entries
    assert small == vectorized
    assert len(small) == n * (fmt.ENTRY_HEADER_BYTES + DTYPE.itemsize)
