"""Security fixtures: a self-signed certificate made by `openssl` for the session, and services with
TLS and tokens on every TCP port (ingest, subscribe, metrics), on ephemeral ports."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ingest"))  # serve_process, ingest_helpers

TOKEN = "team-a-s3cret"


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a self-signed certificate for the TLS tests")
    d = tmp_path_factory.mktemp("sec-tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "2",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


def client_context(cert) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert[0])


@pytest.fixture
def secure_service(tmp_path, cert):
    """A Service with server.tls and one token on every port (and whatever overrides the test adds)."""
    from eventstream.config import load_config
    from eventstream.service import Service

    made = []

    def make(**extra):
        over = {"server.tcp.port": 0, "server.udp.enabled": False, "metrics.port": 0, "server.subscribe.port": 0,
                "storage.data_dir": str(tmp_path / f"data{len(made)}"), "records.payload_bytes": 64,
                "server.tls.cert_file": cert[0], "server.tls.key_file": cert[1], "server.auth.tokens": [TOKEN]}
        over.update(extra)
        svc = Service(load_config(environ={}, overrides=over)).start()
        made.append(svc)
        return svc

    yield make
    for s in made:
        s.stop(drain=False, timeout=10)
