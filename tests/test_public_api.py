"""`import eventstream` names the public API (`__all__`); a handler written against it runs in a Service."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import eventstream

PUBLIC = {"Service", "StartupError", "Config", "ConfigError", "load_config", "Handler", "Batch", "Event",
          "HandlerError", "TcpClient", "UdpSender", "AsyncSender", "subscribe", "aio_subscribe", "Subscription",
          "ClientError", "AuthError", "SubscribeError", "__version__"}


def test_all_names_the_public_api_and_every_name_resolves():
    assert set(eventstream.__all__) == PUBLIC
    for name in eventstream.__all__:
        assert getattr(eventstream, name) is not None
    assert set(eventstream.__all__) <= set(dir(eventstream))


def test_an_internal_name_is_refused_with_the_list_of_public_ones():
    try:
        eventstream.EventBusMulti  # noqa: B018
    except AttributeError as exc:
        assert "eventstream.__all__" in str(exc) and "Service" in str(exc)
    else:
        raise AssertionError("an internal name was reachable from the package")


def test_import_eventstream_imports_no_engine_module():
    code = ("import sys, eventstream; "
            "print(sorted(m for m in sys.modules if m.startswith('eventstream.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHON_GIL="0"), check=True).stdout
    assert out.strip() == "[]"


def test_a_handler_written_against_the_public_api_gets_batches_of_events(tmp_path):
    seen: list[tuple[str, bytes]] = []
    got = threading.Event()

    def handler(batch: eventstream.Batch) -> None:
        assert isinstance(batch, eventstream.Batch)
        for ev in batch.events():
            assert isinstance(ev, eventstream.Event)
            seen.append((ev.topic, bytes(ev.payload)))
        if len(seen) >= 3:
            got.set()

    h: eventstream.Handler = handler
    cfg = eventstream.load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.enabled": False, "server.subscribe.port": 0,
        "storage.data_dir": str(tmp_path / "d"), "records.payload_bytes": 64})
    with eventstream.Service(cfg, handlers={"realtime": h}) as svc:
        with eventstream.TcpClient(*svc.tcp.address) as client:
            for i in range(3):
                client.send("api.orders", b"p%d" % i, priority=4, event_id=i + 1)
            assert client.wait_acked(30)
        assert got.wait(30)
    assert seen == [("api.orders", b"p0"), ("api.orders", b"p1"), ("api.orders", b"p2")]
