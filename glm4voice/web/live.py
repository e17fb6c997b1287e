"""The page's live socket: conversation mode's microphone in, the turn-taking's events out.

``GET {LIVE_PATH}/{token}`` (a WebSocket) connects to the browser tab named by ``token``
(:attr:`glm4voice.web.tab.PageTab.token`, given to the page when conversation mode is switched on). The
tab's :class:`~glm4voice.conversation.ConversationSession` does the turn-taking (silero-vad turn
detection, barge-in, truncation): this module only carries audio and events. The page's side is
``glm4voice/web/live.js``; its AudioWorklet, ``glm4voice/web/mic_worklet.js``, is served at
``WORKLET_PATH``.

Client to server:

- ``{"type": "start", "sample_rate": N}``: the microphone's rate (its AudioContext's), before any audio;
- binary messages: little-endian int16 mono PCM at that rate (about 20 ms each), resampled as a stream
  to 16 kHz (the VAD's and the speech tokenizer's rate);
- ``{"type": "playback", "turn": "<player turn>" | null, "played_ms": N}``: the answer to every
  ``speech_started``: the answer the page's player stopped and how much of it was heard (null: nothing
  was playing); the conversation keeps only that, then the next answer starts;
- ``{"type": "bye"}``: conversation mode switched off (an answer in flight goes on).

Server to client: ``{"type": "ready"}``, then ``speech_started`` (``item_id``, ``audio_start_ms``,
``speech_start_ms``: milliseconds of the audio sent), ``speech_stopped`` (``audio_end_ms``), ``answer``
(``turn``: the player's id of a new answer, ``stream``: its audio stream's URL), ``answer_done``
(``turn``, ``status``), and ``error`` (``message``) for a message that was refused; the connection goes
on. A socket that closes without ``bye`` (the tab went away) stops listening and stops the answer in
flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket
from fastapi.responses import Response

from glm4voice.audio import INPUT_SAMPLE_RATE, PCM_DTYPE
from glm4voice.conversation import SessionError, StreamResampler
from glm4voice.request_guard import WEBSOCKET_POLICY_VIOLATION
from glm4voice.web import mic_worklet_script
from glm4voice.web.tab import PageTab

logger = logging.getLogger(__name__)

LIVE_PATH = "/glm4voice/live"
"""URL path of the live sockets (a tab's is ``LIVE_PATH/<token>``)."""
WORKLET_PATH = LIVE_PATH + "/mic-worklet.js"
MAX_AUDIO_BYTES = 1 << 19
"""Largest binary message (about 5 s at 48 kHz); the page sends 20 ms."""
MAX_TEXT_BYTES = 4096
SAMPLE_RATES = (8_000, 192_000)
"""Microphone rates accepted (an AudioContext's range)."""
INT16_TO_FLOAT = 1 / 32768
"""Scale of the microphone's int16 samples (as the page's player reads its own frames)."""


class LiveTabs:
    """The app's tabs by token (one registry per app, held by the app: no module globals)."""

    def __init__(self) -> None:
        self._tabs: dict[str, PageTab] = {}

    def __len__(self) -> int:
        return len(self._tabs)

    def add(self, tab: PageTab) -> None:
        self._tabs[tab.token] = tab

    def get(self, token: str) -> PageTab | None:
        return self._tabs.get(token)

    def remove(self, tab: PageTab) -> None:
        if self._tabs.get(tab.token) is tab:
            del self._tabs[tab.token]


def live_url(tab: PageTab) -> str:
    """The tab's socket path relative to the page (works under any mount path or proxy prefix)."""
    return f"{LIVE_PATH.lstrip('/')}/{tab.token}"


def add_live_routes(app: FastAPI, tabs: LiveTabs) -> None:
    """The live socket and the microphone's worklet (call before anything is mounted at ``/``)."""

    @app.get(WORKLET_PATH)
    async def mic_worklet():
        return Response(mic_worklet_script(), media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @app.websocket(LIVE_PATH + "/{token}")
    async def live(websocket: WebSocket, token: str):
        tab = tabs.get(token)
        if tab is None:
            await websocket.close(WEBSOCKET_POLICY_VIOLATION, reason="no such page session (reload the page)")
            return
        await LiveSocket(tab, websocket).run()


class LiveSocket:
    """One connection (see the module doc): messages are handled one at a time, in order; events leave
    through one queue and one writer task, in the order the session reports them."""

    def __init__(self, tab: PageTab, websocket: WebSocket):
        self.tab = tab
        self.websocket = websocket
        self.resampler: StreamResampler | None = None
        self.said_bye = False
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()

    async def run(self) -> None:
        await self.websocket.accept()
        writer = asyncio.create_task(self._write())
        self.tab.attach(self._send)
        try:
            self._send({"type": "ready"})
            await self._receive()
        finally:
            self.tab.detach(self._send)
            if not self.said_bye:
                await self.tab.listener_gone()
            self._outbox.put_nowait(None)
            await asyncio.wait([writer])

    def _send(self, message: dict[str, Any]) -> None:
        self._outbox.put_nowait(json.dumps(message))

    def _error(self, message: str) -> None:
        self._send({"type": "error", "message": message})

    async def _write(self) -> None:
        while (text := await self._outbox.get()) is not None:
            try:
                await self.websocket.send_text(text)
            except Exception:  # the page has gone: nothing more can be sent
                logger.debug("live socket gone while sending", exc_info=True)
                return

    async def _receive(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                if message.get("bytes") is not None:
                    await self._audio(message["bytes"])
                elif message.get("text") is not None and await self._control(message["text"]):
                    return
            except (ValueError, SessionError) as error:
                self._error(str(error.message if isinstance(error, SessionError) else error))
            except Exception as error:  # a bug: the page hears of it, the socket goes on
                logger.exception("live socket message failed")
                self._error(f"internal error: {error}")

    async def _audio(self, data: bytes) -> None:
        if self.resampler is None:
            raise ValueError("send {type: start, sample_rate} before the audio")
        if len(data) > MAX_AUDIO_BYTES or len(data) % 2:
            raise ValueError(f"audio messages are int16 PCM of at most {MAX_AUDIO_BYTES} bytes (got {len(data)})")
        samples = np.frombuffer(data, dtype=PCM_DTYPE).astype(np.float32) * INT16_TO_FLOAT
        await self.tab.append_audio(self.resampler.feed(samples))

    async def _control(self, text: str) -> bool:
        """Handle a text message; True when the page said goodbye."""
        if len(text) > MAX_TEXT_BYTES:
            raise ValueError(f"text messages have at most {MAX_TEXT_BYTES} bytes")
        data = json.loads(text)
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "start":
            rate = data.get("sample_rate")
            low, high = SAMPLE_RATES
            if not isinstance(rate, (int, float)) or not low <= rate <= high or rate != int(rate):
                raise ValueError(f"sample_rate must be a whole number of Hz between {low} and {high}")
            self.resampler = StreamResampler(int(rate), INPUT_SAMPLE_RATE)
        elif kind == "playback":
            turn, played = data.get("turn"), data.get("played_ms", 0)
            if (turn is not None and not isinstance(turn, str)) or not isinstance(played, (int, float)):
                raise ValueError("playback takes turn (a string or null) and played_ms (a number)")
            await self.tab.playback_stopped(turn, int(played))
        elif kind == "bye":
            self.said_bye = True
            return True
        else:
            raise ValueError(f"unknown message type {kind!r}")
        return False


__all__ = ["LIVE_PATH", "WORKLET_PATH", "LiveSocket", "LiveTabs", "add_live_routes", "live_url"]
