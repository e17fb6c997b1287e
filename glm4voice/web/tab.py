"""One browser tab of the web demo: its conversation, whatever the way in (typed or recorded turns, Stop,
conversation mode over the live socket).

:class:`PageTab` owns the tab's :class:`glm4voice.conversation.ConversationSession` (the history as token
ids, the answer in flight, turn detection, cancellation and truncation: the one implementation of the
turn-taking, shared with ``/v1/realtime``) and its :class:`glm4voice.web.chat_view.ChatView`. The
session's audio comes out at the decoder's rate (the page's player runs at it), and it runs with
``playback_reports`` (the page says what was heard of an answer whenever the user starts speaking over
it) and ``record_failed_turns=False`` (a failed turn is not recorded: the page puts a typed or recorded
question back for a retry).

Every call into the session goes through the tab's lock (the session's calls must not overlap: the
Gradio handlers and the live socket run concurrently). Whoever shows the page waits for changes with
:meth:`PageTab.wait_change` (a version number, no polling). The live socket, while one is connected,
gets the session's events as small JSON messages through :meth:`PageTab.attach`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from glm4voice.conversation import (
    CancelReason,
    ConversationSession,
    ResponseCreated,
    ResponseDone,
    SessionConfig,
    SessionError,
    SessionEvent,
    SpeechStarted,
    SpeechStopped,
    TurnDetection,
)
from glm4voice.conversation.vad import SileroVAD
from glm4voice.pipeline import FailureKind, GenerationOptions, TurnError, UserRequest, VoiceChat
from glm4voice.protocol import TextInput
from glm4voice.web.chat_view import AnswerView, ChatView
from glm4voice.web.files import DemoFiles
from glm4voice.web.streams import AudioStreams, stream_url

logger = logging.getLogger(__name__)

BUSY_MESSAGE = "Please wait: the previous answer is still being generated."

Listener = Callable[[dict[str, Any]], None]
"""Takes the live socket's messages (must not block)."""


class PageTab:
    """One tab's conversation (see the module doc)."""

    def __init__(self, chat: VoiceChat, streams: AudioStreams, files: DemoFiles, vad: SileroVAD | None = None):
        self.chat = chat
        self.token = secrets.token_urlsafe(24)
        """Names the tab to the live socket (unguessable)."""
        self.version = 0
        self._changed = asyncio.Event()
        self.view = ChatView(streams, files, changed=self._bump)
        config = SessionConfig(turn_detection=None, playback_reports=True, record_failed_turns=False)
        self.session = ConversationSession(chat, config, emit=self._on_event, vad=vad)
        self.lock = asyncio.Lock()
        self.epoch = 0
        """Bumped by Clear: a handler that began before sees that its turn is gone."""
        self.listening = 0
        """Non-zero while conversation mode is on: a number that changes each time it is switched on."""
        self._switched_on = 0
        self.shown_turns: set[asyncio.Event] = set()
        """One event per page handler still showing a typed or recorded turn of this tab, set when that handler
        has ended (Clear answers after them: nothing they computed before can repaint the cleared page)."""
        self._listener: Listener | None = None

    # --- what the page shows ----------------------------------------------------------------------------

    def messages(self) -> list[dict[str, Any]]:
        return self.view.messages()

    async def wait_change(self, seen: int) -> int:
        """Until the tab changed after version ``seen``; returns the new version."""
        while self.version == seen:
            await self._changed.wait()
        return self.version

    def _bump(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- typed and recorded turns -------------------------------------------------------------------------

    async def submit(self, request: UserRequest, options: GenerationOptions, content: Any) -> AnswerView:
        """One question of the page (shown as ``content``) and the answer to it, started. Raises
        :class:`TurnError` with a message for the user if the question is refused (it is not added)."""
        began = time.perf_counter()
        options.check()
        if self.session.response is not None:
            raise TurnError(FailureKind.SESSION_BUSY, BUSY_MESSAGE)
        user_input = await self.chat.prepare_input(request)
        async with self.lock:
            if self.session.response is not None:
                raise TurnError(FailureKind.SESSION_BUSY, BUSY_MESSAGE)
            item_id = f"item_{secrets.token_hex(10)}"
            self.view.show_user(item_id, content, began)
            text = user_input.text if isinstance(user_input, TextInput) else None
            self.session.add_user_input(user_input, text=text, item_id=item_id)
            prompt_tokens = len(await self.session.prompt_ids())  # what the answer's task will send
            response = self.session.create_response(options=options)
            response.prompt_tokens = prompt_tokens
        answer = self.view.answer_for(response)
        if answer is None:  # the view adds it when the session announces the response (ResponseCreated)
            raise RuntimeError("the chat view has no answer for the response just created")
        self._bump()
        return answer

    async def stop(self, turn: str | None, played_ms: int) -> AnswerView | None:
        """Stop: the page's player stopped the answer ``turn`` after ``played_ms`` of its speech. An answer
        still generated is cancelled (its token stream closed); the conversation keeps what was heard.
        With no such answer, the answer in flight (if any) stops with nothing heard."""
        async with self.lock:
            answer = self.view.answer(turn)
            running = self.session.response
            if answer is None or (running is not None and running is not answer.response):
                answer = self.view.answer_for(running) if running is not None else None
                played_ms = 0
            if answer is None:
                return None
            await self._cut(answer, played_ms, CancelReason.CLIENT_CANCELLED)
            return answer

    async def _cut(self, answer: AnswerView, played_ms: int, reason: CancelReason) -> None:
        if self.session.response is answer.response:
            await self.session.cancel_response(reason)
        if answer.item in self.session.items and played_ms < answer.item.audio_ms:
            await self.session.truncate(answer.item.id, max(0, int(played_ms)))

    # --- conversation mode --------------------------------------------------------------------------------

    async def listen(
        self, detection: TurnDetection | None, options: GenerationOptions | None = None, vad: SileroVAD | None = None
    ) -> None:
        """Conversation mode on (server turn detection with ``detection``, ``vad`` the app's model: needed
        the first time) or off (None)."""
        async with self.lock:
            if vad is not None and self.session.vad is None:
                self.session.vad = vad
            config = self.session.config
            self.session.update(
                SessionConfig(
                    output_audio=config.output_audio, output_sample_rate=config.output_sample_rate,
                    turn_detection=detection, options=options or config.options,
                    playback_reports=config.playback_reports, record_failed_turns=config.record_failed_turns,
                )
            )  # fmt: skip
            if detection is None:
                self.session.clear_input()
                self.listening = 0
            elif not self.listening:
                self._switched_on += 1
                self.listening = self._switched_on
        self._bump()

    def attach(self, listener: Listener) -> None:
        """The live socket that gets this tab's events from now on (replaces an earlier one)."""
        self._listener = listener

    def detach(self, listener: Listener) -> None:
        if self._listener is listener:
            self._listener = None

    async def append_audio(self, samples: np.ndarray) -> None:
        """16 kHz microphone audio of conversation mode (the session detects the turns)."""
        async with self.lock:
            if self.session.config.turn_detection is not None:
                await self.session.append_audio(samples)

    async def playback_stopped(self, turn: str | None, played_ms: int) -> None:
        """The page's answer to a speech start: its player stopped ``turn`` after ``played_ms`` (None:
        nothing was playing). The answer is cut to what was heard; a waiting answer starts."""
        async with self.lock:
            answer = self.view.answer(turn)
            item_id = answer.item.id if answer is not None and answer.item in self.session.items else None
            try:
                await self.session.playback_stopped(item_id, max(0, int(played_ms)))
            except SessionError as error:  # e.g. the question was refused meanwhile: nothing to answer
                logger.info("no answer after the report of tab %s: %s", self.token[:6], error.message)
                self.view.failure = error.message
                self._bump()

    async def listener_gone(self) -> None:
        """The live socket closed without saying goodbye (the tab went away): stop listening, and stop an
        answer nobody will hear."""
        if self.listening:
            await self.listen(None)
        async with self.lock:
            await self.session.cancel_response(CancelReason.CLIENT_CANCELLED)

    # --- the whole tab ------------------------------------------------------------------------------------

    async def clear(self) -> None:
        """A new conversation: the answer in flight stops, the history and the chat empty."""
        async with self.lock:
            self.epoch += 1
            await self.session.cancel_response(CancelReason.CLIENT_CANCELLED)
            for item in list(self.session.items):
                await self.session.delete_item(item.id)
            if self.session.config.turn_detection is not None:
                self.session.clear_input()
            self.view.clear()
        self._bump()

    async def close(self) -> None:
        """The tab is gone: its answer stops, its streams and files go."""
        self.epoch += 1
        self._listener = None
        await self.session.close()
        self.view.clear()
        self._bump()

    # --- session events ---------------------------------------------------------------------------------

    def _on_event(self, event: SessionEvent) -> None:
        self.view.apply(event)
        self._bump()
        if self._listener is None:
            return
        message = self._message(event)
        if message is not None:
            self._listener(message)

    def _message(self, event: SessionEvent) -> dict[str, Any] | None:
        """What the live socket says of an event (the player and the microphone act on these)."""
        if isinstance(event, SpeechStarted):
            return {"type": "speech_started", "item_id": event.item_id, "audio_start_ms": event.audio_start_ms,
                    "speech_start_ms": event.speech_start_ms}  # fmt: skip
        if isinstance(event, SpeechStopped):
            return {"type": "speech_stopped", "item_id": event.item_id, "audio_end_ms": event.audio_end_ms}
        if isinstance(event, (ResponseCreated, ResponseDone)):
            answer = self.view.answer_for(event.response)
            if answer is None:
                return None
            if isinstance(event, ResponseCreated):
                return {"type": "answer", "turn": answer.turn, "stream": stream_url(answer.stream)}
            return {"type": "answer_done", "turn": answer.turn, "status": event.response.status.value}
        return None
