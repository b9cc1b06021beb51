"""HTTP for operators: /metrics (Prometheus text), /healthz and /readyz (Kubernetes).

A small threaded http.server beside the listener loop: a scrape or a probe never waits
for a batch, and a stuck loop shows up as a failing /healthz instead of a hung probe.
The loop never waits for the server either: nothing it does takes a lock a request holds.

Hardened for a port that anyone on its network may reach: it listens on the address
given (loopback by default, see settings.py), handles at most `max_connections`
connections at once (the next ones wait in the kernel's listen backlog, costing no
thread), and drops a connection that has not sent its request within `timeout_s` of
connecting, or has not taken the answer within `timeout_s`.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cdc_invalidator.metrics import Metrics
from cdc_invalidator.runner import Health

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = structlog.get_logger("cdc_invalidator.probes")

# Connections handled at once: Prometheus, a kubelet's two probes, a person with curl.
MAX_CONNECTIONS = 8
# From connecting to the end of the request's headers, and again for taking the answer.
REQUEST_TIMEOUT_S = 5.0
# Connections the kernel queues while every handler is busy.
LISTEN_BACKLOG = 32
# How long the accepting thread waits for a free handler before looking again whether
# it is being shut down.
SLOT_WAIT_S = 0.5


class ProbeServer:
    def __init__(  # noqa: PLR0913 - the options past the first few are keyword-only
        self,
        address: str,
        port: int,
        metrics: Metrics,
        health: Callable[[], Health],
        *,
        timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        handler = _handler(metrics, health, timeout_s)
        self._server = _BoundedServer((address, port), handler, max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cdc-invalidator-probes", daemon=True
        )

    @property
    def address(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def handling(self) -> int:
        """Connections being handled now (never more than max_connections)."""
        return self._server.handling

    def start(self) -> ProbeServer:
        self._thread.start()
        log.info(
            "probes_listening",
            address=self.address,
            port=self.port,
            paths=["/metrics", "/healthz", "/readyz"],
        )
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them at a time."""

    daemon_threads = True  # a request in hand never holds up the process's exit
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        server_address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
    ) -> None:
        if ":" in server_address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(max_connections)
        self._count_lock = threading.Lock()
        self.handling = 0
        super().__init__(server_address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        # Accept only with a handler free: beyond the bound, connections stay in the
        # listen backlog. serve_forever() takes an OSError here as "nothing to accept",
        # looks whether it is being shut down, and comes back: the wait stays short.
        if not self._slots.acquire(timeout=SLOT_WAIT_S):
            raise OSError("every probe handler is busy")
        try:
            request = super().get_request()
        except BaseException:
            self._slots.release()
            raise
        with self._count_lock:
            self.handling += 1
        return request

    def shutdown_request(self, request: Any) -> None:
        # Called exactly once for every connection get_request() returned, whatever
        # happened to it.
        try:
            super().shutdown_request(request)
        finally:
            with self._count_lock:
                self.handling -= 1
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone in the middle of its answer: a debug line, not a traceback on
        # stderr.
        exc = sys.exc_info()[1]
        log.debug("probe_request_failed", client=str(client_address), error=repr(exc))


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes, until a deadline for all of them rather than one per read: a
    client that sends a byte every few seconds is dropped as surely as a silent one."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


def _handler(
    metrics: Metrics, health: Callable[[], Health], timeout_s: float
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0 (the default): one request per connection, closed after the answer.

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the buffered file setup() made, replaced by one with a deadline
            reader = _DeadlineReader(self.connection, time.monotonic() + timeout_s)
            self.rfile = io.BufferedReader(reader)
            # BaseHTTPRequestHandler answers a TimeoutError by closing the connection.

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
            # The answer is written with sendall(), whose timeout bounds the whole of it:
            # a client that does not read is dropped after timeout_s.
            self.connection.settimeout(timeout_s)
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Probes come every few seconds: not worth a log line each."""

    return Handler
