"""A token server client that stops reading: its stream is held in the engine (no decode steps) while the
others run, and goes on to its whole answer once the client reads again. Over HTTP the app is driven
through ASGI with a ``send`` that blocks, as a server's ``send`` does once a slow client's buffers are
full; in process (the one-process layout) the client simply stops iterating, as a paced voice turn's
reader does."""

from __future__ import annotations

import asyncio
import json

from glm4voice.client import InProcessTokenClient
from glm4voice.llm.checkpoint import load_model
from glm4voice.llm.engine import Engine, EngineConfig
from glm4voice.server.app import create_app
from glm4voice.server.inprocess import InProcessTokenServer
from glm4voice.server.settings import ServerSettings

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


def engine_and_settings(folder) -> tuple[Engine, ServerSettings]:
    model = load_model(folder, device="cpu", dtype="float32")
    config = EngineConfig(
        device="cpu", dtype="float32", max_batch_size=4, max_seq_len=256, max_unread_tokens=UNREAD_LIMIT
    )
    settings = ServerSettings(model_path=str(folder), device="cpu", dtype="float32", max_seq_len=256)
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
