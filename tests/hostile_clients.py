"""Hostile clients for system tests of both servers: connections that never send a byte, and
slowloris connections that send their headers one byte at a time."""

from __future__ import annotations

import asyncio
import resource
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

SLOW_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\nX-Padding: "
"""Headers that never end: after this prefix the client sends one more padding byte at a time."""


def raise_own_open_file_limit(needed: int) -> None:
    """Let this test process open ``needed`` sockets (skip the test where the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the test needs {needed} open files; this machine's hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to 127.0.0.1:``port`` that never send a byte (closed on exit)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=60))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_server(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server has closed (or answered): readable without blocking."""
    poller = select.poll()
    for sock in sockets:
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return len(poller.poll(0))


async def slowloris(port: int, count: int, pause_s: float, give_up_s: float) -> list[bytes | None]:
    """``count`` connections sending endless headers one byte per ``pause_s``. Each result is what the
    server sent before closing the connection (``b""``: closed without an answer), or None if it was
    still open after ``give_up_s`` seconds."""
    loop = asyncio.get_running_loop()

    async def one() -> bytes | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        deadline = loop.time() + give_up_s
        sent = 0
        try:
            while loop.time() < deadline:
                try:
                    writer.write(SLOW_REQUEST[sent : sent + 1] or b"a")
                    await writer.drain()
                except ConnectionError:
                    return b""
                sent += 1
                try:
                    return await asyncio.wait_for(reader.read(4096), pause_s)
                except TimeoutError:
                    continue
                except ConnectionError:
                    return b""
            return None
        finally:
            writer.close()

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def slowloris_while_probing(
    port: int, probe_url: str, count: int, give_up_s: float, pause_s: float = 0.5
) -> tuple[list[bytes | None], list[int | str]]:
    """:func:`slowloris` while ``probe_url`` is fetched (a new connection each time) every ``pause_s``
    until the slow connections end; their results and the probes' statuses (or errors)."""
    attack = asyncio.ensure_future(slowloris(port, count, pause_s, give_up_s))
    statuses: list[int | str] = []
    while not attack.done():
        async with httpx.AsyncClient(timeout=60) as http:
            try:
                statuses.append((await http.get(probe_url)).status_code)
            except httpx.HTTPError as error:
                statuses.append(repr(error))
        await asyncio.wait([attack], timeout=pause_s)
    return attack.result(), statuses
