"""Shapes of ``/v1/models`` and ``/v1/chat/completions`` (requests validated strictly, answers built with
exactly the fields OpenAI's clients know).

Parameters OpenAI defines that this server cannot honour are refused with a 400 naming them, unless
they are given at their neutral value (``n: 1``, ``stop: null``, ``frequency_penalty: 0``, no tools...);
bookkeeping parameters (``user``, ``metadata``, ``store``, ``service_tier``...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_serializer,
    model_validator,
)

from glm4voice.defaults import MAX_SEED
from glm4voice.openai_api.audio import INPUT_FORMATS, OUTPUT_FORMATS, PCM16
from glm4voice.openai_api.errors import from_validation, invalid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- request --------------------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InputAudio(_Strict):
    data: str
    """Base64 of the encoded file."""
    format: Literal[INPUT_FORMATS]  # type: ignore[valid-type]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: Any
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: Any
    """A string, or a list of text and input_audio parts (see :func:`parse_messages`)."""
    name: str | None = None


class AudioReference(_Strict):
    id: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Any = None
    audio: AudioReference | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> AssistantMessage:
        if self.tool_calls:
            raise ValueError("tool calls are not supported")
        if self.audio is None and self.content is None:
            raise ValueError("an assistant message needs content or audio")
        return self


Message = Union[SystemMessage, UserMessage, AssistantMessage]  # noqa: UP007 (runtime alias for pydantic)
Part = Union[TextPart, AudioPart, RefusalPart]  # noqa: UP007 (runtime alias for pydantic)
ROLES: dict[str, type[Message]] = {
    "system": SystemMessage,
    "developer": SystemMessage,
    "user": UserMessage,
    "assistant": AssistantMessage,
}
PARTS: dict[str, dict[str, type[Part]]] = {
    "system": {"text": TextPart},
    "developer": {"text": TextPart},
    "user": {"text": TextPart, "input_audio": AudioPart},
    "assistant": {"text": TextPart, "refusal": RefusalPart},
}


def parse_messages(raw: list[Any]) -> list[tuple[Message, list[Part]]]:
    """Each message with its content as parts (a string is one text part); APIError naming the first
    bad parameter (``messages[1].content[0].input_audio.format``)."""
    parsed = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(
                f"{where}.role must be one of {', '.join(ROLES)} (got {role!r}); tool messages are not supported",
                f"{where}.role",
            )
        try:
            model = ROLES[role].model_validate(message)
        except ValidationError as error:
            raise from_validation(error, ("messages", i)) from None
        parsed.append((model, _parts(model.content, PARTS[role], f"{where}.content")))
    return parsed


def _parts(content: Any, allowed: dict[str, type[Part]], where: str) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(type="text", text=content)]
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", where)
    parts: list[Part] = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise invalid(
                f"{where}[{k}].type must be one of {', '.join(allowed)} here (got {kind!r})", f"{where}[{k}].type"
            )
        try:
            parts.append(allowed[kind].model_validate(part))
        except ValidationError as error:
            raise from_validation(error, tuple(_split(f"{where}[{k}]"))) from None
    return parts


def _split(path: str) -> list[Any]:
    """``messages[1].content[0]`` -> ['messages', 1, 'content', 0]."""
    out: list[Any] = []
    for piece in path.replace("]", "").split("."):
        name, *indices = piece.split("[")
        out += [name, *map(int, indices)]
    return out


class AudioOutput(_Strict):
    voice: str | dict[str, Any] = "default"
    """Accepted and ignored: GLM-4-Voice speaks with one voice."""
    format: Literal[OUTPUT_FORMATS] = "wav"  # type: ignore[valid-type]


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None


_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "stop": (None, [], ""),
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "audio_speed": (None,),
}
"""OpenAI parameters this server does not implement, and the values that ask for nothing."""


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Any] = Field(min_length=1)
    """Checked by :func:`parse_messages` (for parameter names a client can act on)."""
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # accepted and ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # not implemented: only their neutral values (checked below)
    n: Any = None
    stop: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    audio_speed: Any = None

    def check(self) -> None:
        """What pydantic's field checks do not cover: APIError naming the parameter."""
        for name, neutral in _NEUTRAL.items():
            if getattr(self, name) not in neutral:
                raise invalid(f"{name} is not supported by this server: leave it out.", name, "unsupported_parameter")
        if "text" not in (self.modalities or ["text"]):
            raise invalid(
                "modalities must be ['text'] or ['text', 'audio'] (speech always comes with its text).", "modalities"
            )
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed with stream: true.", "stream_options")
        if self.stream and self.wants_audio and self.audio_format != PCM16:
            raise invalid("Streamed audio is pcm16 (24 kHz): set audio.format to 'pcm16'.", "audio.format")

    @property
    def wants_audio(self) -> bool:
        return "audio" in (self.modalities or ())

    @property
    def audio_format(self) -> str:
        if self.audio is not None and "format" in self.audio.model_fields_set:
            return self.audio.format
        return "pcm16" if self.stream else "wav"

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- answers ---------------------------------------------------------------------------------------------


class OutModel(BaseModel):
    """A shape the server sends: fields that are None are left out, except those OpenAI always sends
    (``KEEP_NULL``, e.g. a chunk's ``finish_reason``)."""

    KEEP_NULL: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_nulls(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k in self.KEEP_NULL}

    def dump(self) -> dict[str, Any]:
        return self.model_dump()


_Out = OutModel


class Model(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[Model]


class MessageAudio(_Out):
    id: str
    data: str
    expires_at: int
    transcript: str


class ChatMessage(_Out):
    KEEP_NULL = ("content", "refusal")
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    audio: MessageAudio | None = None


class Choice(_Out):
    KEEP_NULL = ("logprobs",)
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class PromptTokensDetails(_Out):
    audio_tokens: int
    cached_tokens: int = 0


class CompletionTokensDetails(_Out):
    audio_tokens: int
    text_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaAudio(_Out):
    id: str | None = None
    data: str | None = None
    transcript: str | None = None
    expires_at: int | None = None


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    audio: DeltaAudio | None = None


class ChunkChoice(_Out):
    KEEP_NULL = ("finish_reason", "logprobs")
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
