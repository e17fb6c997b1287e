"""The token server without a port: the LLM engine in this process (the one-process layout,
``web_demo.py --in-process-engine``); its client is :class:`glm4voice.client.InProcessTokenClient`.

    server = InProcessTokenServer(engine, settings)   # engine: a glm4voice.llm Engine or a TokenBackend
    async with server.running():                      # starts the engine (load, warm-up), as model_server does
        client = InProcessTokenClient(server)         # what AsyncTokenClient is to model_server.py
        async for token_id in client.stream(prompt_token_ids=ids, max_new_tokens=200):
            ...

It is ``model_server.py``'s app (:func:`glm4voice.server.app.create_app`) minus the HTTP transport:
:meth:`InProcessTokenServer.generate_stream` takes the request body the HTTP client would send and
runs the server's own code for it, :func:`~glm4voice.server.app.open_stream` (body limit, validation,
prompt checks, admission: 503 when the queue is full) and :func:`~glm4voice.server.streaming.job_tokens`
(waiting for a slot, the engine stream); a refusal is the same JSON answer the HTTP route sends
(:class:`~glm4voice.server.streaming.StreamRefused`), a failure after the first token the same final
error line (:class:`~glm4voice.server.streaming.StreamBroken`); :meth:`InProcessTokenServer.health`
is ``GET /health``'s answer, and ``/metrics``' figures stay in ``server.state.metrics``. Leaving a
stream early (``aclose``, cancelling the task) cancels the engine stream, which frees its slot at
the engine's next step, and releases the admission slot.

Everything runs on one event loop (the engine posts its tokens to the loop that started it): start
the server inside the loop that serves the speech side. If the engine's worker dies, the server
stops accepting work and calls the ``on_engine_failure`` callback (``web_demo.py`` then exits with
``ENGINE_FAILED_EXIT_CODE`` so that a supervisor restarts it, as model_server.py does).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractContextManager, aclosing, asynccontextmanager, nullcontext
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from glm4voice.server.app import ServerState, create_app, health_response, open_stream
from glm4voice.server.settings import ServerSettings
from glm4voice.server.streaming import job_tokens
from glm4voice.text_tokenizer import GLMTokenizer


class InProcessTokenServer:
    """The token server's state and lifespan around ``engine``, without a port (see the module doc)."""

    def __init__(self, engine: Any, settings: ServerSettings, tokenizer: GLMTokenizer | None = None):
        self.settings = settings
        self.app: FastAPI = create_app(engine, settings, tokenizer)
        self.state: ServerState = self.app.state.server

    def make_way(self, starting_tokens: int = 0) -> AbstractContextManager[None]:
        """While in it, the engine starts no new step but those of starting requests (see
        ``Engine.make_way``): what the speech side decodes a turn's first audio block in, as it shares
        this process's GPU with the engine."""
        make_way = getattr(self.state.backend, "make_way", None)
        return make_way(starting_tokens) if make_way is not None else nullcontext()

    @property
    def failure(self) -> BaseException | None:
        """Why the engine died (None while it runs, and after a clean stop)."""
        return self.state.failure

    def on_engine_failure(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the event loop) if the engine's worker dies, after the open
        streams have ended with an error and admission has closed."""
        self.state.request_exit = callback

    def begin_shutdown(self) -> None:
        """Stop accepting work and end the open streams with an error at once (what leaving
        :meth:`running` does first; call it when the process is asked to stop)."""
        self.state.begin_shutdown()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[InProcessTokenServer]:
        """Start the engine (load, warm-up) and the text tokenizer; stop them on exit (open streams
        end with an error first). Enter it inside the event loop that will serve the requests."""
        async with self.app.router.lifespan_context(self.app):
            yield self

    async def generate_stream(self, body: bytes) -> AsyncGenerator[int, None]:
        """``POST /generate_stream`` without HTTP: ``body`` as the HTTP client sends it, the token ids
        as the route streams them. Raises :class:`~glm4voice.server.streaming.StreamRefused` (the JSON
        answer) before the first token, :class:`~glm4voice.server.streaming.StreamBroken` (the final
        error line's text) after it."""
        job = await open_stream(self.state, body, time.perf_counter())
        try:
            async with aclosing(job_tokens(job)) as tokens:
                async for token_id in tokens:
                    yield token_id
        finally:
            job.end()

    def health(self) -> Response:
        """``GET /health``'s answer (200 while ready, else 503 with the same body)."""
        return health_response(self.state)

    def serve_inside(self, app: Any) -> Any:
        """``app`` (an ASGI app with a Starlette router, e.g. the web demo's) with this server's
        lifespan around its own: the engine is ready before ``app`` starts and stops after it."""
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(outer_app):
            async with self.running(), inner(outer_app) as state:
                yield state

        app.router.lifespan_context = lifespan
        return app
