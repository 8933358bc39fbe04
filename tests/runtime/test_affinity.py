"""CPU pinning from inside a thread."""

from __future__ import annotations

import os
import threading

import pytest

from eventstream.runtime import affinity, topology


def in_thread(fn):
    out = {}

    def body():
        try:
            out["result"] = fn()
            out["now"] = sorted(os.sched_getaffinity(0))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return out


def test_pins_only_the_calling_thread(cpus):
    before = sorted(os.sched_getaffinity(0))
    out = in_thread(lambda: affinity.pin_current_thread([cpus[0]], "test"))
    assert out["result"] == [cpus[0]] and out["now"] == [cpus[0]]
    assert sorted(os.sched_getaffinity(0)) == before


def test_empty_means_unpinned(cpus):
    out = in_thread(lambda: affinity.pin_current_thread([], "test"))
    assert out["now"] == cpus


def test_unknown_cpu_strict_raises_naming_allowed(cpus):
    out = in_thread(lambda: affinity.pin_current_thread([9999], "dispatcher", strict=True))
    err = out["error"]
    assert isinstance(err, affinity.AffinityError)
    assert "dispatcher" in str(err) and "9999" in str(err) and str(cpus) in str(err)


def test_unknown_cpu_degrades_to_valid_ones(cpus):
    out = in_thread(lambda: affinity.pin_current_thread([cpus[-1], 9999], "x"))
    assert out["result"] == [cpus[-1]] and out["now"] == [cpus[-1]]


def test_refused_setaffinity_degrades_with_warning(monkeypatch, cpus):
    def refuse(pid, mask):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    out = in_thread(lambda: affinity.pin_current_thread([cpus[0]], "x"))
    assert "error" not in out
    assert out["result"] == cpus


def test_validate_cpus(cpus):
    assert affinity.validate_cpus(reversed(cpus)) == cpus
    with pytest.raises(affinity.AffinityError, match="allowed"):
        affinity.validate_cpus([cpus[-1] + 1000])


def test_topology_has_every_allowed_cpu(cpus):
    topo = topology.detect()
    assert sorted(c for n in topo.nodes for c in n.cpus) == cpus
    assert not topo.simulated


def test_simulated_topology_splits_cpus(cpus):
    topo = topology.simulate(len(cpus))
    assert topo.simulated and len(topo.nodes) == len(cpus)
    assert sorted(c for n in topo.nodes for c in n.cpus) == cpus
    with pytest.raises(ValueError, match="allowed: 1.."):
        topology.simulate(len(cpus) + 1)
