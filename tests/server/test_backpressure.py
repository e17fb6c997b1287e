"""A token server client that stops reading: its stream is held in the engine (no decode steps) while the
others run, and goes on to its whole answer once the client reads again. The app is driven through ASGI
with a ``send`` that blocks, as a server's ``send`` does once a slow client's buffers are full."""

from __future__ import annotations

import asyncio
import json

from glm4voice.llm.checkpoint import load_model
from glm4voice.llm.engine import Engine, EngineConfig
from glm4voice.server.app import create_app
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


def test_a_client_that_stops_reading_is_held_and_then_served_whole(tiny_checkpoints, text_tokenizer):
    model = load_model(tiny_checkpoints.llm, device="cpu", dtype="float32")
    config = EngineConfig(
        device="cpu", dtype="float32", max_batch_size=4, max_seq_len=256, max_unread_tokens=UNREAD_LIMIT
    )
    engine = Engine(model, config, stop_ids=())
    settings = ServerSettings(model_path=str(tiny_checkpoints.llm), device="cpu", dtype="float32", max_seq_len=256)
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
