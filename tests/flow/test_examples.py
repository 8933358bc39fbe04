"""The examples/ flows: their sample data through eventstream.testing, and one of them in the engine
from YAML (`flows.builders`), as the README runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flow_helpers import S, engine_config, stored_json, wait_until

from eventstream.client import TcpClient
from eventstream.errors import StartupError
from eventstream.service import Service
from eventstream.testing import run_flow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def examples(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import examples.enrich_join
    import examples.minute_totals
    import examples.sessions

    return examples


def test_minute_totals(examples):
    m = examples.minute_totals
    out = run_flow(m.build(), m.sample())
    t0 = 1_700_000_040 * S
    assert out["orders.totals"] == [
        {"customer": "c1", "minute_start_ns": t0, "total": 12.5}, {"customer": "c2", "minute_start_ns": t0, "total": 5.5},
        {"customer": "c1", "minute_start_ns": t0 + 60 * S, "total": 7.0},
        {"customer": "c2", "minute_start_ns": t0 + 60 * S, "total": 3.0},
        {"customer": "c2", "minute_start_ns": t0 + 120 * S, "total": 2.0}]
    assert out["orders.late"] == [{"customer": "c1", "amount": 5.0}]


def test_sessions(examples):
    m = examples.sessions
    got = [(s["user"], s["seconds"], s["pages"]) for s in run_flow(m.build(), m.sample())["clicks.sessions"]]
    assert got == [("u2", 0.0, ["/home"]), ("u1", 35.0, ["/home", "/shoes", "/cart"]), ("u2", 0.0, ["/help"]),
                   ("u1", 0.0, ["/home"])]


def test_enrich_join(examples):
    m = examples.enrich_join
    got = [(r["order"], r["tier"]) for r in run_flow(m.build(), m.sample(), partitions=2)["shop.enriched"]]
    assert sorted(got, key=lambda t: t[0]) == [(1, "gold"), (2, None), (3, "gold"), (4, "silver")]


@pytest.mark.parametrize("name", ["minute_totals", "sessions", "enrich_join"])
def test_each_example_runs_as_a_script(name):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py")], capture_output=True, text=True,
                         timeout=120, env={"PYTHON_GIL": "0", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) >= 4


def test_minute_totals_from_yaml_in_the_engine(examples, tmp_path):
    data = tmp_path / "data"
    cfg = engine_config(data, **{"flows.builders": ["examples.minute_totals:build"]})
    m = examples.minute_totals
    with Service(cfg) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=2, timeout=30) as c:
            for i, e in enumerate(m.sample(), 1):
                c.send("orders.web", json.dumps(e.value).encode(), priority=2, event_id=i,
                       timestamp_ns=int(e.time * S))
            assert c.wait_acked(30)
        # the first minute closes (watermark 125 s >= 60 s + 10 s lateness); the later ones wait for more time
        wait_until(lambda: len(stored_json(data, "orders.totals")) >= 2, 30, "the totals")
        wait_until(lambda: stored_json(data, "orders.late"), 30, "the late order")
    assert [r["total"] for r in stored_json(data, "orders.totals")] == [12.5, 5.5]
    assert stored_json(data, "orders.late") == [{"customer": "c1", "amount": 5.0}]


def test_a_builder_that_is_not_a_flow_is_refused_at_start(tmp_path):
    cfg = engine_config(tmp_path / "data", **{"flows.builders": ["json:dumps"]})
    with pytest.raises(StartupError, match=r"flows.builders\[0\]: 'json:dumps' raised TypeError.*allowed: a "
                                           "function taking no arguments that returns a Flow"):
        Service(cfg).start()
    cfg = engine_config(tmp_path / "data", **{"flows.builders": ["json:JSONDecoder"]})
    with pytest.raises(StartupError, match="returned JSONDecoder; allowed: a function returning a Flow"):
        Service(cfg).start()
