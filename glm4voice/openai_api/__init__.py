"""OpenAI-compatible API of the speech-side process (the web demo's app, same port as the page).

    add_openai_routes(app, chat)     # in web_demo's create_app, before the page is mounted at "/"

- ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON and server-sent events; text and audio in,
  text and 24 kHz audio out; multi-turn by audio id): :mod:`~glm4voice.openai_api.chat`;
- ``GET /v1/realtime`` (WebSocket; server VAD, barge-in, truncation; GA event names, and the beta ones
  for clients that send ``OpenAI-Beta: realtime=v1``): :mod:`~glm4voice.openai_api.realtime`.

Both run on :class:`glm4voice.conversation.ConversationSession`. docs/API.md describes the surface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from glm4voice.openai_api.chat import add_chat_routes
from glm4voice.openai_api.service import API_PREFIX, MODEL_ID, ApiSettings, OpenAIService
from glm4voice.pipeline import VoiceChat


def add_openai_routes(app: FastAPI, chat: VoiceChat, settings: ApiSettings = ApiSettings()) -> OpenAIService:
    """Mount the ``/v1`` routes on ``app`` (call it before anything mounted at ``/``); the service is
    kept in ``app.state.openai`` and closed when the app's lifespan ends."""
    from glm4voice.openai_api.realtime import add_realtime_route

    service = OpenAIService(chat, settings)
    app.state.openai = service
    add_chat_routes(app, service)
    add_realtime_route(app, service)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        try:
            async with inner(app) as state:
                yield state
        finally:
            service.close()

    app.router.lifespan_context = lifespan
    return service


__all__ = ["API_PREFIX", "MODEL_ID", "ApiSettings", "OpenAIService", "add_openai_routes"]
