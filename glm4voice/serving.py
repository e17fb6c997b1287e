"""HTTP serving for both processes (token server and web demo): uvicorn with limits that keep a server answering.

uvicorn alone keeps a connection that never completes its request open for ever (it has no header-read
timeout), so idle or slowloris clients can hold every file descriptor of the process and ``/health`` stops
answering; its ``limit_concurrency`` counts such idle connections too and then answers 503 to everybody.
Served through here, a server has:

- a header-read timeout: a connection must send a complete request line and headers within
  ``header_timeout_s`` of connecting (or of its previous answer, on a kept-alive connection), or it is
  closed (answered 408 if it had started a request);
- a connection cap: the open-file limit is raised to its hard limit at start, and at ``max_connections``
  open connections (lowered to fit that limit) a new connection replaces the connection that has waited
  longest without sending a request; when every connection is busy with a request, the new one is
  answered 503. Streams in progress are never closed to make room;
- a bound on buffered request heads: a request line plus headers still incomplete after
  ``max_header_bytes`` is answered 400 (h11's limit).

    limits = ConnectionLimits(header_timeout_s=10.0, max_connections=1000)
    server = build_server(app, "localhost", 10000, limits, log_level="info")
    server.run()

The settings are documented (flags and defaults) in docs/API.md, "Limits".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http
import logging
import math
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from glm4voice.defaults import HEADER_TIMEOUT_S, KEEP_ALIVE_S, MAX_CONNECTIONS, MAX_HEADER_BYTES

logger = logging.getLogger("glm4voice.serving")

FD_RESERVE = 256
"""File descriptors kept free of connections: for the files, pipes and devices the process itself opens
while serving, and for connections accepted in one burst before the cap closes others."""
MIN_CONNECTIONS = 16
CAP_WARNING_INTERVAL_S = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = HEADER_TIMEOUT_S
    """Seconds a connection may take to send a complete request line and headers."""
    max_connections: int = MAX_CONNECTIONS
    """Open connections (HTTP and WebSocket); lowered at start to fit the open-file limit."""
    max_header_bytes: int = MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        if not (math.isfinite(self.header_timeout_s) and self.header_timeout_s > 0):
            raise ValueError(f"header_timeout_s must be a positive number of seconds, got {self.header_timeout_s}")
        if self.max_connections < MIN_CONNECTIONS:
            raise ValueError(f"max_connections must be at least {MIN_CONNECTIONS}, got {self.max_connections}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024, got {self.max_header_bytes}")


# --- command line (the same flags in model_server.py and web_demo.py) -------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--allowed-hosts``, ``--header-timeout`` and ``--max-connections``."""
    defaults = ConnectionLimits()
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated host names (or addresses) this server answers to besides localhost, 127.0.0.1, "
        "[::1] and the --host it listens on, e.g. the name a reverse proxy forwards; '*' allows any (unsafe: "
        "see docs/API.md, 'Exposing the servers')",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout_s,
        help="seconds a connection may take to send its request line and headers (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="open connections; at the cap a new one replaces the longest-idle one (default %(default)s, "
        "lowered to fit the open-file limit)",
    )


def allowed_hosts_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(part.strip() for part in args.allowed_hosts.split(",") if part.strip())


def limits_from_args(args: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(header_timeout_s=args.header_timeout, max_connections=args.max_connections)


# --- open files ---------------------------------------------------------------------------------------


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, error)
        return soft
    logger.info("open-file limit raised from %d to %d", soft, target)
    return target


def open_file_count() -> int:
    """File descriptors this process has open (0 where the system does not say)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def fit_connection_cap(requested: int) -> int:
    """``requested``, lowered so that connections leave :data:`FD_RESERVE` descriptors free."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    room = soft - open_file_count() - FD_RESERVE
    cap = max(MIN_CONNECTIONS, min(requested, room))
    if cap < requested:
        logger.warning(
            "at most %d connections (not %d): the open-file limit is %d; raise it (ulimit -n) to allow more",
            cap, requested, soft,
        )  # fmt: skip
    return cap


# --- the connection guard -------------------------------------------------------------------------


class ConnectionGuard:
    """Per-server state of the limits: the connections waiting for a request (oldest first) and their timers.

    Everything runs on the server's event loop (protocol callbacks), so no locks are needed.
    """

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self._cap: int | None = None
        self._waiting: dict[GuardedH11Protocol, asyncio.TimerHandle] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        """``timed_out``, ``evicted`` (closed to make room), ``refused`` (503: every connection was busy)."""
        self._warned_at = -math.inf

    @property
    def cap(self) -> int:
        """Fitted to the open-file limit at the first connection (after the app has loaded what it needs)."""
        if self._cap is None:
            self._cap = fit_connection_cap(self.limits.max_connections)
        return self._cap

    def opened(self, connection: GuardedH11Protocol, open_connections: int) -> bool:
        """A new connection (counted in ``open_connections``); False: refuse it, all others are busy."""
        if open_connections > self.cap:
            victim = next(iter(self._waiting), None)
            if victim is None:
                self._note("refused")
                return False
            self._note("evicted")
            self.forget(victim)
            victim.transport.close()
        self.wait(connection)
        return True

    def wait(self, connection: GuardedH11Protocol) -> None:
        """``connection`` now waits for a request: (re)start its header timer, as the newest waiting."""
        self.forget(connection)
        timer = connection.loop.call_later(self.limits.header_timeout_s, self._expired, connection)
        self._waiting[connection] = timer

    def waiting(self, connection: GuardedH11Protocol) -> bool:
        return connection in self._waiting

    def forget(self, connection: GuardedH11Protocol) -> None:
        timer = self._waiting.pop(connection, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, connection: GuardedH11Protocol) -> None:
        if self._waiting.pop(connection, None) is None:
            return
        self.counts["timed_out"] += 1
        logger.debug(
            "closing %s: no complete request headers within %g s", connection.client, self.limits.header_timeout_s
        )
        connection.header_timeout()

    def _note(self, what: str) -> None:
        self.counts[what] += 1
        now = time.monotonic()
        if now - self._warned_at >= CAP_WARNING_INTERVAL_S:
            self._warned_at = now
            logger.warning(
                "connection cap of %d reached: closing connections that wait without a request "
                "(so far: %d closed to make room, %d refused with 503, %d header timeouts)",
                self.cap, self.counts["evicted"], self.counts["refused"], self.counts["timed_out"],
            )  # fmt: skip


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a :class:`ConnectionGuard` (one subclass per server: :func:`build_server`).

    A connection "waits" from when it is made, and again from the end of each answer, until a request's
    headers are complete (uvicorn then has a request/response cycle in progress).
    """

    guard: ClassVar[ConnectionGuard]
    _upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.opened(self, len(self.connections)):
            self._answer_and_close(503, "too many connections are busy; retry later")

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._upgraded = True
        self.guard.forget(self)
        super().handle_websocket_upgrade(event)

    def header_timeout(self) -> None:
        """The guard's timer fired: 408 if a request was begun, else just close."""
        started, _ = self.conn.trailing_data
        if started:
            self._answer_and_close(408, "the request headers did not arrive in time")
        elif not self.transport.is_closing():
            self.transport.close()

    def _track(self) -> None:
        if self._upgraded or self.transport.is_closing():
            self.guard.forget(self)
        elif self.cycle is None or self.cycle.response_complete:
            if not self.guard.waiting(self):
                self.guard.wait(self)
        else:
            self.guard.forget(self)

    def _answer_and_close(self, status: int, text: str) -> None:
        if self.transport.is_closing():
            return
        body = (text + "\n").encode()
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


# --- the server -----------------------------------------------------------------------------------


class Server(uvicorn.Server):
    """uvicorn's server under a :class:`ConnectionGuard`. ``before_shutdown`` runs first when it stops
    (on SIGINT/SIGTERM or :meth:`request_exit`), before uvicorn waits for open connections."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard, before_shutdown: Callable[[], None] | None):
        super().__init__(config)
        self.guard = guard
        self.before_shutdown = before_shutdown

    def request_exit(self) -> None:
        """Stop serving (from the event loop), as SIGTERM would."""
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.before_shutdown is not None:
            self.before_shutdown()
        await super().shutdown(sockets=sockets)


def build_server(
    app: Any,
    host: str,
    port: int,
    limits: ConnectionLimits,
    *,
    before_shutdown: Callable[[], None] | None = None,
    **options: Any,
) -> Server:
    """A uvicorn server for ``app`` under ``limits`` (``options``: more ``uvicorn.Config`` arguments).
    Raises the process's open-file limit."""
    raise_open_file_limit()
    guard = ConnectionGuard(limits)
    options.setdefault("log_config", None)
    config = uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(guard), timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=limits.max_header_bytes, **options,
    )  # fmt: skip
    return Server(config, guard, before_shutdown)
