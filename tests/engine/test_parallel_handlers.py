"""Plain-Python handlers run in parallel with the GIL off (issue #13).

A real Service (TCP ingest, two transactional workers) receives two MEDIUM events on two
topics that live in different partitions, so each worker takes one event, holding its partition's token.
The handler meets the other worker at a `threading.Barrier(2)`: passing it proves two processor
threads were inside handler code at the same moment. That alone is also true with the GIL (a thread
waiting at a barrier releases it), so with the GIL off the handlers then also take turns in lockstep on
a shared counter, in pure Python, with the interpreter's switch interval raised to 100 s: with a GIL,
the spinning thread would keep it and the other could never take its turn (see the control test at the
end, which runs only with the GIL on).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.runtime import gil
from eventstream.service import Service
from eventstream.storage import EventLogReader

GIL_ON = gil.gil_enabled()
MEET_TIMEOUT_S = 30.0  # the barrier's timeout: a bound, never a speed expectation
LOCKSTEP_ROUNDS = 5_000  # turns each thread takes on the shared counter
LOCKSTEP_BOUND_S = 60.0  # give up (and fail) after this; with the GIL off it takes milliseconds


def lockstep(box: list[int], me: int, rounds: int, deadline: float) -> int:
    """Take `rounds` turns on box[0]: thread 0 moves it from even to odd, thread 1 from odd to even,
    each spinning in pure Python until it is its turn. Returns the turns taken before `deadline`."""
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
    """The handler: the first two calls (from two different threads) meet, the rest return."""

    def __init__(self, rounds: int):
        self.rounds = rounds
        self.barrier = threading.Barrier(2, timeout=MEET_TIMEOUT_S)
        self.lock = threading.Lock()
        self.threads: list[str] = []
        self.gil_while_both_inside: list[bool] = []
        self.turns: list[int] = []
        self.errors: list[BaseException] = []
        self.box = [0]
        self.finished = 0
        self.done = threading.Event()

    def __call__(self, batch) -> None:
        with self.lock:
            if len(self.threads) >= 2:
                return
            me = len(self.threads)
            self.threads.append(threading.current_thread().name)
        try:
            self.barrier.wait()  # both threads are inside handler code from here ...
            self.gil_while_both_inside.append(sys._is_gil_enabled())
            if self.rounds:
                self.turns.append(lockstep(self.box, me, self.rounds, time.monotonic() + LOCKSTEP_BOUND_S))
            self.barrier.wait()  # ... to here
        except BaseException as exc:  # noqa: BLE001 - reported by the test, not retried by the engine
            self.errors.append(exc)
        finally:
            with self.lock:
                self.finished += 1
                if self.finished == 2:
                    self.done.set()


def meet_in_handlers(tmp_path: Path, rounds: int) -> tuple[Meeting, list[int]]:
    """Run a Service whose transactional handler is a Meeting; returns it and the stored event ids."""
    data = tmp_path / "data"
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
        "records.payload_bytes": 64, "processors.transactional.workers": 2,
        "processors.transactional.max_workers": 2, "processors.transactional.max_retries": 0,
    })
    meeting = Meeting(rounds)
    svc = Service(cfg, handlers={"transactional": meeting})
    # topics get ids on first sight; name them now so the test knows their partitions
    names = ("orders.eu", "orders.us")
    ids = [svc.engine.topics.intern(n) for n in names]
    with svc:
        parts = svc.engine.bus["transactional"].partitions
        assert parts == 2 and len(svc.engine.manager.workers["transactional"]) == 2
        assert ids[0] % parts != ids[1] % parts, "the two topics must land in different partitions"
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=2, timeout=30) as client:
            for i, name in enumerate(names, 1):
                client.send(name, b"work", priority=2, event_id=i)  # MEDIUM -> transactional
            assert client.wait_acked(30)
        assert meeting.done.wait(2 * MEET_TIMEOUT_S + LOCKSTEP_BOUND_S), \
            f"handlers did not both finish; entered: {meeting.threads}"
    stored = sorted(EventLogReader(data / "events.bin").read().records["event_id"].tolist())
    return meeting, stored


def test_two_processor_threads_are_inside_handlers_at_the_same_moment(tmp_path):
    meeting, stored = meet_in_handlers(tmp_path, rounds=0)
    assert meeting.errors == []  # no BrokenBarrierError: both were there within the timeout
    assert len(set(meeting.threads)) == 2, meeting.threads
    assert all(t.startswith("es-transactional-") for t in meeting.threads), meeting.threads
    assert stored == [1, 2]  # both handlers returned normally and the events were stored


@pytest.mark.skipif(GIL_ON, reason="the GIL is on (EVENTSTREAM_ALLOW_GIL=1, as `make test-gil` runs): "
                                   "Python code cannot run in parallel, which is what this test proves")
def test_handlers_run_python_in_parallel_with_the_gil_off(tmp_path):
    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)  # with a GIL, a spinning thread would keep it for 100 s
    try:
        meeting, stored = meet_in_handlers(tmp_path, rounds=LOCKSTEP_ROUNDS)
    finally:
        sys.setswitchinterval(old)
    assert meeting.errors == []
    assert len(set(meeting.threads)) == 2
    assert meeting.gil_while_both_inside == [False, False]
    assert meeting.turns == [LOCKSTEP_ROUNDS, LOCKSTEP_ROUNDS], "the handlers did not run side by side"
    assert meeting.box[0] == 2 * LOCKSTEP_ROUNDS
    assert stored == [1, 2]


@pytest.mark.skipif(not GIL_ON, reason="control for the test above: needs the GIL on (`make test-gil`)")
def test_control_lockstep_cannot_complete_with_the_gil_on():
    """With the GIL on and a 100 s switch interval, the lockstep stalls: the spinning thread keeps the
    GIL until its deadline. So a completed lockstep above really means parallel execution."""
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
