"""The web demo's FastAPI app: the per-turn audio stream route, conversation mode's live socket, the
OpenAI-compatible ``/v1`` routes, then the Gradio page mounted at ``/``.

    app = create_app(chat, DemoSettings(...), close_client=client.aclose)   # chat: a VoiceChat
    uvicorn.run(app, host=..., port=...)

``web_demo.py`` is the command line around this (it loads the models and the token-server client).
The app owns the turn streams (:class:`glm4voice.web.streams.AudioStreams`), the audio files
(:class:`glm4voice.web.files.DemoFiles`), the registry of the page's tabs that the live socket reaches
(:class:`glm4voice.web.live.LiveTabs`), the record of each browser session's uploads
(:class:`glm4voice.web.uploads.SessionUploads`, enforced by :func:`glm4voice.web.uploads.guard_uploads`:
a request can only name files its own browser session uploaded) and, at shutdown, closes the chat (and
the client, if ``close_client`` is given). All of them are on ``app.state``: nothing lives in module globals.
The page's conversation mode and ``/v1/realtime`` share one VAD model (``app.state.openai.vad``).
Every request and WebSocket handshake passes :class:`glm4voice.request_guard.RequestGuard` first
(``host_policy``: the hosts served, loopback only unless given; cross-site browser requests refused).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import gradio as gr
from fastapi import FastAPI
from gradio.utils import get_upload_folder

from glm4voice.client import TokenServerError
from glm4voice.defaults import LOOPBACK_HOST
from glm4voice.openai_api import API_PREFIX, add_openai_routes
from glm4voice.pipeline import VoiceChat
from glm4voice.request_guard import HostPolicy, RequestGuard
from glm4voice.web.files import DemoFiles
from glm4voice.web.live import LIVE_PATH, LiveTabs, add_live_routes
from glm4voice.web.page import PAGE_CSS, RESOURCES, DemoSettings, create_demo, page_head
from glm4voice.web.streams import STREAM_PATH, AudioStreams, add_stream_route
from glm4voice.web.uploads import SessionUploads, guard_uploads

logger = logging.getLogger("glm4voice.web_demo")

MAX_UPLOAD_SIZE = "100mb"


def create_app(
    chat: VoiceChat,
    settings: DemoSettings = DemoSettings(),
    *,
    close_client: Callable[[], Awaitable[None]] | None = None,
    host_policy: HostPolicy | None = None,
) -> FastAPI:
    """The FastAPI app: the turn-stream route, the live socket, ``/v1``, then the Gradio page mounted at ``/``,
    behind the request guard (``host_policy``; default: loopback names only)."""
    streams = AudioStreams(chat.sample_rate)
    files = DemoFiles(get_upload_folder())
    uploads = SessionUploads()
    tabs = LiveTabs()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await _check_server(chat)
        try:
            yield
        finally:
            streams.discard_all()
            files.cleanup()
            chat.close()
            if close_client is not None:
                await close_client()

    app = FastAPI(title="GLM-4-Voice web demo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.streams = streams
    app.state.files = files
    app.state.chat = chat
    app.state.uploads = uploads
    app.state.tabs = tabs
    app.add_middleware(RequestGuard, policy=host_policy or HostPolicy.for_server(LOOPBACK_HOST))
    add_stream_route(app, streams)  # before the mount: "/" would catch everything
    add_live_routes(app, tabs)  # conversation mode's microphone socket
    service = add_openai_routes(app, chat)  # /v1: OpenAI-compatible chat completions and realtime (docs/API.md)
    demo = create_demo(chat, streams, files, settings, uploads, tabs=tabs, vad=service.vad)
    demo.queue(default_concurrency_limit=settings.max_concurrent_turns)
    head = page_head(chat.sample_rate, chat.config.player_lead_s)
    app = gr.mount_gradio_app(
        app, demo, path="/", head=head, css=PAGE_CSS, allowed_paths=[str(RESOURCES)],
        max_file_size=MAX_UPLOAD_SIZE, footer_links=[], show_error=True, run_history=False,
    )  # fmt: skip
    guard_uploads(app, demo, uploads, own_routes=(API_PREFIX + "/", STREAM_PATH + "/", LIVE_PATH + "/"))
    return app


async def _check_server(chat: VoiceChat) -> None:
    """Say at start whether the model server answers (the page works either way and reports it per turn)."""
    health = getattr(chat.client, "health", None)
    if health is None:
        return
    try:
        info = await health()
        logger.info("model server at %s is %s (%s)", chat.server_url, info.get("status"), info.get("model"))
    except TokenServerError as error:
        logger.warning("the model server at %s does not answer yet (%s); turns will fail until it does",
                       chat.server_url, error)  # fmt: skip
