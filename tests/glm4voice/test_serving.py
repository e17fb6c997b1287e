"""glm4voice.serving: header-read timeout, connection cap and open-file limit, on real loopback servers
(a small ASGI app served by :func:`build_server` in a thread, driven with raw sockets)."""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

import model_server
import web_demo
from glm4voice import defaults
from glm4voice.serving import MIN_CONNECTIONS, ConnectionLimits, Server, build_server

import hostile_clients
from support import ROOT, free_port

WAIT_S = 60.0
"""Generous deadline for conditions that must become true (never a speed assertion)."""
TICK = b"tick\n"


LOOP_BLOCKED = threading.Event()


async def app(scope, receive, send) -> None:
    """``/stream``: a line every 50 ms until the client leaves; ``/block``: holds the event loop
    (as a busy or starved process does) for 2 s; anything else: ``ok``."""
    if scope["type"] != "http":
        return
    await receive()
    if scope["path"] == "/block":
        LOOP_BLOCKED.set()
        time.sleep(2.0)  # noqa: ASYNC251 - the stall being simulated, on purpose on the event loop
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] != "/stream":
        await send({"type": "http.response.body", "body": b"ok"})
        return
    while True:
        await send({"type": "http.response.body", "body": TICK, "more_body": True})
        try:
            if (await asyncio.wait_for(receive(), 0.05))["type"] == "http.disconnect":
                return
        except TimeoutError:
            pass


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request) -> str:
    """Both event loops uvicorn may pick: asyncio's (a plain install) and uvloop (when installed)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return request.param


@contextmanager
def serving(limits: ConnectionLimits, loop: str) -> Iterator[tuple[Server, int]]:
    port = free_port()
    server = build_server(app, "127.0.0.1", port, limits, lifespan="off", log_level="warning",
                          timeout_graceful_shutdown=5, loop=loop)  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield server, port
    finally:
        server.request_exit()
        thread.join(WAIT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails after WAIT_S)."""
    sock.settimeout(WAIT_S)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def open_stream(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    return sock


def test_partial_headers_get_408_and_a_silent_connection_is_closed(loop):
    with serving(ConnectionLimits(header_timeout_s=1.0), loop) as (server, port):
        with (
            socket.create_connection(("127.0.0.1", port)) as partial,
            socket.create_connection(("127.0.0.1", port)) as silent,
        ):
            partial.sendall(b"GET / HTTP/1.1\r\nHost: local")
            answer = read_until_closed(partial)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"did not arrive in time" in answer
            assert read_until_closed(silent) == b""
        assert server.guard.counts["timed_out"] == 2
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "ok"


def test_a_kept_alive_connection_gets_the_timeout_again_for_its_next_request(loop):
    with (
        serving(ConnectionLimits(header_timeout_s=1.0), loop) as (server, port),
        socket.create_connection(("127.0.0.1", port)) as sock,
    ):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = b""
        while not first.endswith(b"0\r\n\r\n"):  # the whole first answer (chunked)
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET / HTTP/1.1\r\nHo")  # the next request, never finished
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_request_that_arrived_while_the_loop_was_busy_is_served_not_timed_out(loop):
    """Headers that reached the socket in time are not refused because the event loop was busy past
    the deadline (a loaded machine): the loop reads the sockets before it runs the due timers."""
    LOOP_BLOCKED.clear()
    with serving(ConnectionLimits(header_timeout_s=1.0), loop) as (server, port):
        with (
            socket.create_connection(("127.0.0.1", port)) as late,
            socket.create_connection(("127.0.0.1", port)) as blocker,
        ):
            deadline = time.monotonic() + WAIT_S
            while server.guard.counts["timed_out"] == 0 and len(server.server_state.connections) < 2:
                assert time.monotonic() < deadline, "the server did not accept the connections"
                time.sleep(0.01)
            blocker.sendall(b"GET /block HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert LOOP_BLOCKED.wait(WAIT_S)
            late.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")  # in time
            assert read_until_closed(late).startswith(b"HTTP/1.1 200 ")
        assert server.guard.counts["timed_out"] == 0


def test_headers_that_complete_in_time_are_served_and_a_stream_outlives_the_timeout(loop):
    with serving(ConnectionLimits(header_timeout_s=1.0), loop) as (server, port):
        with open_stream(port) as stream:
            stream.settimeout(WAIT_S)
            received, started = b"", time.monotonic()
            while time.monotonic() - started < 3 * server.guard.limits.header_timeout_s:  # well past the timeout
                chunk = stream.recv(4096)
                assert chunk, "the server closed a stream that was answering"
                received += chunk
            assert received.count(TICK) > 3
        assert server.guard.counts["timed_out"] == 0


def test_at_the_cap_the_longest_idle_connection_makes_room_and_streams_are_never_closed(loop):
    hostile_clients.raise_own_open_file_limit(512)
    with serving(ConnectionLimits(header_timeout_s=600, max_connections=MIN_CONNECTIONS), loop) as (server, port):
        with open_stream(port) as stream, hostile_clients.idle_connections(port, 3 * MIN_CONNECTIONS) as idle:
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=WAIT_S).text == "ok"
            deadline = time.monotonic() + WAIT_S
            while hostile_clients.closed_by_server(idle[:MIN_CONNECTIONS]) < MIN_CONNECTIONS:
                assert time.monotonic() < deadline, "the oldest idle connections were not closed"
                time.sleep(0.05)
            assert hostile_clients.closed_by_server(idle[-MIN_CONNECTIONS // 2 :]) == 0  # the newest stay
            stream.settimeout(WAIT_S)
            assert TICK in stream.recv(4096) + stream.recv(4096)  # still streaming
        assert server.guard.counts["evicted"] >= 2 * MIN_CONNECTIONS and server.guard.counts["refused"] == 0


def test_when_every_connection_is_busy_a_new_one_gets_503(loop):
    hostile_clients.raise_own_open_file_limit(512)
    with serving(ConnectionLimits(header_timeout_s=600, max_connections=MIN_CONNECTIONS), loop) as (server, port):
        streams = [open_stream(port) for _ in range(MIN_CONNECTIONS)]
        try:
            with socket.create_connection(("127.0.0.1", port)) as extra:
                answer = read_until_closed(extra)
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"retry later" in answer
            assert server.guard.counts["refused"] == 1
        finally:
            for sock in streams:
                sock.close()
        deadline = time.monotonic() + WAIT_S
        while True:  # once the streams have gone, connections are served again
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=WAIT_S).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_request_headers_beyond_the_limit_are_refused(loop):
    """A request head still incomplete after ``max_header_bytes`` is refused (memory stays bounded)."""
    with serving(ConnectionLimits(max_header_bytes=4096), loop) as (server, port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 8192)  # no end in sight
            assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
        assert httpx.get(f"http://127.0.0.1:{port}/", headers={"X-Small": "a" * 1024}).text == "ok"


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard open-file limit above 256 (this machine: {hard})")
    code = ("import resource, sys; from glm4voice.serving import raise_open_file_limit; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
            "sys.exit(raise_open_file_limit() != resource.getrlimit(resource.RLIMIT_NOFILE)[1])")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_limits_are_validated_and_both_command_lines_have_the_flags():
    for bad in ({"header_timeout_s": 0}, {"header_timeout_s": float("nan")}, {"max_connections": 1},
                {"max_header_bytes": 10}):  # fmt: skip
        with pytest.raises(ValueError):
            ConnectionLimits(**bad)
    for parser in (model_server.build_parser(), web_demo.build_parser()):
        args = parser.parse_args([])
        assert args.header_timeout == defaults.HEADER_TIMEOUT_S and args.max_connections == defaults.MAX_CONNECTIONS
        assert args.allowed_hosts == ""
        args = parser.parse_args(["--allowed-hosts", "a.example, b.example", "--header-timeout", "3"])
        assert args.allowed_hosts == "a.example, b.example" and args.header_timeout == 3.0
    bad = subprocess.run([sys.executable, str(ROOT / "model_server.py"), "--allowed-hosts", "a b/c"],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and "not a host name" in bad.stderr
