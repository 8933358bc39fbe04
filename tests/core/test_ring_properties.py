"""Property test: random try_put/poll/release sequences never lose, duplicate or reorder a record."""

from __future__ import annotations

from core_helpers import SMALL_DTYPE, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstream.core.ring import MpscRing

ops = st.lists(
    st.tuples(st.sampled_from(["put", "poll"]), st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=60
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, cap_bits=st.integers(1, 5))
def test_random_operations_keep_every_record_exactly_once(ops, cap_bits):
    with MpscRing(1 << cap_bits, SMALL_DTYPE) as r:
        sent = 0  # records offered; the ones that did not fit are offered again first (as the edge holds them)
        consumed: list[int] = []
        marks: list[int] = []
        for op, a, b in ops:
            if op == "put":
                k, end = r.try_put(make_batch(0, sent, a))
                assert 0 <= k <= a and (k == 0) == (end == 0)
                if k:
                    marks.append(end)
                sent += k
            else:
                views = r.poll(a)
                got = [int(s) for v in views for s in v["seq"]]
                k = min(b, len(got))
                consumed += got[:k]
                r.release(k)
            assert r.depth == sent - len(consumed) and r.completed() == len(consumed)
        while True:  # drain (a partially released poll is polled again from its first unreleased record)
            views = r.poll(1 << cap_bits)
            if not views:
                break
            consumed += [int(s) for v in views for s in v["seq"]]
            r.release(sum(len(v) for v in views))
        assert consumed == list(range(sent)), "a record was lost, duplicated or reordered"
        assert marks == sorted(marks) and (not marks or marks[-1] == sent)
        assert r.completed() == sent and r.depth == 0 and r.drained()
