"""The real token server for tests, recording what it is asked: ``python tests/openai_api/recording_server.py
[model_server.py flags]``.

Built like ``model_server.main`` (same settings, real engine, same uvicorn server); the backend keeps, for
each request in order, the prompt ids it received and the ids it streamed back, served at
``GET /test/requests`` (a test's view of "the prompt the token server received").

``--no-stop-tokens``: the engine ends a reply only at its ``max_new_tokens``, never at the checkpoint's
stop ids. The tiny random model samples a stop id now and then (a few answers in a hundred end early at a
random point); a test that interrupts a long answer needs the answer to still be running when it does
(see also :data:`HELD_MAX_NEW_TOKENS`).
"""

from __future__ import annotations

import asyncio
import logging

from glm4voice.server.engine_backend import EngineBackend, build_engine
from model_server import build_parser, create_app, serve, settings_from_args

REQUESTS_PATH = "/test/requests"
HELD_MAX_NEW_TOKENS = 1777
"""A request for exactly this many new tokens is held: after :data:`HELD_AFTER` tokens its stream sends
nothing more (the engine's stream is cancelled) and stays open until its client goes. So a test that
interrupts an answer finds it still running however fast the tiny model streams on a loaded machine."""
HELD_AFTER = 120


class RecordingStream:
    def __init__(self, stream, record: dict):
        self._stream = stream
        self._record = record

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        if self._record["max_new_tokens"] == HELD_MAX_NEW_TOKENS and len(self._record["token_ids"]) >= HELD_AFTER:
            self._stream.cancel()  # the engine's slot is free; the request stays open
            await asyncio.Event().wait()  # until the request is cancelled
        token_id = await anext(self._stream)
        self._record["token_ids"].append(int(token_id))
        return token_id

    def cancel(self) -> None:
        self._stream.cancel()


class RecordingBackend(EngineBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list[dict] = []

    def submit(self, prompt_ids, request):
        stream = super().submit(prompt_ids, request)
        record = {"prompt_ids": [int(i) for i in prompt_ids], "token_ids": [], "seed": request.seed,
                  "max_new_tokens": request.max_new_tokens}  # fmt: skip
        self.requests.append(record)
        return RecordingStream(stream, record)


def main() -> None:
    parser = build_parser()
    parser.add_argument("--no-stop-tokens", action="store_true", help="end replies only at max_new_tokens")
    args = parser.parse_args()
    settings = settings_from_args(args)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = build_engine(settings, **({"stop_ids": ()} if args.no_stop_tokens else {}))
    backend = RecordingBackend(engine, settings.model_path)
    app = create_app(backend, settings)

    @app.get(REQUESTS_PATH)
    async def requests():
        return backend.requests

    raise SystemExit(serve(app, settings))


if __name__ == "__main__":
    main()
