"""The token server without a port: the LLM engine in this process, used by the speech side through
an in-process client with the HTTP client's interface (the one-process layout: ``web_demo.py --in-process-engine``).

    server = InProcessTokenServer(engine, settings)   # engine: a glm4voice.llm Engine or a TokenBackend
    async with server.running():                      # starts the engine (load, warm-up), as model_server does
        client = server.client()                      # what glm4voice.client.AsyncTokenClient is to model_server.py
        async for token_id in client.stream(prompt_token_ids=ids, max_new_tokens=200):
            ...

It is ``model_server.py``'s app (:func:`glm4voice.server.app.create_app`) minus the HTTP transport:
each request is encoded as the HTTP client would send it and runs the server's own code,
:func:`~glm4voice.server.app.open_stream` (body limit, validation, prompt checks, admission: 503 when
the queue is full) and :func:`~glm4voice.server.streaming.job_tokens` (waiting for a slot, engine
stream); a refusal is the same JSON answer, turned into an error by the HTTP client's own
:func:`glm4voice.client.error_from_answer`. So :class:`InProcessTokenClient` yields the same token
ids and raises the same :class:`~glm4voice.client.TokenServerError` subclasses, with the same
messages, as :class:`~glm4voice.client.AsyncTokenClient` against ``model_server.py`` with the same
settings; ``/health``'s body comes from :meth:`InProcessTokenClient.health`, ``/metrics``' figures
stay in ``server.state.metrics``. Leaving a stream early (``break``, ``aclose``, cancelling the task)
cancels the engine stream, which frees its slot at the engine's next step, and releases the admission slot.

Everything runs on one event loop (the engine posts its tokens to the loop that started it): start
the server inside the loop that serves the speech side. If the engine's worker dies, the server
stops accepting work and calls the ``on_engine_failure`` callback (the one-process command exits
with ``ENGINE_FAILED_EXIT_CODE`` so that a supervisor restarts it, as model_server.py does).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.responses import Response

from glm4voice.client import StreamFailedError, TokenServerError, error_from_answer, request_body
from glm4voice.server.app import ServerState, create_app, health_response, open_stream
from glm4voice.server.settings import ServerSettings
from glm4voice.server.streaming import StreamBroken, StreamRefused, job_tokens
from glm4voice.text_tokenizer import GLMTokenizer

IN_PROCESS_URL = "in-process://engine"
"""What :attr:`InProcessTokenClient.base_url` says (messages name the model server by its URL)."""


def encode_body(body: dict[str, Any]) -> bytes:
    """The request body as ``httpx`` encodes ``json=body`` (NaN and infinities raise ValueError
    before anything is sent, as there)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def answer_error(response: Response) -> TokenServerError:
    """The client error for a refusal answer: exactly what the HTTP client makes of it."""
    return error_from_answer(response.status_code, httpx.Headers(list(response.headers.items())), response.body)


class InProcessTokenServer:
    """The token server's state and lifespan around ``engine``, without a port (see the module doc)."""

    def __init__(self, engine: Any, settings: ServerSettings, tokenizer: GLMTokenizer | None = None):
        self.settings = settings
        self.app: FastAPI = create_app(engine, settings, tokenizer)
        self.state: ServerState = self.app.state.server

    @property
    def failure(self) -> BaseException | None:
        """Why the engine died (None while it runs, and after a clean stop)."""
        return self.state.failure

    def on_engine_failure(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the event loop) if the engine's worker dies, after the open
        streams have ended with an error and admission has closed."""
        self.state.request_exit = callback

    @asynccontextmanager
    async def running(self) -> AsyncIterator[InProcessTokenServer]:
        """Start the engine (load, warm-up) and the text tokenizer; stop them on exit (open streams
        end with an error first). Enter it inside the event loop that will use :meth:`client`."""
        async with self.app.router.lifespan_context(self.app):
            yield self

    def client(self) -> InProcessTokenClient:
        return InProcessTokenClient(self.state)

    def serve_inside(self, app: Any) -> Any:
        """``app`` (an ASGI app with a Starlette router, e.g. the web demo's) with this server's
        lifespan around its own: the engine is ready before ``app`` starts and stops after it."""
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(outer_app):
            async with self.running():
                async with inner(outer_app) as state:
                    yield state

        app.router.lifespan_context = lifespan
        return app


class InProcessTokenClient:
    """:class:`glm4voice.client.AsyncTokenClient`'s interface over an :class:`InProcessTokenServer`
    (same arguments, token ids and errors; see the module doc)."""

    def __init__(self, state: ServerState, base_url: str = IN_PROCESS_URL):
        self._state = state
        self.base_url = base_url

    async def __aenter__(self) -> InProcessTokenClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to close (the server owns the engine); for the HTTP client's interface."""

    async def stream(self, prompt: str | None = None, **params: Any) -> AsyncIterator[int]:
        """Token ids as the engine generates them (the stop token that ended the turn included).
        Keyword arguments: see :func:`glm4voice.client.request_body`."""
        raw = encode_body(request_body(prompt, **params))
        try:
            job = await open_stream(self._state, raw, time.perf_counter())
        except StreamRefused as refused:
            raise answer_error(refused.response) from None
        try:
            async with aclosing(job_tokens(job)) as tokens:
                async for token_id in tokens:
                    yield token_id
        except StreamRefused as refused:
            raise answer_error(refused.response) from None
        except StreamBroken as broken:
            raise StreamFailedError(broken.text, job.tokens_sent) from None
        finally:
            job.end()

    async def generate(self, prompt: str | None = None, **params: Any) -> list[int]:
        """The whole stream as a list."""
        return [token async for token in self.stream(prompt, **params)]

    async def health(self) -> dict[str, Any]:
        """``GET /health``'s body; the HTTP client's error when the server is not ready (503)."""
        response = health_response(self._state)
        if response.status_code != 200:
            raise answer_error(response)
        return json.loads(response.body)
