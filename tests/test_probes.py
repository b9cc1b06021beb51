"""The probe server against clients that misbehave, and scrapes that come together.

Where the address is the point, a real listener process; otherwise the real ProbeServer in
this process, with short timeouts and small bounds injected.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdc_invalidator.metrics import BacklogCollector, Metrics
from cdc_invalidator.modes import trigger as trigger_mode
from cdc_invalidator.modes.trigger import TriggerMode
from cdc_invalidator.probes import ProbeServer
from cdc_invalidator.runner import Health
from cdc_invalidator.settings import load_settings
from cdc_invalidator.status import Status, read_status
from tests.support.env import Env
from tests.support.evidence import unavailable
from tests.support.faults import setup_users
from tests.support.listener import Spawn, stop_listener
from tests.support.servers import free_port
from tests.support.waits import wait_until

# Long enough for any test here to finish its part of a conversation; short enough that a
# server that never drops anyone fails the test rather than hanging it.
PATIENCE_S = 20.0


def healthy() -> Health:
    return Health(alive=True, ready=True, detail={"role": "active"})


@pytest.fixture
def serve() -> Iterator[Callable[..., ProbeServer]]:
    """A started ProbeServer on a free loopback port; closed after the test."""
    with ExitStack() as stack:

        def start(
            metrics: Metrics | None = None, health: Callable[[], Health] = healthy, **kw: Any
        ) -> ProbeServer:
            server = ProbeServer("127.0.0.1", 0, metrics or Metrics(), health, **kw).start()
            stack.callback(server.close)
            return server

        yield start


def connect(server: ProbeServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE_S)


def closed_by_server(sock: socket.socket) -> bool:
    """Blocks until the server closes the connection (True), or PATIENCE_S passes."""
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def get(host: str, port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=PATIENCE_S) as response:
        return response.status, response.read().decode()


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=PATIENCE_S).close()
    except ConnectionRefusedError:
        return True
    return False


# --- where it listens --------------------------------------------------------------------


@pytest.mark.servers
def test_by_default_it_listens_on_loopback_only(env: Env, spawn: Spawn) -> None:
    port = free_port()
    config = setup_users(env, metrics_port=port)
    assert load_settings(config).metrics_address == "127.0.0.1"
    listener = spawn(config)
    assert listener.logged("probes_listening")[0]["address"] == "127.0.0.1"
    assert get("127.0.0.1", port, "/healthz")[0] == 200
    # Every interface would answer on any loopback address; 127.0.0.1 alone does not.
    assert refused("127.0.0.2", port)
    stop_listener(listener)


@pytest.mark.servers
def test_the_address_setting_is_honoured(env: Env, spawn: Spawn) -> None:
    port = free_port()
    config = setup_users(env, metrics_port=port)
    listener = spawn(config, {"CDC_INVALIDATOR_METRICS_ADDRESS": "127.0.0.2"})
    assert listener.logged("probes_listening")[0]["address"] == "127.0.0.2"
    assert get("127.0.0.2", port, "/healthz")[0] == 200
    assert refused("127.0.0.1", port)
    stop_listener(listener)


def test_an_ipv6_address_is_listened_on() -> None:
    try:
        server = ProbeServer("::1", 0, Metrics(), healthy).start()
    except OSError as exc:  # pragma: no cover - a host without IPv6
        unavailable(f"no IPv6 loopback here: {exc}")
    try:
        assert get("[::1]", server.port, "/healthz")[0] == 200
    finally:
        server.close()


# --- clients that do not play along --------------------------------------------------------


def test_a_silent_client_is_dropped_after_the_timeout(
    serve: Callable[..., ProbeServer],
) -> None:
    server = serve(timeout_s=0.3)
    with connect(server) as sock:
        assert closed_by_server(sock), "a client that sends nothing is still connected"
    wait_until(lambda: server.handling == 0, what="its handler gone")
    assert get("127.0.0.1", server.port, "/healthz")[0] == 200


def test_a_client_trickling_its_headers_is_dropped_at_the_deadline(
    serve: Callable[..., ProbeServer],
) -> None:
    timeout_s = 0.5
    server = serve(timeout_s=timeout_s)
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nX-Slow: ")
        # A byte every tenth of the timeout: each read is quick, the whole request is not.
        # The pace is a wait for the server closing the connection, which is the event.
        for _ in range(400):  # 40 timeouts' worth: a server that waits per read never closes
            readable, _, _ = select.select([sock], [], [], timeout_s / 10)
            if readable:
                break
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("a client sending a byte at a time is still connected")
        assert closed_by_server(sock)
    wait_until(lambda: server.handling == 0, what="its handler gone")


def test_a_client_that_does_not_read_the_answer_is_dropped(
    serve: Callable[..., ProbeServer],
) -> None:
    # An answer far larger than both sockets' buffers: writing it waits for the client.
    big = "x" * (16 << 20)
    server = serve(
        health=lambda: Health(alive=True, ready=True, detail={"padding": big}), timeout_s=0.5
    )
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(PATIENCE_S)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        wait_until(lambda: server.handling == 1, what="the request being answered")
        # Not reading: the server's write must give up rather than hold a handler forever.
        wait_until(lambda: server.handling == 0, what="the handler giving up on the client")


def test_a_client_gone_mid_answer_leaves_no_traceback(
    serve: Callable[..., ProbeServer], capfd: pytest.CaptureFixture[str]
) -> None:
    big = "x" * (16 << 20)
    server = serve(health=lambda: Health(alive=True, ready=True, detail={"padding": big}))
    with socket.socket() as sock:
        sock.settimeout(PATIENCE_S)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert sock.recv(1)  # the answer has begun
        # Closed with a reset, the rest unread: the server's next write fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: server.handling == 0, what="the handler gone")
    assert "Traceback" not in capfd.readouterr().err


def handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_connections_beyond_the_bound_wait_without_a_thread(
    serve: Callable[..., ProbeServer],
) -> None:
    bound = 3
    before = handler_threads()
    server = serve(timeout_s=PATIENCE_S, max_connections=bound)
    answer: list[int] = []
    getter = threading.Thread(
        target=lambda: answer.append(get("127.0.0.1", server.port, "/healthz")[0])
    )
    with ExitStack() as idle:
        for _ in range(bound + 4):
            idle.enter_context(connect(server))
        wait_until(lambda: server.handling == bound, what="the bound reached")
        assert handler_threads() - before <= bound
        # A real request now waits behind them in the listen backlog, and is answered
        # once they are gone: waiting, not refused.
        getter.start()
        assert server.handling == bound
        assert handler_threads() - before <= bound
    getter.join(PATIENCE_S)
    assert answer == [200]
    wait_until(lambda: server.handling == 0, what="every handler gone")


# --- scrapes that come together -------------------------------------------------------------


class Arrivals:
    """A collector registered before the database one: counts the scrapes about to read
    the database figures (the registry calls its collectors in order)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        with self._lock:
            self.count += 1
        yield from ()


class CountedReads:
    """read_status, counted; the first call held until `release` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._real = read_status

    def __call__(self, conn: psycopg.Connection[Any]) -> Status:
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.entered.set()
            assert self.release.wait(PATIENCE_S)
            return self._real(conn)
        finally:
            with self._lock:
                self.in_flight -= 1


def trigger(env: Env) -> TriggerMode:
    """Trigger mode's figures (backlog, dead letters), whatever mode the run tests."""
    return TriggerMode(load_settings(env.config({"public.users": ["user:{id}"]})))


def figures(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text; raises if the text is not valid."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def scrape(server: ProbeServer) -> dict[str, float]:
    code, text = get("127.0.0.1", server.port, "/metrics")
    assert code == 200
    return figures(text)


@pytest.mark.servers
def test_scrapes_together_share_one_reading_per_interval(
    env: Env, serve: Callable[..., ProbeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_users(env)
    env.sql("INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x'), (3, 'c@x')")  # no listener
    reads = CountedReads()
    monkeypatch.setattr(trigger_mode, "read_status", reads)
    now = [0.0]
    metrics, arrivals = Metrics(), Arrivals()
    metrics.watch_database(arrivals)
    backlog = BacklogCollector(env.connect, trigger(env), max_age_s=1.0, clock=lambda: now[0])
    metrics.watch_database(backlog)
    server = serve(metrics, max_connections=8)

    scrapers = 12
    answers: list[tuple[int, str]] = []
    threads = [
        threading.Thread(target=lambda: answers.append(get("127.0.0.1", server.port, "/metrics")))
        for _ in range(scrapers)
    ]
    for t in threads:
        t.start()
    # Held in the first reading: every handler is in a scrape, about to read the figures.
    assert reads.entered.wait(PATIENCE_S)
    wait_until(lambda: arrivals.count == 8, what="eight scrapes at the database figures")
    assert server.handling == 8
    reads.release.set()
    for t in threads:
        t.join(PATIENCE_S)

    assert len(answers) == scrapers
    for code, text in answers:
        assert code == 200
        seen = figures(text)
        assert seen["cdc_invalidator_status_up"] == 1
        assert seen["cdc_invalidator_backlog_events"] == 3
    assert (reads.calls, reads.most_in_flight) == (1, 1)

    env.sql("INSERT INTO users VALUES (4, 'd@x')")
    now[0] = 0.9  # within the interval: the same figures
    assert scrape(server)["cdc_invalidator_backlog_events"] == 3
    now[0] = 1.0  # the interval over: read again
    assert scrape(server)["cdc_invalidator_backlog_events"] == 4
    assert reads.calls == 2
    backlog.close()


@pytest.mark.servers
def test_figures_that_cannot_be_read_fail_no_scrape(
    env: Env, serve: Callable[..., ProbeServer]
) -> None:
    now = [0.0]
    metrics = Metrics()
    metrics.events.inc(5)
    backlog = BacklogCollector(env.connect, trigger(env), clock=lambda: now[0])
    metrics.watch_database(backlog)
    server = serve(metrics)
    # Nothing installed yet: the status query fails in the database.
    seen = scrape(server)
    assert seen["cdc_invalidator_status_up"] == 0
    assert "cdc_invalidator_backlog_events" not in seen
    assert seen["cdc_invalidator_events_total"] == 5  # what is known still is

    setup_users(env)
    now[0] += 60
    seen = scrape(server)
    assert (seen["cdc_invalidator_status_up"], seen["cdc_invalidator_backlog_events"]) == (1, 0)
    backlog.close()


def test_readyz_answers_the_health_as_json(serve: Callable[..., ProbeServer]) -> None:
    server = serve()
    code, body = get("127.0.0.1", server.port, "/readyz")
    assert (code, json.loads(body)) == (200, {"status": "ok", "role": "active"})
