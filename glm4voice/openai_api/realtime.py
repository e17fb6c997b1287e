"""``GET /v1/realtime`` (WebSocket): a live conversation in OpenAI's Realtime protocol.

One connection is one :class:`glm4voice.conversation.ConversationSession`. Client events are handled one
at a time, in order (an append waits for its VAD frames, so speech boundaries and barge-in follow the
audio exactly); server events leave through one queue and one writer task, in the order the session
reports them, so no audio delta of an answer can follow its ``response.done``.

Audio in: ``input_audio_buffer.append`` with base64 pcm16 at 24 kHz, resampled as a stream to 16 kHz
(the VAD's and the speech tokenizer's rate). Audio out: base64 pcm16 at 24 kHz. Positions in events
(``audio_start_ms``, ``audio_end_ms``) are milliseconds of the audio the client sent.

Clients that send the ``OpenAI-Beta: realtime=v1`` header (or offer the ``openai-beta.realtime-v1``
WebSocket subprotocol, for browsers) get the beta event names and shapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI, WebSocket

from glm4voice.audio import INPUT_SAMPLE_RATE, Audio, load_audio
from glm4voice.conversation import (
    AssistantItem,
    CancelReason,
    ConversationSession,
    InputCleared,
    InputCommitted,
    ItemAdded,
    ItemDeleted,
    ItemStatus,
    ItemTruncated,
    Response,
    ResponseAudioDelta,
    ResponseCreated,
    ResponseDone,
    ResponseTextDelta,
    SessionError,
    SessionEvent,
    SessionFailure,
    SpeechStarted,
    SpeechStopped,
    StreamResampler,
    new_id,
)
from glm4voice.openai_api.audio import API_SAMPLE_RATE, decode_base64, pcm16_base64, pcm16_to_float
from glm4voice.openai_api.errors import INVALID_REQUEST, SERVER_ERROR, APIError, invalid
from glm4voice.openai_api.realtime_schema import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    ClientEvent,
    EventShapes,
    ItemCreate,
    ItemDelete,
    ItemTruncate,
    RealtimeSettings,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
    apply_session,
    parse_client_event,
    response_overrides,
)
from glm4voice.openai_api.service import API_PREFIX, OpenAIService

logger = logging.getLogger(__name__)

REALTIME_PATH = f"{API_PREFIX}/realtime"
SUBPROTOCOL = "realtime"
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
BETA_HEADER = "realtime=v1"
POLICY_VIOLATION = 1008
MAX_DELTA_SAMPLES = API_SAMPLE_RATE // 2
"""Audio deltas carry at most 0.5 s (a decoder block can hold seconds; WebSocket clients often limit
message sizes)."""


def add_realtime_route(app: FastAPI, service: OpenAIService) -> None:
    @app.websocket(REALTIME_PATH)
    async def realtime(websocket: WebSocket) -> None:
        await RealtimeConnection(service, websocket).run()


class RealtimeConnection:
    def __init__(self, service: OpenAIService, websocket: WebSocket):
        self.service = service
        self.websocket = websocket
        offered = list(websocket.scope.get("subprotocols") or [])
        self.beta = BETA_HEADER in websocket.headers.get("openai-beta", "") or BETA_SUBPROTOCOL in offered
        self.subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
        self.shapes = EventShapes(service.settings.model_id, self.beta, new_id("conv"))
        self.settings = RealtimeSettings()
        self.session: ConversationSession | None = None
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._input = StreamResampler(API_SAMPLE_RATE, INPUT_SAMPLE_RATE)

    # --- connection -------------------------------------------------------------------------------------

    async def run(self) -> None:
        model = self.websocket.query_params.get("model")
        await self.websocket.accept(subprotocol=self.subprotocol)
        writer = asyncio.create_task(self._write())
        self.service.sessions += 1
        try:
            if model is not None and model != self.service.settings.model_id:
                self._error(
                    APIError(
                        404, f"The model {model!r} does not exist: this server serves {self.service.settings.model_id!r}.",
                        param="model", code="model_not_found",
                    )
                )  # fmt: skip
                await self._drain(writer)
                await self.websocket.close(POLICY_VIOLATION)
                return
            vad = await self.service.vad()
            self.session = session = ConversationSession(
                self.service.chat, self.settings.session_config(), emit=self._on_session_event, vad=vad
            )
            self._send("session.created", session=self.shapes.session(self.settings))
            await self._receive(session)
        finally:
            self.service.sessions -= 1
            if self.session is not None:
                await self.session.close()  # a client that left: its answer's token stream is closed now
            await self._drain(writer)

    async def _drain(self, writer: asyncio.Task[None]) -> None:
        self._outbox.put_nowait(None)
        await asyncio.wait([writer])

    async def _write(self) -> None:
        while (text := await self._outbox.get()) is not None:
            try:
                await self.websocket.send_text(text)
            except Exception:  # the client has gone: nothing more can be sent
                logger.debug("realtime client gone while sending", exc_info=True)
                return

    async def _receive(self, session: ConversationSession) -> None:
        limit = self.service.settings.max_event_bytes
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is None:
                self._error(invalid(
                    "Binary frames are not supported: send JSON text events (audio goes base64-encoded in "
                    "input_audio_buffer.append).", code="binary_frame_not_supported",
                ))  # fmt: skip
                continue
            text = message["text"]
            if len(text) > limit:
                self._error(invalid(f"The event has {len(text)} bytes; the limit is {limit}.", code="event_too_large"))
                continue
            try:
                data = json.loads(text)
            except (ValueError, RecursionError) as error:
                self._error(invalid(f"The event is not valid JSON: {error}.", code="invalid_json"))
                continue
            event_id = data.get("event_id") if isinstance(data, dict) else None
            try:
                await self._handle(parse_client_event(data), session)
            except APIError as error:
                self._error(error, event_id if isinstance(event_id, str) else None)
            except SessionError as error:
                self._error(
                    invalid(error.message, error.param, error.code), event_id if isinstance(event_id, str) else None
                )
            except Exception as error:  # a bug: the client hears of it, the connection goes on
                logger.exception("realtime event %r failed", data.get("type") if isinstance(data, dict) else data)
                self._error(APIError(500, f"Internal error: {error}", type=SERVER_ERROR, code="internal_error"))

    # --- client events ----------------------------------------------------------------------------------

    async def _handle(self, event: ClientEvent, session: ConversationSession) -> None:
        if isinstance(event, AudioAppend):
            try:
                samples = pcm16_to_float(decode_base64(event.audio))
            except ValueError as error:
                raise invalid(f"The audio is {error}.", "audio", "invalid_audio") from None
            await session.append_audio(self._input.feed(samples))
        elif isinstance(event, AudioCommit):
            await session.append_audio(self._input.flush())  # what the resampler still holds
            self._input = StreamResampler(API_SAMPLE_RATE, INPUT_SAMPLE_RATE)
            session.commit()
        elif isinstance(event, AudioClear):
            self._input = StreamResampler(API_SAMPLE_RATE, INPUT_SAMPLE_RATE)
            session.clear_input()
        elif isinstance(event, SessionUpdate):
            self.settings = apply_session(self.settings, event.session)
            session.update(self.settings.session_config())
            self._send("session.updated", session=self.shapes.session(self.settings))
        elif isinstance(event, ItemCreate):
            await self._create_item(event, session)
        elif isinstance(event, ItemTruncate):
            if event.content_index != 0:
                raise invalid("An answer has one content part: content_index must be 0.", "content_index")
            await session.truncate(event.item_id, event.audio_end_ms)
        elif isinstance(event, ItemDelete):
            await session.delete_item(event.item_id)
        elif isinstance(event, ResponseCreate):
            output_audio, options = response_overrides(self.settings, event.response)
            session.create_response(output_audio=output_audio, options=options)
        elif isinstance(event, ResponseCancel):
            active = session.response
            if active is None or (event.response_id is not None and event.response_id != active.id):
                raise invalid(
                    "There is no response in progress to cancel.", "response_id", "response_cancel_not_active"
                )
            await session.cancel_response(CancelReason.CLIENT_CANCELLED)

    async def _create_item(self, event: ItemCreate, session: ConversationSession) -> None:
        item = event.item
        previous = event.previous_item_id
        if item.role == "system":
            raise invalid(
                "System items are not supported: GLM-4-Voice answers with its own fixed system prompt.",
                "item.role", "unsupported_value",
            )  # fmt: skip
        if len(item.content) != 1:
            raise invalid("An item holds one content part (text or audio) here.", "item.content")
        (part,) = item.content
        if item.role == "user":
            if part.type == "input_text" and part.text is not None:
                await session.add_user_text(part.text, previous, item_id=item.id)
            elif part.type == "input_audio" and part.audio is not None:
                try:
                    samples = pcm16_to_float(decode_base64(part.audio))
                    audio = load_audio((samples, API_SAMPLE_RATE), INPUT_SAMPLE_RATE, max_seconds=None)
                except ValueError as error:
                    raise invalid(f"The audio is {error}.", "item.content[0].audio", "invalid_audio") from None
                session.add_user_audio(Audio(audio.samples, INPUT_SAMPLE_RATE), previous, item.id)
            else:
                raise invalid("A user item holds input_text (text) or input_audio (audio).", "item.content[0]")
        else:
            text = part.text if part.text is not None else part.transcript
            if part.type not in ("output_text", "text", "output_audio", "audio") or text is None:
                raise invalid(
                    "An assistant item holds output_text (text) or output_audio (transcript).", "item.content[0]"
                )
            session.add_assistant_text(text, previous, item_id=item.id)

    # --- server events ----------------------------------------------------------------------------------

    def _send(self, ga_name: str, **fields: Any) -> None:
        name = self.shapes.name(ga_name)
        if name is not None:
            event = {"type": name, "event_id": new_id("event"), **fields}
            self._outbox.put_nowait(json.dumps(event, ensure_ascii=False))

    def _error(self, error: APIError, event_id: str | None = None) -> None:
        type_ = error.type if error.type in (INVALID_REQUEST, SERVER_ERROR) else INVALID_REQUEST
        detail = self.shapes.error(error.message, type=type_, code=error.code, param=error.param, event_id=event_id)
        self._send("error", error=detail)

    def _on_session_event(self, event: SessionEvent) -> None:
        shapes = self.shapes
        if isinstance(event, SpeechStarted):
            self._send("input_audio_buffer.speech_started", audio_start_ms=event.audio_start_ms, item_id=event.item_id)
        elif isinstance(event, SpeechStopped):
            self._send("input_audio_buffer.speech_stopped", audio_end_ms=event.audio_end_ms, item_id=event.item_id)
        elif isinstance(event, InputCommitted):
            self._send("input_audio_buffer.committed", item_id=event.item.id, previous_item_id=event.previous_item_id)
        elif isinstance(event, InputCleared):
            self._send("input_audio_buffer.cleared")
        elif isinstance(event, ItemAdded):
            item = event.item
            if isinstance(item, AssistantItem) and item.status is ItemStatus.IN_PROGRESS:  # a response's output
                ids = dict(response_id=item.response_id, output_index=0)
                self._send("response.output_item.added", item=shapes.item(item), **ids)
                self._send("conversation.item.added", item=shapes.item(item), previous_item_id=event.previous_item_id)
                self._send("response.content_part.added", item_id=item.id, content_index=0,
                           part=shapes.part(item, final=False), **ids)  # fmt: skip
            else:
                self._send("conversation.item.added", item=shapes.item(item), previous_item_id=event.previous_item_id)
                self._send("conversation.item.done", item=shapes.item(item), previous_item_id=event.previous_item_id)
        elif isinstance(event, ItemDeleted):
            self._send("conversation.item.deleted", item_id=event.item_id)
        elif isinstance(event, ItemTruncated):
            self._send("conversation.item.truncated", item_id=event.item.id, content_index=0,
                       audio_end_ms=event.audio_end_ms)  # fmt: skip
        elif isinstance(event, ResponseCreated):
            self._send("response.created", response=shapes.response(event.response, self.settings))
        elif isinstance(event, ResponseTextDelta):
            response = event.response
            name = "response.output_audio_transcript.delta" if response.output_audio else "response.output_text.delta"
            self._send(name, delta=event.text, **_part_ids(response))
        elif isinstance(event, ResponseAudioDelta):
            ids = _part_ids(event.response)
            for start in range(0, len(event.samples), MAX_DELTA_SAMPLES):  # small messages for any client
                self._send(
                    "response.output_audio.delta",
                    delta=pcm16_base64(event.samples[start : start + MAX_DELTA_SAMPLES]),
                    **ids,
                )
        elif isinstance(event, ResponseDone):
            self._response_done(event)
        elif isinstance(event, SessionFailure):
            error = event.error
            self._error(invalid(error.message, error.param, error.code))

    def _response_done(self, event: ResponseDone) -> None:
        response, shapes = event.response, self.shapes
        item = response.item
        ids = _part_ids(response)
        if response.output_audio:
            self._send("response.output_audio.done", **ids)
            self._send("response.output_audio_transcript.done", transcript=item.text, **ids)
        else:
            self._send("response.output_text.done", text=item.text, **ids)
        self._send("response.content_part.done", part=shapes.part(item, final=True), **ids)
        self._send("response.output_item.done", item=shapes.item(item), response_id=response.id, output_index=0)
        self._send("conversation.item.done", item=shapes.item(item))
        self._send("response.done", response=shapes.response(response, self.settings))


def _part_ids(response: Response) -> dict[str, Any]:
    return dict(response_id=response.id, item_id=response.item.id, output_index=0, content_index=0)


__all__ = ["REALTIME_PATH", "RealtimeConnection", "add_realtime_route"]
