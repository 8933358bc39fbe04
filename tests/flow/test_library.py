"""The flow library through eventstream.testing: operators, windows, watermarks, serde, state."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from eventstream.flow import (Collect, Count, Dtype, Flow, FlowError, Fold, Hopping, Joined, Json, Max, Session,
                              Sum, Tumbling, WindowResult)
from eventstream.testing import Event, FlowTest, ManualClock, run_flow

S = 1_000_000_000


def test_stateless_operators_in_order():
    flow = Flow("words", "text.*", serde="text")
    long, short = (flow.flat_map(str.split).map(str.upper).filter(lambda w: w != "THE")
                   .branch(lambda w: len(w) > 3))
    long.to("long")
    short.map(lambda w: w.lower()).merge(long).to("all")
    out = run_flow(flow, ["the quick brown fox", "jumps over the dog"])
    assert out["long"] == ["QUICK", "BROWN", "JUMPS", "OVER"]
    # source-log order; outputs of one source event: the merged streams in merge order
    assert out["all"] == ["fox", "QUICK", "BROWN", "dog", "JUMPS", "OVER"]
    assert len(set(out.ids("all"))) == 6 and 0 not in out.ids("all")


def test_tumbling_count_with_out_of_order_and_late_events():
    flow = Flow("clicks", "clicks", serde=Json())
    (flow.key_by(lambda v: v["user"])
         .window(Tumbling(60), Count(), max_out_of_orderness=5, late="clicks.late")
         .to("counts"))
    events = [Event({"user": "a"}, 10), Event({"user": "b"}, 20), Event({"user": "a"}, 58),
              Event({"user": "a"}, 62),   # watermark 57: window [0, 60) still open
              Event({"user": "a"}, 55),   # out of order but in time
              Event({"user": "b"}, 70),   # watermark 65: [0, 60) fires
              Event({"user": "a"}, 59),   # late: behind the watermark past the window's end
              Event({"user": "b"}, 130)]
    out = run_flow(flow, events)
    assert out["counts"] == [WindowResult("a", 0, 60 * S, 3), WindowResult("b", 0, 60 * S, 1),
                             WindowResult("a", 60 * S, 120 * S, 1), WindowResult("b", 60 * S, 120 * S, 1),
                             WindowResult("b", 120 * S, 180 * S, 1)]
    assert out["clicks.late"] == [{"user": "a"}]


def test_late_events_go_to_the_dead_letter_log_by_default_and_allowed_lateness_keeps_them():
    def build(lateness):
        flow = Flow("c", "c", serde=Json())
        flow.key_by(lambda v: v["k"]).window(Tumbling(10), Count(), allowed_lateness=lateness).to("out")
        return flow

    events = [Event({"k": 1}, 1), Event({"k": 1}, 12), Event({"k": 1}, 2)]
    out = run_flow(build(0), events)
    assert [r.value for r in out["out"]] == [1, 1]
    assert len(out.late) == 1 and out.late[0][1].startswith("late: c.window1")
    out = run_flow(build(5), events)
    assert [r.value for r in out["out"]] == [2, 1] and out.late == []


def results_by_batching(flow_factory, events, batch_size, partitions):
    out = run_flow(flow_factory(), events, batch_size=batch_size, partitions=partitions)
    return sorted(zip(out.ids("out"), map(repr, out["out"]))), sorted(map(repr, out.late))


def test_results_and_ids_do_not_depend_on_batching_or_partitions():
    rng = np.random.default_rng(7)
    n = 3000
    ts = np.arange(n) * 0.01 + rng.integers(0, 300, n) * 0.001  # out of order by up to 0.3 s
    ts[rng.integers(0, n, 40)] -= 3  # some very late
    events = [Event({"k": int(k), "x": int(x)}, float(t))
              for k, x, t in zip(rng.integers(0, 50, n), rng.integers(0, 100, n), ts)]

    def factory():
        flow = Flow("det", "t", serde=Json())
        keyed = flow.key_by(lambda v: v["k"])
        keyed.window(Hopping(2, 1), Sum(each=lambda v: v["x"]), max_out_of_orderness=0.2).to("out")
        return flow

    for parts in (1, 2, 3):  # watermarks are per partition: results depend on the partition count only
        base = results_by_batching(factory, events, 10_000, parts)
        assert len(base[0]) > 100 and len(base[1]) > 0
        for bs in (1, 7, 333):
            assert results_by_batching(factory, events, bs, parts) == base, (bs, parts)


def test_session_windows_merge_and_close():
    flow = Flow("s", "clicks", serde=Json())
    flow.key_by(lambda v: v["u"]).window(Session(30), Collect(), max_out_of_orderness=60).to("out")
    ev = [Event({"u": "a", "p": 1}, 0), Event({"u": "a", "p": 2}, 20), Event({"u": "b", "p": 9}, 25),
          Event({"u": "a", "p": 4}, 80), Event({"u": "a", "p": 3}, 50),  # bridges [0, 20] and [80]
          Event({"u": "b", "p": 10}, 500)]
    out = run_flow(flow, ev, batch_size=2)
    got = [(r.key, r.start // S, r.end // S, [v["p"] for v in r.value]) for r in out["out"]]
    assert got == [("b", 25, 55, [9]), ("a", 0, 110, [1, 2, 4, 3]), ("b", 500, 530, [10])]
    # without room for disorder the bridging event comes after [0, 20] closed: it is late
    flow2 = Flow("s2", "clicks", serde=Json())
    flow2.key_by(lambda v: v["u"]).window(Session(30), Collect()).to("out")
    out = run_flow(flow2, ev, batch_size=2)
    assert [v["p"] for v, _ in out.late] == [3]


def test_windowed_join_of_two_keyed_streams():
    flow = Flow("j", ["orders", "users"], serde=Json())
    orders = flow.filter(lambda v: "order" in v).key_by(lambda v: v["user"])
    users = flow.filter(lambda v: "name" in v).key_by(lambda v: v["user"])
    orders.join(users, Tumbling(60), how="left").map(
        lambda j: (j.key, j.left["order"], j.right and j.right["name"])).to("out")
    ev = [Event({"user": 1, "name": "ann"}, 1, "users"), Event({"user": 1, "order": 10}, 2, "orders"),
          Event({"user": 2, "order": 11}, 3, "orders"), Event({"user": 1, "order": 12}, 59, "orders"),
          Event({"user": 2, "name": "bob"}, 61, "users"), Event({"user": 2, "order": 13}, 62, "orders")]
    out = run_flow(flow, ev, partitions=2)
    assert sorted(out["out"]) == [(1, 10, "ann"), (1, 12, "ann"), (2, 11, None), (2, 13, "bob")]


def test_numpy_dtype_serde_and_whole_batch_operators():
    dt = np.dtype([("user", "<u4"), ("amount", "<f8"), ("ts", "<i8")])
    flow = Flow("np", "pay", serde=Dtype(dt))
    calls = []

    def double(cols):
        calls.append(type(cols))
        out = cols.copy()
        out["amount"] *= 2
        return out

    (flow.map_batch(double).filter_batch(lambda c: c["amount"] > 0).key_by(field="user")
         .window(Tumbling(1), Sum("amount"), time="ts").to("out"))
    flow.key_by(field="user").window(Tumbling(1), Max("amount"), time="ts", name="max").to("max")
    rows = np.array([(1, 1.5, 0), (2, 2.0, 1), (1, -1.0, 2), (1, 3.0, 10**9 + 5)], dtype=dt)
    out = run_flow(flow, [Event(r.tobytes(), 0) for r in rows])
    assert calls == [np.ndarray]
    assert out["out"] == [WindowResult(1, 0, S, 3.0), WindowResult(2, 0, S, 4.0), WindowResult(1, S, 2 * S, 6.0)]
    assert out["max"] == [WindowResult(1, 0, S, 1.5), WindowResult(2, 0, S, 2.0), WindowResult(1, S, 2 * S, 3.0)]
    bad = run_flow(flow, [Event(b"short", 0)])
    assert bad.dead_letters and "does not match the dtype" in bad.dead_letters[0][1]


def test_an_operator_that_raises_dead_letters_the_event_and_the_flow_goes_on():
    flow = Flow("f", "t", serde=Json())
    flow.map(lambda v: 10 // v["d"], name="divide").to("out")
    out = run_flow(flow, [{"d": 1}, {"d": 0}, {"d": 5}, {"x": 1}])
    assert out["out"] == [10, 2]
    reasons = [r for _, r in out.dead_letters]
    assert reasons[0].startswith("flow_error: f.divide: ZeroDivisionError")
    assert reasons[1].startswith("flow_error: f.divide: KeyError")


def test_processing_time_windows_fire_on_the_clock():
    clock = ManualClock(1000)
    flow = Flow("p", "t", serde="bytes")
    flow.key_by(lambda v: v[:1]).window(Tumbling(10, time="processing"), Count()).to("out")
    t = FlowTest(flow, clock=clock)
    t.send([b"a1", b"a2", b"b1"])
    assert t.outputs["out"] == []
    t.advance(9.9)
    assert t.outputs["out"] == []
    t.advance(0.2)
    assert [(r.key, r.value) for r in t.outputs["out"]] == [(b"a", 2), (b"b", 1)]


def test_reduce_and_aggregate():
    flow = Flow("r", "t", serde=Json())
    keyed = flow.key_by(lambda v: v["k"])
    keyed.map(lambda v: v["x"]).reduce(lambda a, b: a + b).to("each")
    keyed.aggregate(list, lambda acc, v: acc + [v["x"]], emit="final").to("final")
    out = run_flow(flow, [{"k": "a", "x": 1}, {"k": "b", "x": 5}, {"k": "a", "x": 2}])
    assert out["each"] == [1, 5, 3]
    assert sorted(out["final"]) == [[1, 2], [5]]
    assert len(set(out.ids("each"))) == 3


def test_snapshot_then_restore_continues_exactly():
    rng = np.random.default_rng(3)
    events = [Event({"k": int(k)}, float(i) * 0.1) for i, k in enumerate(rng.integers(0, 20, 2000))]

    def factory():
        flow = Flow("snap", "t", serde=Json())
        keyed = flow.key_by(lambda v: v["k"])
        keyed.window(Tumbling(5), Count()).to("out")
        keyed.window(Session(0.5), Fold(int, lambda a, v: a + 1, merge=lambda a, b: a + b), name="sess").to("sess")
        return flow

    whole = run_flow(factory(), events, partitions=2, batch_size=100)
    first = FlowTest(factory(), partitions=2, batch_size=100)
    first.send(events[:1234])
    snap = pickle.loads(pickle.dumps(first.snapshot()))
    second = FlowTest(factory(), partitions=2, batch_size=77)
    second.executor.restore(snap)
    second._offset = 1234
    second.send(events[1234:])
    second.finish()
    for target in ("out", "sess"):
        got = first.outputs.ids(target) + second.outputs.ids(target)
        assert sorted(got) == sorted(whole.ids(target))
        assert sorted(map(repr, first.outputs[target] + second.outputs[target])) == sorted(map(repr, whole[target]))


def test_declaration_errors_say_what_is_allowed():
    flow = Flow("e", "t")
    with pytest.raises(FlowError, match="needs a keyed stream.*key_by"):
        flow.window(Tumbling(1), Count())
    with pytest.raises(ValueError, match="allowed: size and hop > 0, size a whole multiple of hop"):
        Hopping(10, 3)
    with pytest.raises(FlowError, match="operator name 'x' is used twice"):
        flow.map(str, name="x").map(str, name="x")
    with pytest.raises(ValueError, match="allowed: bytes, json, text"):
        Flow("e2", "t", serde="yaml")
    out = run_flow(_keyed_by_list(), [b"x"])
    assert out["o"] == [] and "key [b'x'] of type list is not allowed; allowed: int" in out.dead_letters[0][1]


def _keyed_by_list():
    flow = Flow("kl", "t")
    flow.key_by(lambda v: [v]).window(Tumbling(1), Count()).to("o")
    return flow


def test_joined_is_exported():
    assert Joined._fields == ("key", "start", "end", "left", "right")
