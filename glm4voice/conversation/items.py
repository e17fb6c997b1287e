"""What a conversation holds: user and assistant items (as token ids), the responses that produce the
assistant items, and the error a refused operation raises (plain data, owned by
:class:`glm4voice.conversation.session.ConversationSession`)."""

from __future__ import annotations

import asyncio
import enum
import secrets
from dataclasses import dataclass, field

from glm4voice.audio import Audio
from glm4voice.pipeline import FailureKind, GenerationOptions, TurnProgress
from glm4voice.protocol import UserInput


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class SessionError(Exception):
    """A refused operation or a failed answer, with a message for the client. ``code`` is a short
    machine-readable reason (for turn failures the :class:`glm4voice.pipeline.FailureKind` value)."""

    def __init__(self, code: str, message: str, param: str | None = None, kind: FailureKind | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.kind = kind


# --- items ---------------------------------------------------------------------------------------------


class ItemStatus(str, enum.Enum):
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    IN_PROGRESS = "in_progress"


@dataclass(eq=False)
class UserItem:
    id: str
    text: str | None = None
    """Typed input."""
    audio: Audio | None = None
    """Spoken input (16 kHz), kept until it is tokenized."""
    input: UserInput | None = None
    """The tokenized input (None while the speech tokenizer works, or if it failed)."""
    ready: asyncio.Task[None] | None = field(default=None, repr=False)
    """The speech tokenizer's job for this item."""
    status: ItemStatus = ItemStatus.COMPLETED

    @property
    def audio_ms(self) -> int:
        return 0 if self.audio is None else len(self.audio.samples) * 1000 // self.audio.sample_rate


@dataclass(eq=False)
class AssistantItem:
    id: str
    sample_rate: int
    """Rate of the emitted audio (what ``audio_samples`` counts)."""
    response_id: str | None = None
    generated_ids: tuple[int, ...] = ()
    """Every id the model generated for this answer (stop token excluded)."""
    reply_ids: tuple[int, ...] = ()
    """What the history keeps: all of it, or the heard part of a cut answer."""
    text: str = ""
    """The transcript: the text streamed so far, then the text of ``reply_ids``."""
    audio_samples: int = 0
    """Samples of this answer's audio emitted to the front end (after a truncation: up to the cut)."""
    has_audio: bool = True
    truncated_ms: int | None = None
    status: ItemStatus = ItemStatus.COMPLETED

    @property
    def audio_ms(self) -> int:
        """The audio's duration; after a truncation, the cut as given (its whole samples, counted back, can
        come to a millisecond less)."""
        if self.truncated_ms is not None:
            return self.truncated_ms
        return self.audio_samples * 1000 // self.sample_rate


Item = UserItem | AssistantItem


# --- responses -----------------------------------------------------------------------------------------


class ResponseStatus(str, enum.Enum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INCOMPLETE = "incomplete"  # stopped at the token limit


class CancelReason(str, enum.Enum):
    TURN_DETECTED = "turn_detected"  # barge-in: the user started speaking
    CLIENT_CANCELLED = "client_cancelled"


@dataclass(eq=False)
class Response:
    id: str
    item: AssistantItem
    output_audio: bool
    options: GenerationOptions
    status: ResponseStatus = ResponseStatus.IN_PROGRESS
    cancel_reason: CancelReason | None = None
    error: SessionError | None = None
    prompt_tokens: int = 0
    prompt_audio_tokens: int = 0
    output_tokens: int = 0
    output_audio_tokens: int = 0
    progress: TurnProgress = field(default_factory=TurnProgress, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.status is not ResponseStatus.IN_PROGRESS
