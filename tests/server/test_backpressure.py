"""A token server client that stops reading: its stream is held in the engine (no decode steps) while the
others run, and goes on to its whole answer once the client reads again. Over HTTP: through ASGI with a
``send`` that blocks, as a server's ``send`` does once a slow client's buffers are full, and through the
real server on a loopback port with a client socket that stops reading; in process (the one-process
layout) the client simply stops iterating, as a paced voice turn's reader does."""

from __future__ import annotations

import asyncio
import json
import socket

from glm4voice.client import InProcessTokenClient
from glm4voice.llm.checkpoint import load_model
from glm4voice.llm.engine import Engine, EngineConfig
from glm4voice.server.app import create_app
from glm4voice.server.inprocess import InProcessTokenServer
from glm4voice.server.settings import ServerSettings
from glm4voice.serving import ConnectionLimits, build_server

from support import until

MAX_NEW_TOKENS = 200
UNREAD_LIMIT = 8


def request_scope() -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/generate_stream", "raw_path": b"/generate_stream", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1:10000"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 10000),
    }  # fmt: skip


class Client:
    """One request through the ASGI app; ``send`` blocks after the first token line until ``read_on``
    is set (a client whose connection stopped draining)."""

    def __init__(self, prompt_ids: list[int], *, stall: bool):
        body = {"prompt_token_ids": prompt_ids, "temperature": 0, "max_new_tokens": MAX_NEW_TOKENS}
        self.body = json.dumps(body).encode()
        self.stall = stall
        self.read_on = asyncio.Event()
        self.lines: list[dict] = []
        self.status: int | None = None
        self._asked = False

    async def receive(self) -> dict:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect
        raise AssertionError("unreachable")

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message.get("body"):
            self.lines += [json.loads(line) for line in message["body"].splitlines()]
            if self.stall and len(self.lines) == 1:
                await self.read_on.wait()


def engine_and_settings(folder, max_seq_len: int = 256) -> tuple[Engine, ServerSettings]:
    model = load_model(folder, device="cpu", dtype="float32")
    config = EngineConfig(
        device="cpu", dtype="float32", max_batch_size=4, max_seq_len=max_seq_len, max_unread_tokens=UNREAD_LIMIT
    )
    settings = ServerSettings(model_path=str(folder), device="cpu", dtype="float32", max_seq_len=max_seq_len)
    return Engine(model, config, stop_ids=()), settings


def test_a_client_that_stops_reading_is_held_and_then_served_whole(tiny_checkpoints, text_tokenizer):
    engine, settings = engine_and_settings(tiny_checkpoints.llm)
    app = create_app(engine, settings, text_tokenizer)

    async def main():
        async with app.router.lifespan_context(app):
            slow, quick = Client(list(range(100, 141)), stall=True), Client([5, 9, 13], stall=False)
            slow_call = asyncio.create_task(app(request_scope(), slow.receive, slow.send))
            await until(lambda: engine.stats().held_streams == 1, "the stalled client's stream was not held")
            await app(request_scope(), quick.receive, quick.send)  # another client is served meanwhile
            held = engine.stats()
            slow.read_on.set()
            await asyncio.wait_for(slow_call, 60)
            alone = Client(list(range(100, 141)), stall=False)
            await app(request_scope(), alone.receive, alone.send)
            return slow, quick, alone, held

    slow, quick, alone, held = asyncio.run(main())
    assert slow.status == quick.status == alone.status == 200
    assert len(quick.lines) == MAX_NEW_TOKENS and held.held_streams == 1 and held.holds >= 1
    assert [line["token_id"] for line in slow.lines] == [line["token_id"] for line in alone.lines]
    assert len(slow.lines) == MAX_NEW_TOKENS and all(line["error_code"] == 0 for line in slow.lines)


def test_an_in_process_reader_that_waits_holds_its_stream(tiny_checkpoints, text_tokenizer):
    engine, settings = engine_and_settings(tiny_checkpoints.llm)
    server = InProcessTokenServer(engine, settings, text_tokenizer)
    request = {"prompt_token_ids": list(range(100, 141)), "temperature": 0, "max_new_tokens": MAX_NEW_TOKENS}

    async def main():
        async with server.running():
            client = InProcessTokenClient(server)
            waiting = aiter(client.stream(**request))
            first = await anext(waiting)  # then the reader waits
            await until(lambda: engine.stats().held_streams == 1, "the waiting reader's stream was not held")
            rest = [token async for token in waiting]
            return [first, *rest], await client.generate(**request), engine.stats()

    paused, straight, stats = asyncio.run(main())
    assert paused == straight and len(paused) == MAX_NEW_TOKENS
    assert stats.holds >= 1 and stats.held_streams == 0


SOCKET_BUFFER = 4096
"""Bytes asked for each end's kernel buffer (the kernel's minimum is about this)."""
LONG_ANSWER = 3000
"""Tokens of ~35 bytes: about 100 kB of answer, more than the kernel buffers of both ends and the
server's 64 kB write buffer hold, so the server's writes stop while the client does not read."""


def http10_request(port: int, prompt_ids: list[int]) -> bytes:
    body = json.dumps({"prompt_token_ids": prompt_ids, "temperature": 0, "max_new_tokens": LONG_ANSWER}).encode()
    head = f"POST /generate_stream HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def receive(sock: socket.socket, until_bytes: bytes | None = None) -> bytes:
    """Blocking reads: up to the first ``until_bytes`` (then stop reading), or to the end of the answer."""
    data = b""
    while until_bytes is None or until_bytes not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def token_ids(answer: bytes) -> list[int]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    lines = [json.loads(line) for line in body.splitlines()]
    assert all(line["error_code"] == 0 for line in lines)
    return [line["token_id"] for line in lines]


def test_a_tcp_client_that_stops_reading_is_held_by_the_real_server(tiny_checkpoints, text_tokenizer):
    """The real server (build_server, as model_server.py runs it) on a loopback port: a client socket
    that reads the first token and then nothing fills the buffers between it and the server; the
    server's writes then wait, its stream is held in the engine while another client is served, and
    once the client reads again it gets the whole answer, the same as a client that never stopped."""
    engine, settings = engine_and_settings(tiny_checkpoints.llm, max_seq_len=LONG_ANSWER + 64)
    app = create_app(engine, settings, text_tokenizer)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)  # accepted sockets inherit it
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = build_server(app, "127.0.0.1", port, ConnectionLimits(), log_level="warning")

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # before connect: the window
        sock.settimeout(300)
        sock.connect(("127.0.0.1", port))
        return sock

    def ask(prompt_ids: list[int]) -> list[int]:
        with connect() as sock:
            sock.sendall(http10_request(port, prompt_ids))
            return token_ids(receive(sock))

    async def main():
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        await until(lambda: server.started or serving.done(), "the server did not start")
        try:
            slow = await asyncio.to_thread(connect)
            with slow:
                slow.sendall(http10_request(port, list(range(100, 141))))
                first = await asyncio.to_thread(receive, slow, b'"error_code": 0}\n')  # then it stops reading
                await until(lambda: engine.stats().held_streams == 1, "the unread stream was not held")
                quick = await asyncio.to_thread(ask, [5, 9, 13])  # another client is served meanwhile
                held = engine.stats()
                rest = await asyncio.to_thread(receive, slow)
            alone = await asyncio.to_thread(ask, list(range(100, 141)))
            return token_ids(first + rest), quick, alone, held
        finally:
            server.should_exit = True
            await serving

    slow, quick, alone, held = asyncio.run(main())
    assert held.held_streams == 1 and held.holds >= 1
    assert len(quick) == LONG_ANSWER
    assert slow == alone and len(slow) == LONG_ANSWER
