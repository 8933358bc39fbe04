"""`eventstream top --once` against a real metrics endpoint."""

from __future__ import annotations

import numpy as np

from eventstream.cli.main import main
from eventstream.cli.top import bucket_quantile
from eventstream.metrics import Metrics, MetricsServer


def test_top_once_shows_key_numbers(capsys):
    m = Metrics()
    m.received(12345)
    m.processed("realtime", latencies_ns=np.full(100, 40_000))
    m.dropped("overflow:realtime", 17)
    m.set_state(2, "DEGRADED")
    m.watch_queue("transactional", lambda: 321)
    with MetricsServer(m.registry, port=0) as server:
        assert main(["top", "--once", "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "state      DEGRADED (2)" in out
    assert "received   12,345" in out and "processed  100" in out
    assert "dropped    17  overflow=17\n" in out
    assert "transactional=321" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("realtime"))
    assert line.split()[1] == "100" and "µs" in line
    assert "process    cpu" in out


def test_top_shows_where_the_time_goes_per_stage(capsys):
    m = Metrics()
    for k, stage in enumerate(("queued", "stored", "acked")):
        m.observe_stage(stage, np.full(10 * (k + 1), 1_000 * 10 ** k, dtype=np.int64))
    m.processed("realtime", latencies_ns=np.full(5, 20_000))  # handled: also a stage
    with MetricsServer(m.registry, port=0) as server:
        assert main(["top", "--once", "--url", server.url]) == 0
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, x in enumerate(out) if x.startswith("decoded ->"))
    rows = [x.split() for x in out[at + 1:at + 5]]
    assert [r[0] for r in rows] == ["queued", "handled", "stored", "acked"]
    assert [r[1] for r in rows] == ["10", "5", "20", "30"]


def test_top_shows_subscribers_group_lag_and_udp_of_a_real_service(tmp_path, capsys):
    from eventstream.client import TcpClient, subscribe
    from eventstream.config import load_config
    from eventstream.service import Service

    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
        "storage.data_dir": str(tmp_path / "data")})
    with Service(cfg) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30) as c:
            for i in range(10):
                c.send("t", b"x", 2, i + 1)
            assert c.wait_acked(30)
        with subscribe("127.0.0.1", svc.subscribe.address[1], "t", group="g", credit=4) as s:
            for _ in range(4):
                assert s.poll(20) is not None
            assert s.commit() == 4
        assert main(["top", "--once", "--url", svc.exporter.url]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("subscribers"))
    assert "groups 1" in line and "lag 6 events" in line
    assert "udp        datagrams 0  bad 0" in out


def test_top_unreachable_and_bad_args(capsys):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert main(["top", "--once", "--url", f"http://127.0.0.1:{port}/metrics"]) == 1
    assert "cannot read metrics from" in capsys.readouterr().err
    assert main(["top", "--once", "--url", "ftp://x"]) == 2
    assert main(["top", "--once", "--interval", "0"]) == 2


def test_bucket_quantile_interpolates():
    b = [(10.0, 50.0), (20.0, 100.0), (float("inf"), 100.0)]
    assert bucket_quantile(b, 0.5) == 10.0
    assert bucket_quantile(b, 0.75) == 15.0
    assert bucket_quantile([], 0.5) is None
