"""Flows inside a real Service: TCP in, the real log, outputs stored back, snapshots, restarts, DLQ."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
from flow_helpers import S, engine_config, stored, stored_json, wait_until

from eventstream.client import TcpClient
from eventstream.engine.dlq_reader import read_dlq
from eventstream.flow import Count, Flow, Json, Tumbling, ids
from eventstream.runtime import gil
from eventstream.service import Service

GIL_ON = gil.gil_enabled()
T0 = 1_700_000_000 * S


def count_flow(name="counts"):
    flow = Flow(name, ["clicks.*"], serde=Json())
    (flow.key_by(lambda v: v["user"]).window(Tumbling(1), Count(), late="clicks.late")
         .map(lambda r: {"user": r.key, "start": r.start, "n": r.value}).to("clicks.counts"))
    return flow


def send(svc, events):
    """(topic, value, event time ns, event id) over TCP; waits for every ACK (stored)."""
    with TcpClient("127.0.0.1", svc.tcp.address[1], version=2, timeout=30) as c:
        for topic, value, ts, eid in events:
            c.send(topic, json.dumps(value).encode(), priority=2, event_id=eid, timestamp_ns=ts)
        assert c.wait_acked(30)


def test_a_windowed_count_runs_in_the_engine_and_restarts_from_its_snapshot(tmp_path):
    data = tmp_path / "data"
    cfg = engine_config(data, **{"flows.parallelism": 2})
    first = [("clicks.web", {"user": u}, T0 + int(t * S), i + 1)
             for i, (u, t) in enumerate([("a", 0.1), ("b", 0.2), ("a", 0.9), ("a", 1.5), ("b", 1.6)])]
    with Service(cfg, flows=[count_flow()]) as svc:
        send(svc, first + [("clicks.web", {"user": "a"}, T0 + int(2.2 * S), 6),
                           ("clicks.web", {"user": "b"}, T0 + int(2.3 * S), 7)])
        wait_until(lambda: len(stored(data, "clicks.counts")) >= 4, 30, "the first windows")
    got = stored_json(data, "clicks.counts")
    assert sorted((r["user"], (r["start"] - T0) // S, r["n"]) for r in got) == [
        ("a", 0, 2), ("a", 1, 1), ("b", 0, 1), ("b", 1, 1)]
    snaps = list((data / "flows").glob("*.snapshot"))
    assert [p.name for p in snaps] == ["counts.snapshot"]

    # restart: state (windows at 2 s) and offset come from the snapshot; nothing is emitted twice
    with Service(cfg, flows=[count_flow()]) as svc:
        send(svc, [("clicks.web", {"user": "a"}, T0 + int(2.5 * S), 8), ("clicks.web", {"user": "a"}, T0 + 4 * S, 9),
                   ("clicks.web", {"user": "b"}, T0 + 4 * S, 10),
                   ("clicks.web", {"user": "a"}, T0 + int(0.5 * S), 11)])  # late: to clicks.late
        wait_until(lambda: len(stored(data, "clicks.counts")) >= 6, 30, "the windows at 2 s")
        wait_until(lambda: stored(data, "clicks.late"), 30, "the late event")
        stats = svc.flows.statistics()[0]
    got = stored_json(data, "clicks.counts")
    assert sorted((r["user"], (r["start"] - T0) // S, r["n"]) for r in got) == [
        ("a", 0, 2), ("a", 1, 1), ("a", 2, 2), ("b", 0, 1), ("b", 1, 1), ("b", 2, 1)]
    ids_ = [eid for eid, _ in stored(data, "clicks.counts")]
    assert len(set(ids_)) == len(ids_) and 0 not in ids_
    assert stored_json(data, "clicks.late") == [{"user": "a"}]
    assert stats["flow"] == "counts" and stats["parallelism"] == 2 and stats["state_keys"] == 2
    assert stats["watermark_ns"] == T0 + 4 * S


def test_an_operator_that_raises_dead_letters_with_its_name_and_the_flow_keeps_running(tmp_path):
    data = tmp_path / "data"
    flow = Flow("ratio", "nums", serde=Json())
    flow.map(lambda v: {"r": 100 // v["d"]}, name="divide").to("ratios")
    with Service(engine_config(data), flows=[flow]) as svc:
        send(svc, [("nums", {"d": d}, T0 + i, i + 1) for i, d in enumerate([4, 0, 5])])
        wait_until(lambda: len(stored(data, "ratios")) >= 2, 30, "the outputs")
        wait_until(lambda: svc.metrics.dropped_by_reason().get("flow_error"), 30, "the dead letter")
        assert svc.failures() == []
        text = svc.metrics.render().decode()
    # per-operator metrics, labels {flow, operator} only
    assert 'flow_operator_errors_total{flow="ratio",operator="divide"} 1.0' in text
    assert 'flow_operator_in_total{flow="ratio",operator="divide"} 3.0' in text
    assert 'flow_operator_out_total{flow="ratio",operator="divide"} 2.0' in text
    assert 'flow_operator_state_keys{flow="ratio",operator="divide"} 0.0' in text
    assert stored_json(data, "ratios") == [{"r": 25}, {"r": 20}]
    entries = [e for e in read_dlq(data / "dlq_log.txt") if e.reason.startswith("flow_error")]
    assert len(entries) == 1
    assert entries[0].reason.startswith("flow_error: ratio.divide: ZeroDivisionError")
    assert entries[0].topic == "nums" and json.loads(entries[0].payload) == {"d": 0}


# ---------------------------------------------------------------------------------------- parallel
MEET_TIMEOUT_S = 30.0
LOCKSTEP_ROUNDS = 5_000
LOCKSTEP_BOUND_S = 60.0


def lockstep(box: list[int], me: int, rounds: int, deadline: float) -> int:
    """Turns on box[0]: partition 0 moves it from even to odd, partition 1 back, each spinning in pure
    Python until it is its turn (tests/engine/test_parallel_handlers.py explains why)."""
    done = spins = 0
    while done < rounds:
        v = box[0]
        if v & 1 == me:
            box[0] = v + 1
            done += 1
        else:
            spins += 1
            if not spins & 0x3FFF and time.monotonic() > deadline:
                break
    return done


class Meeting:
    """A map function: its first call on each of two partition threads meets the other one."""

    def __init__(self, rounds: int, parts: dict[str, int]):
        self.rounds = rounds
        self.parts = parts  # key -> partition: 0 spins for even, 1 for odd
        self.barrier = threading.Barrier(2, timeout=MEET_TIMEOUT_S)
        self.threads: list[str] = []
        self.turns: list[int] = []
        self.gil: list[bool] = []
        self.errors: list[BaseException] = []
        self.box = [0]

    def __call__(self, v):
        me = self.parts[v["user"]]
        self.threads.append(threading.current_thread().name)
        try:
            self.barrier.wait()
            self.gil.append(sys._is_gil_enabled())
            if self.rounds:
                self.turns.append(lockstep(self.box, me, self.rounds, time.monotonic() + LOCKSTEP_BOUND_S))
            self.barrier.wait()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
        return v


def meet_in_partitions(tmp_path, rounds: int) -> tuple[Meeting, list]:
    data = tmp_path / "data"
    cfg = engine_config(data, **{"flows.parallelism": 2})
    # two keys that live in different partitions
    users = [f"u{i}" for i in range(20)]
    part = {u: int(ids.partition_of(ids.KeyHasher().hashes([u]), 2)[0]) for u in users}
    a = next(u for u in users if part[u] == 0)
    b = next(u for u in users if part[u] == 1)
    with Service(cfg) as svc:  # stored first: the flow then reads both events in one step
        send(svc, [("clicks.web", {"user": a}, T0, 1), ("clicks.web", {"user": b}, T0, 2)])
    meeting = Meeting(rounds, {a: 0, b: 1})
    flow = Flow("meet", "clicks.*", serde=Json())
    flow.key_by(lambda v: v["user"]).map(meeting, name="meet").to("met")
    with Service(cfg, flows=[flow]):
        wait_until(lambda: len(stored(data, "met")) == 2, 2 * MEET_TIMEOUT_S + LOCKSTEP_BOUND_S, "both outputs")
    return meeting, stored_json(data, "met")


def test_two_partitions_are_inside_python_operators_at_the_same_moment(tmp_path):
    meeting, out = meet_in_partitions(tmp_path, rounds=0)
    assert meeting.errors == []
    assert sorted(meeting.threads) == ["es-flow-meet-0", "es-flow-meet-1"]
    assert len(out) == 2


@pytest.mark.skipif(GIL_ON, reason="the GIL is on (make test-gil): Python code cannot run in parallel, "
                                   "which is what this test proves; its control is the next test")
def test_partitions_run_python_operators_in_parallel_with_the_gil_off(tmp_path):
    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)  # with a GIL, the spinning thread would keep it for 100 s
    try:
        meeting, out = meet_in_partitions(tmp_path, rounds=LOCKSTEP_ROUNDS)
    finally:
        sys.setswitchinterval(old)
    assert meeting.errors == []
    assert sorted(meeting.threads) == ["es-flow-meet-0", "es-flow-meet-1"]
    assert meeting.gil == [False, False]
    assert meeting.turns == [LOCKSTEP_ROUNDS, LOCKSTEP_ROUNDS], "the partitions did not run side by side"
    assert len(out) == 2


@pytest.mark.skipif(not GIL_ON, reason="control for the test above: needs the GIL on (`make test-gil`)")
def test_control_the_lockstep_cannot_complete_with_the_gil_on():
    box, turns = [0], [0, 0]
    start = threading.Barrier(2, timeout=MEET_TIMEOUT_S)

    def run(me: int) -> None:
        start.wait()
        turns[me] = lockstep(box, me, LOCKSTEP_ROUNDS, time.monotonic() + 0.5)

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(MEET_TIMEOUT_S + 10)
    finally:
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads)
    assert sys._is_gil_enabled()
    assert sum(turns) < 2 * LOCKSTEP_ROUNDS, turns


def test_the_flows_command_lists_lag_watermark_and_state(tmp_path, capsys):
    from eventstream.cli.main import main

    data = tmp_path / "data"
    with Service(engine_config(data), flows=[count_flow()]) as svc:
        send(svc, [("clicks.web", {"user": u}, T0 + i * S // 2, i + 1) for i, u in enumerate("abab")])
        # 4 inputs, then its own 2 outputs (window [0, 1 s) of a and b), which it reads past
        wait_until(lambda: svc.flows.statistics()[0]["offset"] == 6, 30, "the flow to read everything")
    with Service(engine_config(data)) as svc:  # the flow is not running now: its lag grows
        send(svc, [("clicks.web", {"user": "c"}, T0 + 9 * S, 99)])
    capsys.readouterr()
    assert main(["flows", "--data-dir", str(data), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["flow"] == "counts" and st["offset"] == 6 and st["log_end"] == 7 and st["lag"] == 1
    assert st["watermark_ns"] == T0 + int(1.5 * S) and st["state_keys"] == 2  # window [1 s, 2 s) of a and b
    ops = {o["operator"]: o for o in st["operators"]}
    assert ops["window1"]["in"] == 4 and ops["window1"]["out"] == 2 and ops["key_by1"]["out"] == 4
    assert main(["flows", "--data-dir", str(data)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["flow", "par", "offset", "lag"]
    assert table[1].split()[:4] == ["counts", "1", "6", "1"]
    assert main(["flows", "--data-dir", str(tmp_path / "none")]) == 1
    assert "no flows in" in capsys.readouterr().err
