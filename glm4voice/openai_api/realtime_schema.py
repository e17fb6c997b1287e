"""Shapes of the ``/v1/realtime`` events: client events parsed strictly enough to explain mistakes, server
events built with exactly the fields OpenAI's SDKs know (GA names; the beta names and shapes for clients
that send ``OpenAI-Beta: realtime=v1``).

Settings this server cannot honour (other audio formats, semantic VAD, tools, out-of-band responses)
are refused with an ``error`` event; settings without meaning here (voice, instructions, transcription,
noise reduction, tracing) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

from glm4voice.conversation import SessionConfig, TurnDetection
from glm4voice.conversation.items import AssistantItem, Item, Response, ResponseStatus, UserItem
from glm4voice.openai_api.audio import API_SAMPLE_RATE
from glm4voice.openai_api.chat_schema import OutModel
from glm4voice.openai_api.errors import from_validation, invalid
from glm4voice.pipeline import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, GenerationOptions

PCM_FORMAT = {"type": "audio/pcm", "rate": API_SAMPLE_RATE}
DEFAULT_VOICE = "default"


# --- the connection's settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RealtimeSettings:
    output_audio: bool = True
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    voice: str = DEFAULT_VOICE
    instructions: str = ""
    max_output_tokens: int | Literal["inf"] = "inf"
    """``inf``: the pipeline's default (the page's 2000 tokens)."""
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P

    def options(
        self, max_output_tokens: int | str | None = None, temperature: float | None = None
    ) -> GenerationOptions:
        limit = self.max_output_tokens if max_output_tokens is None else max_output_tokens
        return GenerationOptions(
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS if limit == "inf" else int(limit),
        )

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            output_audio=self.output_audio,
            output_sample_rate=API_SAMPLE_RATE,
            turn_detection=self.turn_detection,
            options=self.options(),
        )


# --- client events -----------------------------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """An OpenAI object with fields this server ignores."""

    model_config = ConfigDict(extra="ignore")


class TurnDetectionIn(_Open):
    type: Literal["server_vad", "semantic_vad"]
    threshold: float | None = None
    prefix_padding_ms: StrictInt | None = None
    silence_duration_ms: StrictInt | None = None
    create_response: StrictBool | None = None
    interrupt_response: StrictBool | None = None


class FormatIn(_Open):
    type: str
    rate: StrictInt | None = None


class AudioInputIn(_Open):
    format: FormatIn | None = None
    turn_detection: TurnDetectionIn | None = None


class AudioOutputIn(_Open):
    format: FormatIn | None = None
    voice: Any = None
    speed: float | None = None


class AudioIn(_Open):
    input: AudioInputIn | None = None
    output: AudioOutputIn | None = None


class SessionIn(_Open):
    """GA ``session.update`` session (and beta fields, for beta clients)."""

    type: Literal["realtime"] | None = None
    output_modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioIn | None = None
    instructions: str | None = None
    max_output_tokens: StrictInt | Literal["inf"] | None = None
    temperature: float | None = None
    tools: list[Any] | None = None
    # beta
    modalities: list[Literal["text", "audio"]] | None = None
    input_audio_format: str | None = None
    output_audio_format: str | None = None
    turn_detection: TurnDetectionIn | None = None
    voice: Any = None
    max_response_output_tokens: StrictInt | Literal["inf"] | None = None


class ResponseIn(_Open):
    output_modalities: list[Literal["text", "audio"]] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    max_output_tokens: StrictInt | Literal["inf"] | None = None
    max_response_output_tokens: StrictInt | Literal["inf"] | None = None
    temperature: float | None = None
    conversation: str | None = None
    input: list[Any] | None = None
    tools: list[Any] | None = None
    instructions: str | None = None
    metadata: dict[str, str] | None = None


class ContentIn(_Open):
    type: Literal["input_text", "input_audio", "output_text", "output_audio", "text", "audio"]
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None


class ItemIn(_Open):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system"]
    content: list[ContentIn]


class SessionUpdate(_In):
    type: Literal["session.update"]
    event_id: str | None = None
    session: SessionIn


class AudioAppend(_In):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str


class AudioCommit(_In):
    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class AudioClear(_In):
    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


class ItemCreate(_In):
    type: Literal["conversation.item.create"]
    event_id: str | None = None
    previous_item_id: str | None = None
    item: ItemIn


class ItemTruncate(_In):
    type: Literal["conversation.item.truncate"]
    event_id: str | None = None
    item_id: str
    content_index: StrictInt = 0
    audio_end_ms: StrictInt


class ItemDelete(_In):
    type: Literal["conversation.item.delete"]
    event_id: str | None = None
    item_id: str


class ResponseCreate(_In):
    type: Literal["response.create"]
    event_id: str | None = None
    response: ResponseIn | None = None


class ResponseCancel(_In):
    type: Literal["response.cancel"]
    event_id: str | None = None
    response_id: str | None = None


ClientEvent = (
    SessionUpdate
    | AudioAppend
    | AudioCommit
    | AudioClear
    | ItemCreate
    | ItemTruncate
    | ItemDelete
    | ResponseCreate
    | ResponseCancel
)
CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    get_args(model.model_fields["type"].annotation)[0]: model for model in get_args(ClientEvent)
}
UNSUPPORTED_EVENTS = {
    "conversation.item.retrieve": "retrieving items is not supported",
    "output_audio_buffer.clear": "output_audio_buffer.clear is for WebRTC and SIP connections",
    "transcription_session.update": "transcription sessions are not supported",
}


def parse_client_event(data: Any) -> ClientEvent:
    """A client event, or an APIError (for an ``error`` event) that names what is wrong."""
    if not isinstance(data, dict):
        raise invalid("A client event must be a JSON object.", code="invalid_event")
    kind = data.get("type")
    if kind in UNSUPPORTED_EVENTS:
        raise invalid(f"Unsupported event {kind!r}: {UNSUPPORTED_EVENTS[kind]}.", "type", "unsupported_event")
    model = CLIENT_EVENTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise invalid(
            f"Unknown event type {kind!r}; supported: {', '.join(CLIENT_EVENTS)}.", "type", "invalid_event_type"
        )
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise from_validation(error) from None


def apply_session(settings: RealtimeSettings, session: SessionIn) -> RealtimeSettings:
    """The settings after a ``session.update`` (only the fields it gives change)."""
    given = session.model_fields_set
    changes: dict[str, Any] = {}
    if session.tools:
        raise invalid("Tools are not supported by GLM-4-Voice.", "session.tools", "unsupported_value")
    modalities = session.output_modalities if "output_modalities" in given else session.modalities
    if modalities is not None:
        if "audio" not in modalities and "text" not in modalities:
            raise invalid("output_modalities must be ['audio'] or ['text'].", "session.output_modalities")
        changes["output_audio"] = "audio" in modalities
    audio = session.audio
    formats = []
    if audio is not None and audio.input is not None:
        formats.append(("session.audio.input.format", audio.input.format))
        if "turn_detection" in audio.input.model_fields_set:
            changes["turn_detection"] = _turn_detection(
                settings.turn_detection, audio.input.turn_detection, "session.audio.input.turn_detection"
            )
    if audio is not None and audio.output is not None:
        formats.append(("session.audio.output.format", audio.output.format))
        if audio.output.voice is not None:
            changes["voice"] = str(audio.output.voice if isinstance(audio.output.voice, str) else DEFAULT_VOICE)
        if audio.output.speed not in (None, 1.0):
            raise invalid("Only speed 1.0 is supported.", "session.audio.output.speed", "unsupported_value")
    for name in ("input_audio_format", "output_audio_format"):
        value = getattr(session, name)
        if value not in (None, "pcm16"):
            raise invalid(
                f"Only pcm16 (24 kHz) audio is supported (got {value!r}).", f"session.{name}", "unsupported_value"
            )
    for where, fmt in formats:
        if fmt is not None and (fmt.type != "audio/pcm" or fmt.rate not in (None, API_SAMPLE_RATE)):
            raise invalid(
                f"Only audio/pcm at {API_SAMPLE_RATE} Hz is supported (got {fmt.type}"
                + (f" at {fmt.rate} Hz" if fmt.rate else "") + ").",
                where, "unsupported_value",
            )  # fmt: skip
    if "turn_detection" in given:
        changes["turn_detection"] = _turn_detection(
            settings.turn_detection, session.turn_detection, "session.turn_detection"
        )
    if session.voice is not None:
        changes["voice"] = str(session.voice)
    if session.instructions is not None:
        changes["instructions"] = session.instructions
    limit = session.max_output_tokens if "max_output_tokens" in given else session.max_response_output_tokens
    if limit is not None:
        changes["max_output_tokens"] = _token_limit(limit, "session.max_output_tokens")
    if session.temperature is not None:
        changes["temperature"] = _temperature(session.temperature, "session.temperature")
    return replace(settings, **changes)


def _turn_detection(current: TurnDetection | None, given: TurnDetectionIn | None, where: str) -> TurnDetection | None:
    if given is None:
        return None
    if given.type != "server_vad":
        raise invalid("Only server_vad turn detection is supported.", f"{where}.type", "unsupported_value")
    base = current or TurnDetection()
    values = {k: v for k, v in given.model_dump(exclude={"type"}).items() if v is not None}
    try:
        return replace(base, **values)
    except ValueError as error:
        raise invalid(f"Invalid turn detection: {error}.", where) from None


def _token_limit(limit: int | str, where: str) -> int | str:
    if limit != "inf" and not 1 <= int(limit) <= 4096:
        raise invalid(f"max_output_tokens must be between 1 and 4096, or 'inf' (got {limit}).", where)
    return limit


def _temperature(value: float, where: str) -> float:
    if not 0.0 <= value <= 2.0:
        raise invalid(f"temperature must be between 0 and 2 (got {value}).", where)
    return value


def response_overrides(settings: RealtimeSettings, response: ResponseIn | None) -> tuple[bool, GenerationOptions]:
    """Output audio and sampling of one ``response.create``."""
    if response is None:
        return settings.output_audio, settings.options()
    if response.conversation not in (None, "auto"):
        raise invalid(
            "Only responses in the default conversation are supported.", "response.conversation", "unsupported_value"
        )
    if response.input is not None:
        raise invalid("Responses to a custom input are not supported.", "response.input", "unsupported_value")
    if response.tools:
        raise invalid("Tools are not supported by GLM-4-Voice.", "response.tools", "unsupported_value")
    modalities = response.output_modalities or response.modalities
    audio = settings.output_audio if modalities is None else "audio" in modalities
    limit = (
        response.max_output_tokens if response.max_output_tokens is not None else response.max_response_output_tokens
    )
    if limit is not None:
        _token_limit(limit, "response.max_output_tokens")
    temperature = None if response.temperature is None else _temperature(response.temperature, "response.temperature")
    return audio, settings.options(limit, temperature)


# --- server events ------------------------------------------------------------------------------------------

BETA_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
"""GA event names -> the beta names (events the beta API did not have are not sent to beta clients)."""
GA_ONLY = {"conversation.item.done"}


class Format(OutModel):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = API_SAMPLE_RATE  # type: ignore[assignment]  # lead: make API_SAMPLE_RATE Final


class ServerVad(OutModel):
    type: Literal["server_vad"] = "server_vad"
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int
    create_response: bool
    interrupt_response: bool


class AudioInputConfig(OutModel):
    KEEP_NULL = ("turn_detection", "transcription")
    format: Format = Format()
    turn_detection: ServerVad | None = None
    transcription: None = None


class AudioOutputConfig(OutModel):
    format: Format = Format()
    voice: str
    speed: float = 1.0


class AudioConfig(OutModel):
    input: AudioInputConfig
    output: AudioOutputConfig


class Session(OutModel):
    type: Literal["realtime"] = "realtime"
    model: str
    output_modalities: list[str]
    audio: AudioConfig
    instructions: str
    max_output_tokens: int | Literal["inf"]


class BetaTurnDetection(OutModel):
    type: Literal["server_vad"] = "server_vad"
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int
    create_response: bool
    interrupt_response: bool


class BetaSession(OutModel):
    KEEP_NULL = ("turn_detection", "input_audio_transcription")
    modalities: list[str]
    input_audio_format: Literal["pcm16"] = "pcm16"
    output_audio_format: Literal["pcm16"] = "pcm16"
    turn_detection: BetaTurnDetection | None = None
    input_audio_transcription: None = None
    voice: str
    instructions: str
    temperature: float
    max_response_output_tokens: int | Literal["inf"]


class Content(OutModel):
    type: str
    text: str | None = None
    transcript: str | None = None


class ConversationItem(OutModel):
    id: str
    type: Literal["message"] = "message"
    object: Literal["realtime.item"] = "realtime.item"
    status: Literal["completed", "incomplete", "in_progress"]
    role: Literal["user", "assistant"]
    content: list[Content]


class InputTokenDetails(OutModel):
    audio_tokens: int
    text_tokens: int
    cached_tokens: int = 0


class OutputTokenDetails(OutModel):
    audio_tokens: int
    text_tokens: int


class ResponseUsage(OutModel):
    total_tokens: int
    input_tokens: int
    output_tokens: int
    input_token_details: InputTokenDetails
    output_token_details: OutputTokenDetails


class StatusError(OutModel):
    type: str
    code: str | None = None
    message: str | None = None


class StatusDetails(OutModel):
    type: Literal["completed", "cancelled", "incomplete", "failed"]
    reason: Literal["turn_detected", "client_cancelled", "max_output_tokens"] | None = None
    error: StatusError | None = None


class ResponseOutputAudio(OutModel):
    format: Format = Format()
    voice: str


class ResponseAudio(OutModel):
    output: ResponseOutputAudio


class ResponseObject(OutModel):
    KEEP_NULL = ("status_details", "usage")
    id: str
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]
    status_details: StatusDetails | None = None
    output: list[ConversationItem]
    conversation_id: str
    output_modalities: list[str]
    max_output_tokens: int | Literal["inf"]
    audio: ResponseAudio
    usage: ResponseUsage | None = None


class BetaResponseObject(OutModel):
    KEEP_NULL = ("status_details", "usage")
    id: str
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]
    status_details: StatusDetails | None = None
    output: list[ConversationItem]
    conversation_id: str
    modalities: list[str]
    max_output_tokens: int | Literal["inf"]
    output_audio_format: Literal["pcm16"] = "pcm16"
    voice: str
    temperature: float
    usage: ResponseUsage | None = None


class Part(OutModel):
    type: Literal["audio", "text"]
    text: str | None = None
    transcript: str | None = None


class ErrorDetail(OutModel):
    KEEP_NULL = ("code", "param", "event_id")
    type: str
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None


def _modalities(output_audio: bool) -> list[str]:
    return ["audio"] if output_audio else ["text"]


@dataclass
class EventShapes:
    """Builds the server events of one connection (GA or beta shapes)."""

    model_id: str
    beta: bool
    conversation_id: str

    def name(self, ga_name: str) -> str | None:
        """The event's name for this client (None: not sent to it)."""
        if not self.beta:
            return ga_name
        return None if ga_name in GA_ONLY else BETA_NAMES.get(ga_name, ga_name)

    def session(self, settings: RealtimeSettings) -> dict[str, Any]:
        vad = settings.turn_detection
        if self.beta:
            beta_detection = None if vad is None else BetaTurnDetection(**_vad_fields(vad))
            return BetaSession(
                modalities=["audio", "text"] if settings.output_audio else ["text"], turn_detection=beta_detection,
                voice=settings.voice, instructions=settings.instructions, temperature=settings.temperature,
                max_response_output_tokens=settings.max_output_tokens,
            ).dump()  # fmt: skip
        detection = None if vad is None else ServerVad(**_vad_fields(vad))
        audio = AudioConfig(
            input=AudioInputConfig(turn_detection=detection), output=AudioOutputConfig(voice=settings.voice)
        )
        return Session(
            model=self.model_id, output_modalities=_modalities(settings.output_audio), audio=audio,
            instructions=settings.instructions, max_output_tokens=settings.max_output_tokens,
        ).dump()  # fmt: skip

    def item(self, item: Item) -> dict[str, Any]:
        if isinstance(item, UserItem):
            if item.text is not None:
                content = [Content(type="input_text", text=item.text)]
            else:
                content = [Content(type="input_audio")]
            return ConversationItem(id=item.id, status=item.status.value, role="user", content=content).dump()
        assert isinstance(item, AssistantItem)
        content = []
        if item.status.value != "in_progress" or item.text:
            if item.has_audio:
                content = [Content(type="audio" if self.beta else "output_audio", transcript=item.text)]
            else:
                content = [Content(type="text" if self.beta else "output_text", text=item.text)]
        return ConversationItem(id=item.id, status=item.status.value, role="assistant", content=content).dump()

    def part(self, item: AssistantItem, final: bool) -> dict[str, Any]:
        if item.has_audio:
            return Part(type="audio", transcript=item.text if final else "").dump()
        return Part(type="text", text=item.text if final else "").dump()

    def response(self, response: Response, settings: RealtimeSettings) -> dict[str, Any]:
        status = response.status
        details = None
        if status is not ResponseStatus.IN_PROGRESS:
            reason = None
            if status is ResponseStatus.CANCELLED:
                reason = response.cancel_reason.value if response.cancel_reason else "client_cancelled"
            elif status is ResponseStatus.INCOMPLETE:
                reason = "max_output_tokens"
            error = None
            if status is ResponseStatus.FAILED and response.error is not None:
                error = StatusError(type="server_error", code=response.error.code, message=response.error.message)
            # the enums' values are the wire's names: pydantic checks them against the Literal fields
            details = StatusDetails.model_validate({"type": status.value, "reason": reason, "error": error})
        usage = None
        if status is not ResponseStatus.IN_PROGRESS:
            usage = ResponseUsage(
                total_tokens=response.prompt_tokens + response.output_tokens,
                input_tokens=response.prompt_tokens,
                output_tokens=response.output_tokens,
                input_token_details=InputTokenDetails(
                    audio_tokens=response.prompt_audio_tokens,
                    text_tokens=response.prompt_tokens - response.prompt_audio_tokens,
                ),
                output_token_details=OutputTokenDetails(
                    audio_tokens=response.output_audio_tokens,
                    text_tokens=response.output_tokens - response.output_audio_tokens,
                ),
            )
        output = [] if status is ResponseStatus.IN_PROGRESS else [self.item(response.item)]
        limit = response.options.max_new_tokens
        common: dict[str, Any] = dict(id=response.id, status=status.value, status_details=details, output=output,
                      conversation_id=self.conversation_id, max_output_tokens=limit, usage=usage)  # fmt: skip
        if self.beta:
            return BetaResponseObject(
                **common, modalities=["audio", "text"] if response.output_audio else ["text"], voice=settings.voice,
                temperature=response.options.temperature,
            ).dump()  # fmt: skip
        audio = ResponseAudio(output=ResponseOutputAudio(voice=settings.voice))
        return ResponseObject(**common, output_modalities=_modalities(response.output_audio), audio=audio).dump()

    @staticmethod
    def error(message: str, *, type: str, code: str | None, param: str | None, event_id: str | None) -> dict[str, Any]:
        return ErrorDetail(type=type, code=code, message=message, param=param, event_id=event_id).dump()


def _vad_fields(vad: TurnDetection) -> dict[str, Any]:
    return dict(
        threshold=vad.threshold, prefix_padding_ms=vad.prefix_padding_ms, silence_duration_ms=vad.silence_duration_ms,
        create_response=vad.create_response, interrupt_response=vad.interrupt_response,
    )  # fmt: skip
