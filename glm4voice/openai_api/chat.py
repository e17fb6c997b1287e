"""``GET /v1/models`` and ``POST /v1/chat/completions`` (JSON or server-sent events).

A request is one answer to the conversation its messages hold: the messages become the items of a
fresh :class:`glm4voice.conversation.ConversationSession` (spoken parts through the speech tokenizer,
earlier answers cited by audio id as their exact token ids), and the session's answer is streamed or
collected. The session resamples the speech to 24 kHz as it is decoded, so each ``delta.audio`` chunk
leaves as soon as its decoder block is ready (the page's latency), and the chunks of a stream join into
exactly the audio of the same answer collected whole.

Errors before the answer starts are HTTP errors in OpenAI's envelope (the request is refused: 400,
404, 413; the token server is busy or down: 503 with ``Retry-After``); an error after it started ends
the stream with a ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, Literal, TypeVar

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.responses import Response as HTTPResponse
from pydantic import ValidationError
from starlette.types import Send

from glm4voice.audio import to_pcm16
from glm4voice.conversation import (
    ConversationSession,
    Response,
    ResponseAudioDelta,
    ResponseDone,
    ResponseStatus,
    ResponseTextDelta,
    SessionConfig,
    SessionError,
    SessionEvent,
    new_id,
)
from glm4voice.openai_api.audio import API_SAMPLE_RATE, decode_base64, encode_answer, pcm16_base64
from glm4voice.openai_api.chat_schema import (
    AssistantMessage,
    AudioPart,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    DeltaAudio,
    Message,
    MessageAudio,
    Model,
    ModelList,
    Part,
    PromptTokensDetails,
    TextPart,
    Usage,
    UserMessage,
    parse_messages,
)
from glm4voice.openai_api.errors import NOT_FOUND, SERVER_ERROR, APIError, from_failure, from_validation, invalid
from glm4voice.openai_api.service import API_PREFIX, OpenAIService
from glm4voice.pipeline import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    FailureKind,
    GenerationOptions,
    TurnError,
    UserRequest,
    UserSpeech,
    UserText,
)
from glm4voice.protocol import AudioInput, TextInput

logger = logging.getLogger(__name__)
T = TypeVar("T")

MODELS_PATH = f"{API_PREFIX}/models"
CHAT_PATH = f"{API_PREFIX}/chat/completions"
FinishReason = Literal["stop", "length"]
"""Why a completion ended (``choices[].finish_reason``)."""
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def add_chat_routes(app: FastAPI, service: OpenAIService) -> None:
    @app.get(MODELS_PATH)
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[_model(service)]).dump())

    @app.get(MODELS_PATH + "/{model_id}")
    async def get_model(model_id: str) -> JSONResponse:
        if model_id != service.settings.model_id:
            return error_response(_unknown_model(service, model_id))
        return JSONResponse(_model(service).dump())

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request) -> HTTPResponse:
        try:
            completion = await _start(service, await _read_json(request, service.settings.max_request_bytes))
        except APIError as error:
            return error_response(error)
        if completion.request.stream:
            return _ClosingStream(completion.events(), media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            body = await _unless_the_client_leaves(request, completion.collect())
        except APIError as error:
            return error_response(error)
        return JSONResponse(body) if body is not None else HTTPResponse(status_code=499)  # nobody reads it


async def _unless_the_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if the client disconnected first (``work`` is then cancelled, which
    closes the answer's token stream: the token server frees the slot)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    return None if task.cancelled() else task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _model(service: OpenAIService) -> Model:
    return Model(id=service.settings.model_id, created=service.created, owned_by="zai-org")


def _unknown_model(service: OpenAIService, model: str) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist: this server serves {service.settings.model_id!r}.",
        type=NOT_FOUND,
        param="model",
        code="model_not_found",
    )


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise invalid(f"The body is not valid JSON: {error}.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise invalid("The body must be a JSON object.", code="invalid_json")
    return payload


def generation_options(request: ChatCompletionRequest) -> GenerationOptions:
    """The turn's settings: the request's sampling, else the API's defaults; a streamed answer is paced
    for a listener (``GenerationOptions.paced``), a whole one comes as fast as it can."""
    return GenerationOptions(
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        max_new_tokens=request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        seed=request.seed,
        paced=bool(request.stream),
    )


async def _start(service: OpenAIService, payload: dict[str, Any]) -> _Completion:
    try:
        request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as error:
        raise from_validation(error) from None
    if request.model != service.settings.model_id:
        raise _unknown_model(service, request.model)
    request.check()
    messages = parse_messages(request.messages)
    options = generation_options(request)
    config = SessionConfig(
        output_audio=request.wants_audio, output_sample_rate=API_SAMPLE_RATE, turn_detection=None, options=options
    )
    events: asyncio.Queue[SessionEvent] = asyncio.Queue()
    session = ConversationSession(service.chat, config, emit=events.put_nowait)
    completion = _Completion(service, request, session, events)
    try:
        await _add_messages(service, session, messages)
        try:
            completion.response = session.create_response()
        except SessionError as error:
            raise invalid(error.message, "messages", error.code) from None
        await completion.first_output()
    except BaseException:
        await session.close()
        raise
    return completion


async def _add_messages(
    service: OpenAIService, session: ConversationSession, messages: list[tuple[Message, list[Part]]]
) -> None:
    for i, (message, parts) in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(message, UserMessage):
            texts = [p.text for p in parts if isinstance(p, TextPart)]
            audio = [(k, p) for k, p in enumerate(parts) if isinstance(p, AudioPart)]
            if audio and (texts or len(audio) > 1):
                raise invalid(
                    "GLM-4-Voice takes one input per user turn: one input_audio part, or text (put other parts in "
                    "messages of their own).",
                    f"{where}.content",
                )
            if audio:
                k, part = audio[0]
                param = f"{where}.content[{k}].input_audio.data"
                try:
                    data = decode_base64(part.input_audio.data)
                except ValueError as error:
                    raise invalid(f"The audio data is {error}.", param, "invalid_base64") from None
                user_input = await _prepare(service, UserSpeech(data), param)
                session.add_user_input(user_input)
            else:
                text_input = await _prepare(service, UserText("\n".join(texts)), f"{where}.content")
                session.add_user_input(text_input, text=text_input.text if isinstance(text_input, TextInput) else None)
        elif isinstance(message, AssistantMessage):
            if message.audio is not None:
                stored = service.store.get(message.audio.id)
                if stored is None:
                    raise invalid(
                        f"No answer with audio id {message.audio.id!r}: it does not exist or it has expired.",
                        f"{where}.audio.id",
                        "audio_not_found",
                    )
                session.add_assistant_reply(tuple(stored.reply_ids.tolist()), stored.transcript, has_audio=True)
            else:
                # parse_messages gives an assistant message text and refusal parts only
                text = "".join(
                    p.text if isinstance(p, TextPart) else p.refusal for p in parts if not isinstance(p, AudioPart)
                )
                session.add_assistant_text(text or (message.refusal or ""))
        # system and developer messages are not part of GLM-4-Voice's prompt (see docs/API.md)


async def _prepare(service: OpenAIService, request: UserRequest, param: str) -> TextInput | AudioInput:
    try:
        return await service.chat.prepare_input(request)
    except TurnError as error:
        raise from_failure(
            error.kind, error.message, param=param, retry_after_s=service.settings.retry_after_s
        ) from None


class _Completion:
    """One request's answer: its session, the events waiting to be sent, the audio id."""

    def __init__(
        self,
        service: OpenAIService,
        request: ChatCompletionRequest,
        session: ConversationSession,
        events: asyncio.Queue[SessionEvent],
    ):
        self.service = service
        self.request = request
        self.session = session
        self.queue: asyncio.Queue[SessionEvent] = events
        self.response: Response | None = None
        self.id = "chatcmpl-" + new_id("x")[2:]
        self.audio_id = new_id("audio") if request.wants_audio else None
        self.expires_at = service.store.expiry()
        self.created = int(time.time())
        self._first: list[SessionEvent] = []

    async def first_output(self) -> None:
        """Wait for the answer's first text, audio or end; a failure before any output is an HTTP error."""
        while True:
            event = await self.queue.get()
            self._first.append(event)
            if isinstance(event, (ResponseTextDelta, ResponseAudioDelta)):
                return
            if isinstance(event, ResponseDone):
                if event.response.status is ResponseStatus.FAILED:
                    raise self._error(event.response)
                return

    async def _events(self) -> AsyncIterator[SessionEvent]:
        for event in self._first:
            yield event
        if any(isinstance(e, ResponseDone) for e in self._first):
            return
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, ResponseDone):
                return

    def _error(self, response: Response) -> APIError:
        error = response.error
        kind = error.kind if error is not None and error.kind is not None else FailureKind.INTERNAL
        message = error.message if error is not None else "the answer failed"
        return from_failure(kind, message, retry_after_s=self.service.settings.retry_after_s)

    def _finish(self, response: Response) -> FinishReason:
        """Store the answer (for multi-turn by audio id); the finish reason."""
        if self.audio_id is not None:
            item = response.item
            self.service.store.put(self.audio_id, item.reply_ids, item.text, self.expires_at)
        return "length" if response.status is ResponseStatus.INCOMPLETE else "stop"

    def _usage(self, response: Response) -> Usage:
        return Usage(
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.output_tokens,
            total_tokens=response.prompt_tokens + response.output_tokens,
            prompt_tokens_details=PromptTokensDetails(audio_tokens=response.prompt_audio_tokens),
            completion_tokens_details=CompletionTokensDetails(
                audio_tokens=response.output_audio_tokens,
                text_tokens=response.output_tokens - response.output_audio_tokens,
            ),
        )

    # --- whole answer ---------------------------------------------------------------------------------

    async def collect(self) -> dict[str, Any]:
        text, chunks, done = [], [], None
        try:
            async for event in self._events():
                if isinstance(event, ResponseTextDelta):
                    text.append(event.text)
                elif isinstance(event, ResponseAudioDelta):
                    chunks.append(to_pcm16(event.samples))
                elif isinstance(event, ResponseDone):
                    done = event.response
        finally:
            await self.session.close()
        if done is None:  # never: _events ends with the response.done event
            raise APIError(500, "Internal error: the answer ended without its response.", type=SERVER_ERROR)
        if done.status is ResponseStatus.FAILED:
            raise self._error(done)
        finish_reason = self._finish(done)
        transcript = "".join(text)
        audio = None
        if self.audio_id is not None:
            pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
            data = encode_answer(pcm, API_SAMPLE_RATE, self.request.audio_format)
            audio = MessageAudio(
                id=self.audio_id, data=base64.b64encode(data).decode("ascii"), expires_at=self.expires_at,
                transcript=transcript,
            )  # fmt: skip
        message = ChatMessage(content=transcript, audio=audio)
        completion = ChatCompletion(
            id=self.id, created=self.created, model=self.request.model,
            choices=[Choice(message=message, finish_reason=finish_reason)], usage=self._usage(done),
        )  # fmt: skip
        return completion.dump()

    # --- server-sent events -----------------------------------------------------------------------------

    def _chunk(self, delta: Delta, finish_reason: FinishReason | None = None, usage: Usage | None = None) -> str:
        choices = [] if usage is not None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.request.model, choices=choices, usage=usage
        )
        return f"data: {json.dumps(chunk.dump(), ensure_ascii=False)}\n\n"

    async def events(self) -> AsyncGenerator[str, None]:
        audio_id = self.audio_id
        try:
            yield self._chunk(Delta(role="assistant", content=""))
            async for event in self._events():
                if isinstance(event, ResponseTextDelta):
                    audio = DeltaAudio(id=audio_id, transcript=event.text) if audio_id else None
                    yield self._chunk(Delta(content=event.text, audio=audio))
                elif isinstance(event, ResponseAudioDelta):
                    yield self._chunk(Delta(audio=DeltaAudio(id=audio_id, data=pcm16_base64(event.samples))))
                elif isinstance(event, ResponseDone):
                    response = event.response
                    if response.status is ResponseStatus.FAILED:
                        yield f"data: {json.dumps(self._error(response).body(), ensure_ascii=False)}\n\n"
                        return
                    finish_reason = self._finish(response)
                    if audio_id:
                        yield self._chunk(Delta(audio=DeltaAudio(id=audio_id, expires_at=self.expires_at)))
                    yield self._chunk(Delta(), finish_reason)
                    if self.request.stream_options is not None and self.request.stream_options.include_usage:
                        yield self._chunk(Delta(), usage=self._usage(response))
            yield "data: [DONE]\n\n"
        finally:
            with anyio.CancelScope(shield=True):  # the client may have gone: still close the token stream
                await self.session.close()


class _ClosingStream(StreamingResponse):
    """Closes its event generator whatever ends the response (a client that leaves included), so the
    session is closed at once rather than when the generator is garbage collected."""

    def __init__(self, events: AsyncGenerator[str, None], **kwargs: Any):
        super().__init__(events, **kwargs)
        self._events = events

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


__all__ = ["CHAT_PATH", "MODELS_PATH", "add_chat_routes", "error_response"]
