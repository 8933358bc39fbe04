"""Property test: random put/poll/release sequences never lose, duplicate or reorder a record."""

from __future__ import annotations

from core_helpers import SMALL_DTYPE, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstream.core.ring import MpscRing, Overflow, SpscRing

ops = st.lists(st.tuples(st.sampled_from(["put", "poll"]), st.integers(1, 40), st.integers(0, 40)),
               min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, multi=st.booleans(), overflow=st.sampled_from(list(Overflow)), cap_bits=st.integers(1, 5))
def test_random_operations_keep_every_record_exactly_once(ops, multi, overflow, cap_bits):
    cls = MpscRing if multi else SpscRing
    with cls(1 << cap_bits, SMALL_DTYPE, overflow=overflow, block_timeout=0.0) as r:
        sent = 0
        returned: list[int] = []
        consumed: list[int] = []
        for op, a, b in ops:
            if op == "put":
                rest = r.put_batch(make_batch(0, sent, a))
                returned += rest["seq"].tolist()
                sent += a
            else:
                views = r.poll(a)
                got = [int(s) for v in views for s in v["seq"]]
                k = min(b, len(got))
                consumed += got[:k]
                r.release(k)
        while True:  # drain (a partially released poll is returned first)
            views = r.poll(1 << cap_bits)
            if not views:
                break
            n = sum(len(v) for v in views)
            consumed += [int(s) for v in views for s in v["seq"]]
            r.release(n)
        assert consumed == sorted(consumed), "consumer saw records out of order"
        assert sorted(consumed + returned) == list(range(sent)), "a record was lost or duplicated"
        if overflow is not Overflow.DROP_OLD:  # only DROP_OLD hands back records it had accepted
            assert returned == sorted(returned)
        stats = r.statistics()
        assert stats["consumed"] == len(consumed) and stats["dropped"] == len(returned)
        assert stats["depth"] == 0 and stats["published"] - stats["evicted"] == len(consumed)
