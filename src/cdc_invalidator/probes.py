"""HTTP for operators: /metrics (Prometheus text), /healthz and /readyz (Kubernetes).

A small threaded http.server beside the listener loop: a scrape or a probe never waits
for a batch, and a stuck loop shows up as a failing /healthz instead of a hung probe.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cdc_invalidator.metrics import Metrics
from cdc_invalidator.runner import Health

log = structlog.get_logger("cdc_invalidator.probes")


class ProbeServer:
    def __init__(
        self, address: str, port: int, metrics: Metrics, health: Callable[[], Health]
    ) -> None:
        handler = _handler(metrics, health)
        self._server = ThreadingHTTPServer((address, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cdc-invalidator-probes", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> ProbeServer:
        self._thread.start()
        log.info("probes_listening", port=self.port, paths=["/metrics", "/healthz", "/readyz"])
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(metrics: Metrics, health: Callable[[], Health]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
            elif path in ("/healthz", "/readyz"):
                state = health()
                ok = state.alive if path == "/healthz" else state.ready
                body = {"status": "ok" if ok else "fail", **state.detail}
                self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
            else:
                self._send(404, "text/plain", b"not found: /metrics, /healthz, /readyz\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Probes come every few seconds: not worth a log line each."""

    return Handler
