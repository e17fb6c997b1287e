"""The real token server's app around a scripted backend, for the web demo's tests:
``python tests/server/scripted_server.py [model_server.py flags]`` (``--model-path``: a folder with
the text tokenizer, e.g. the tiny LLM checkpoint; no weights are loaded).

Every answer follows the 13 text / 26 audio interleave of a real one (the text of a fixed
sentence, audio codes that vary: ``bench/e2e_server.AnswerPattern``) and ends with ``<|user|>``
as its ``max_new_tokens``-th token, so the page decodes real audio blocks. What a test controls:

- an answer of exactly :data:`HELD_ANSWER_TOKENS` tokens stops after :data:`HOLD_AFTER_TOKENS`
  tokens until ``POST /test/release`` (which frees every answer held at that moment), so a turn
  stays in flight for as long as a test needs, without any timing;
- ``POST /test/engine {"running": false}``: the engine stops as a real one that died: every request
  gets 503 "the engine is not running", ``/health`` answers 503 "engine stopped";
  ``{"running": true}`` brings it back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from fastapi import Request
from starlette.responses import JSONResponse

from bench.e2e_server import AnswerPattern
from glm4voice.server.app import create_app, serve
from glm4voice.server.streaming import EngineRejected
from glm4voice.text_tokenizer import GLMTokenizer
from model_server import build_parser, settings_from_args

HELD_ANSWER_TOKENS = 3001
HOLD_AFTER_TOKENS = 2 * (13 + 26)
"""Two text/audio segments: the page has decoded and streamed audio before the answer is held."""


class ScriptedStream:
    def __init__(self, backend: ScriptedBackend, length: int, seed: int):
        self.backend, self.length, self.seed = backend, length, seed
        self.position = 0
        self.cancelled = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> int:
        if self.length == HELD_ANSWER_TOKENS and self.position == HOLD_AFTER_TOKENS:
            await self.backend.release.wait()
        if self.cancelled or self.position >= self.length:
            raise StopAsyncIteration
        await asyncio.sleep(0)  # one token per turn of the event loop, as an engine step
        token = self.backend.pattern.token(self.position, self.length, self.seed)
        self.position += 1
        return token

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedBackend:
    """A :class:`glm4voice.server.backend.TokenBackend` without a model (see the module doc)."""

    is_token_backend = True

    def __init__(self, folder: Path):
        self.checkpoint_folder = folder
        self.vocab_size = json.loads((folder / "config.json").read_text())["padded_vocab_size"]
        self.running = True
        self.pattern: AnswerPattern | None = None
        self.release = asyncio.Event()

    async def start(self) -> None:
        self.pattern = AnswerPattern.from_tokenizer(GLMTokenizer.from_pretrained(self.checkpoint_folder))
        self.release = asyncio.Event()

    async def stop(self) -> None:
        self.release.set()

    def release_held(self) -> None:
        held, self.release = self.release, asyncio.Event()
        held.set()

    def stats(self) -> dict[str, float]:
        return {"running": float(self.running)}

    def submit(self, prompt_ids, request) -> ScriptedStream:
        if not self.running:
            raise EngineRejected(503, "the engine is not running: stopped by the test; retry later", retry_after=True)
        return ScriptedStream(self, request.max_new_tokens, request.seed or 0)


def main() -> None:
    settings = settings_from_args(build_parser().parse_args())
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = ScriptedBackend(Path(settings.model_path))
    app = create_app(backend, settings)

    @app.post("/test/release")
    async def release() -> JSONResponse:
        backend.release_held()
        return JSONResponse({"released": True})

    @app.post("/test/engine")
    async def engine(request: Request) -> JSONResponse:
        backend.running = bool((await request.json())["running"])
        return JSONResponse({"running": backend.running})

    raise SystemExit(serve(app, settings))


if __name__ == "__main__":
    main()
