"""Metrics HTTP endpoint: a small ThreadingHTTPServer we own, so it can be stopped (tests, shutdown).

prometheus_client.start_http_server cannot be shut down; this server serves `path` (default /metrics)
with the registry's text exposition, 404 elsewhere, from a named daemon thread.
"""

from __future__ import annotations

import errno
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = structlog.get_logger("eventstream.metrics")


class MetricsServerError(OSError):
    """The endpoint could not start (port in use, bad address): the message says which and what to do."""


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9100,
                 path: str = "/metrics"):
        if not path.startswith("/"):
            raise ValueError(f"metrics.path {path!r} is not allowed; allowed: a path starting with '/'")
        self.registry, self.host, self.requested_port, self.path = registry, host, port, path
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.scrapes = 0

    def start(self) -> MetricsServer:
        registry, path, owner = self.registry, self.path, self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server naming
                if self.path.split("?", 1)[0] != path:
                    body = f"not found; metrics are at {path}\n".encode()
                    self.send_response(404)
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                else:
                    body = generate_latest(registry)
                    owner.scrapes += 1
                    self.send_response(200)
                    self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 - quiet: scrapes are not events
                pass

        try:
            self._server = ThreadingHTTPServer((self.host, self.requested_port), Handler)
        except OSError as exc:
            what = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise MetricsServerError(exc.errno, f"metrics endpoint {self.host}:{self.requested_port} {what}; "
                                     "allowed: a free port (metrics.port), 0 for any, or metrics.enabled: false") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="es-metrics", daemon=True)
        self._thread.start()
        log.info("metrics_listening", url=self.url)
        return self

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.requested_port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (the real port when 0 was asked)."""
        return (self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None

    def __enter__(self) -> MetricsServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
