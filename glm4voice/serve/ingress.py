"""The ``Ingress`` deployment: the HTTP surface of the token server and of the OpenAI-compatible API,
served by Ray Serve's HTTP proxy on top of the engine and speech replicas.

The app is the token server's own (:func:`glm4voice.server.app.create_app`) around a
:class:`~glm4voice.serve.tokens.RayTokenBackend`: ``POST /generate_stream`` (the same validation, the
same NDJSON lines, the same error bodies as ``model_server.py``), ``GET /health``, ``GET /metrics``,
the Host allow-list and cross-site refusal. The OpenAI-compatible routes (``/v1/models``,
``/v1/chat/completions``, ``/v1/realtime``) are ``glm4voice.openai_api``'s, on a
:class:`~glm4voice.serve.turns.RemoteVoiceChat` whose turns run on the speech replicas. Besides,
``GET /replicas``: each engine and speech replica's own counters, as of the last stream it took.

Admission is Ray Serve's: a replica takes at most its engine's batch of streams, the router queues the
rest up to ``max_queue`` and then refuses (503 + Retry-After, the token server's error body); the
token server's own admission is set wide open here so that it never refuses first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import anyio
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.responses import Response

from glm4voice.openai_api import ApiSettings, add_openai_routes
from glm4voice.pipeline import VoiceChat
from glm4voice.serve.config import ENGINE_APP, ENGINE_DEPLOYMENT, INGRESS_MAX_ONGOING, ServeConfig
from glm4voice.serve.tokens import RayTokenBackend, tokenizer_folder
from glm4voice.serve.turns import RemoteVoiceChat
from glm4voice.server.app import create_app
from glm4voice.server.streaming import json_response
from glm4voice.text_tokenizer import GLMTokenizer

REPLICAS_PATH = "/replicas"


async def build_app(config: ServeConfig, speech: DeploymentHandle[Any] | None) -> FastAPI:
    """The ingress's FastAPI app (built on the replica: handles and the tokenizer are its own)."""
    engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=ENGINE_APP)
    tokenizer = await anyio.to_thread.run_sync(GLMTokenizer.from_pretrained, tokenizer_folder(config.server.model_path))
    backend = RayTokenBackend(engine, config.server)
    # admission is Ray's (the engines' max_ongoing_requests and the router's queue): the token server's
    # own is set wide open, so that it never refuses before the engines do
    open_settings = dataclasses.replace(config.server, max_concurrent_streams=INGRESS_MAX_ONGOING, max_queue=0)
    app = create_app(backend, open_settings, tokenizer)
    chat = None
    if speech is not None:
        chat = RemoteVoiceChat(speech, tokenizer, config.pipeline)
        # RemoteVoiceChat has all that the routes use of a VoiceChat (glm4voice.serve.turns)
        add_openai_routes(app, cast(VoiceChat, chat), ApiSettings(retry_after_s=config.server.retry_after_s))

    @app.get(REPLICAS_PATH)
    async def replicas() -> Response:
        """Each replica this ingress sent work to: its own counters as of the last stream it took, and
        what the ingress routed there (see :mod:`glm4voice.serve.board`)."""
        body = {"engine": backend.board.as_list()}
        if chat is not None:
            body["speech"] = chat.board.as_list()
        return json_response(200, body)

    return app


@serve.ingress()
class Ingress:
    def __init__(self, config: ServeConfig, speech: DeploymentHandle[Any] | None = None):
        self.config = config
        self.speech = speech

    async def __serve_build_asgi_app__(self) -> FastAPI:
        return await build_app(self.config, self.speech)
