"""What a :class:`glm4voice.conversation.session.ConversationSession` reports, in order, to its ``emit``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

from glm4voice.conversation.items import AssistantItem, Item, Response, SessionError, UserItem

# --- events --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SpeechStarted:
    item_id: str
    """The user item the speech will become."""
    audio_start_ms: int
    """Where that item's audio begins: the detected start of speech less ``prefix_padding_ms``."""
    speech_start_ms: int
    """Where the VAD heard the speech begin (the first speech frame)."""


@dataclass(frozen=True, eq=False)
class SpeechStopped:
    item_id: str
    audio_end_ms: int
    """Where the item's audio ends: the end of speech plus the ``silence_duration_ms`` that decided it."""


@dataclass(frozen=True, eq=False)
class InputCommitted:
    item: UserItem
    previous_item_id: str | None


@dataclass(frozen=True, eq=False)
class InputCleared:
    pass


@dataclass(frozen=True, eq=False)
class ItemAdded:
    item: Item
    previous_item_id: str | None


@dataclass(frozen=True, eq=False)
class ItemDeleted:
    item_id: str


@dataclass(frozen=True, eq=False)
class ItemTruncated:
    item: AssistantItem
    audio_end_ms: int


@dataclass(frozen=True, eq=False)
class ResponseCreated:
    response: Response


@dataclass(frozen=True, eq=False)
class ResponseTextDelta:
    response: Response
    text: str
    """The transcript of the speech (audio answers) or the answer (text answers)."""


@dataclass(frozen=True, eq=False)
class ResponseAudioDelta:
    response: Response
    samples: np.ndarray
    """float32 mono at the session's output rate; consecutive deltas are contiguous."""


@dataclass(frozen=True, eq=False)
class ResponseDone:
    response: Response


@dataclass(frozen=True, eq=False)
class SessionFailure:
    """Something failed outside a client call (e.g. committed audio the speech tokenizer refused)."""

    error: SessionError


SessionEvent = Union[  # noqa: UP007 (a runtime alias: isinstance checks and the docs name it)
    SpeechStarted,
    SpeechStopped,
    InputCommitted,
    InputCleared,
    ItemAdded,
    ItemDeleted,
    ItemTruncated,
    ResponseCreated,
    ResponseTextDelta,
    ResponseAudioDelta,
    ResponseDone,
    SessionFailure,
]
