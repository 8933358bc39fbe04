"""deploy/: the Prometheus alert rules and the Grafana dashboard name only metrics a fresh engine
exports at its first scrape (a renamed metric fails here), promtool accepts and unit-tests the rules,
and the visibility metrics (group lag, subscriber sessions and credit, retention) move with real
subscribers over real sockets."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eventstream.client import TcpClient, subscribe
from eventstream.config import load_config
from eventstream.service import Service

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULES_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "eventstream.json"

# PromQL words that are not metric names
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "le", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, label names
    (inside {...} or the parentheses after by/without/on/ignoring) or durations."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_the_name_extraction_sees_every_selector_and_nothing_else():
    assert promql_metric_names('histogram_quantile(0.99, sum by (le, queue) (rate(latency_seconds_bucket[5m])))') \
        == {"latency_seconds_bucket"}
    assert promql_metric_names('dedup_window_held_seconds{tier="x"} < dedup_window_seconds') \
        == {"dedup_window_held_seconds", "dedup_window_seconds"}


def first_scrape(tmp_path: Path) -> set[str]:
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
        "storage.data_dir": str(tmp_path / "data"), "records.payload_bytes": 64})
    with Service(cfg) as svc, urllib.request.urlopen(svc.exporter.url, timeout=30) as r:
        text = r.read().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def rule_exprs() -> list[tuple[str, str]]:
    import yaml

    doc = yaml.safe_load(RULES.read_text())
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    assert [v["name"] for v in dash["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    out, ids = [], set()
    for p in dash["panels"]:
        assert p["id"] not in ids, f"panel id {p['id']} twice"
        ids.add(p["id"])
        assert p["type"] in ("timeseries", "stat", "gauge", "table") and p["title"]
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["x"] + g["w"] <= 24
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs)
        out += [(p["title"], t["expr"]) for t in p["targets"]]
    return out


def test_rules_and_dashboard_name_only_metrics_of_the_first_scrape(tmp_path):
    exported = first_scrape(tmp_path)
    wanted = {"subscribe_group_lag_events", "subscribe_group_lag_seconds", "subscribe_lag_events",
              "subscribe_lag_seconds", "subscribe_sessions",
              "subscribe_credit_outstanding", "dlq_segments_deleted_total", "log_segments_deleted_total",
              "dedup_window_held_seconds", "dedup_window_seconds", "dedup_evicted_total", "threads_failed",
              "pipeline_state", "events_dropped_total"}
    assert wanted <= exported, f"not in the first scrape: {sorted(wanted - exported)}"
    exprs = rule_exprs() + dashboard_exprs()
    missing = {(where, n) for where, e in exprs for n in promql_metric_names(e) if n not in exported}
    assert not missing, f"deploy/ names metrics the engine does not export: {sorted(missing)}"
    alerts = {name for name, _ in rule_exprs()}
    for topic in ("GroupLag", "Dropped", "Critical", "DedupWindow", "ThreadDied"):
        assert any(topic in a for a in alerts), f"no alert about {topic}"


def promtool_or_skip() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        msg = "promtool is not on PATH (Debian package `prometheus`; `make test` installs it via tools/test-deps.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return promtool


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = promtool_or_skip()
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", RULES_TEST.name], capture_output=True, text=True, timeout=120,
                       cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert tested == {name for name, _ in rule_exprs()}, "every alert has a promtool unit test"


def scrape(svc) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(svc.exporter.url, timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_group_lag_sessions_and_credit_follow_real_subscribers(tmp_path):
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.enabled": False, "metrics.port": 0, "server.subscribe.port": 0,
        "storage.data_dir": str(tmp_path / "data"), "records.payload_bytes": 64})
    with Service(cfg) as svc:
        m = scrape(svc)
        assert m[("subscribe_group_lag_events", ())] == 0 and m[("subscribe_groups", ())] == 0
        assert m[("subscribe_sessions", (("kind", "group"),))] == 0
        with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30) as c:
            for i in range(100):
                c.send("lag.t", b"%d" % i, event_id=i + 1)
            assert c.wait_acked(30) and c.nacked == 0
        sub_port = svc.subscribe.address[1]
        with subscribe("127.0.0.1", sub_port, "lag.*", group="billing", credit=30) as s:
            got = []
            deadline = time.monotonic() + 20
            while len(got) < 30:
                ev = s.poll(max(0.0, deadline - time.monotonic()))
                assert ev is not None, f"got {len(got)} of 30 events"
                got.append(ev)
            assert s.commit() == 30
            m = scrape(svc)
            assert m[("subscribe_sessions", (("kind", "group"),))] == 1
            # the client grants credit back as it takes events: at most its 30 are outstanding
            assert 0 <= m[("subscribe_credit_outstanding", ())] <= 30
            assert m[("subscribe_credit_exhausted", ())] in (0, 1)
            assert m[("subscribe_groups", ())] == 1
            assert m[("subscribe_group_lag_events", ())] == 70  # 100 stored, 30 committed
            assert m[("subscribe_group_lag_seconds", ())] > 0
        # a group with no member still lags (its committed offset is on disk)
        m = scrape(svc)
        assert m[("subscribe_group_lag_events", ())] == 70
        with subscribe("127.0.0.1", sub_port, "lag.*", group="billing", credit=100) as s:
            for _ in range(70):
                assert s.poll(20) is not None
            assert s.commit() == 100  # the group's committed offset: all 100
        m = scrape(svc)
        assert m[("subscribe_group_lag_events", ())] == 0 and m[("subscribe_group_lag_seconds", ())] == 0


def lag_series(m) -> dict[str, tuple[float, float]]:
    return {dict(k[1])["group"]: (v, m[("subscribe_lag_seconds", k[1])])
            for k, v in m.items() if k[0] == "subscribe_lag_events"}


def test_lag_per_group_is_bounded_and_there_from_the_first_scrape_after_a_restart(tmp_path):
    data = tmp_path / "data"

    def cfg():
        return load_config(environ={}, overrides={
            "server.tcp.port": 0, "server.udp.enabled": False, "metrics.port": 0, "server.subscribe.port": 0,
            "storage.data_dir": str(data), "records.payload_bytes": 64, "server.subscribe.lag_group_series": 2})

    with Service(cfg()) as svc:
        assert lag_series(scrape(svc)) == {"_other": (0, 0)}  # no group yet: the fold, at 0
        with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30) as c:
            for i in range(100):
                c.send("pg.t", b"%d" % i, event_id=i + 1)
            assert c.wait_acked(30) and c.nacked == 0
        port = svc.subscribe.address[1]
        for group, n in (("a", 10), ("b", 100), ("c", 40), ("d", 75)):  # committed: 10, 100, 40, 75
            with subscribe("127.0.0.1", port, "pg.*", group=group, credit=n) as s:
                for _ in range(n):
                    assert s.poll(20) is not None
                assert s.commit() == n
        m = scrape(svc)
        per = lag_series(m)
        assert set(per) == {"a", "b", "_other"}  # at most 2 groups get a series: the first by name
        assert per["a"][0] == 90 and per["a"][1] > 0
        assert per["b"] == (0, 0)  # caught up
        assert per["_other"][0] == 60 + 25 and per["_other"][1] > 0  # c and d summed; the older's age
        assert per["_other"][1] <= per["a"][1]  # c's first uncommitted event is newer than a's
        assert m[("subscribe_group_lag_events", ())] == 90  # the worst case stays
    with Service(cfg()) as svc:  # the groups are on disk: their series are there at the first scrape
        per = lag_series(scrape(svc))
        assert set(per) == {"a", "b", "_other"} and per["a"][0] == 90 and per["_other"][0] == 85
        assert per["a"][1] > 0


def test_dlq_retention_counts_the_segments_it_deletes(tmp_path):
    from eventstream.engine.dlq import DeadLetterLog

    dlq = DeadLetterLog(tmp_path / "dlq_log.txt", max_bytes=4096, max_segments=1)
    try:
        for i in range(200):
            dlq.write_line(i + 1, "t", 1, "handler_error: " + "x" * 100)
        st = dlq.statistics()
    finally:
        dlq.close()
    assert st["rotations"] >= 3
    assert st["segments_deleted"] == st["rotations"] - 1  # one old segment kept
    assert len(list(tmp_path.glob("dlq_log.txt.*"))) == 1
