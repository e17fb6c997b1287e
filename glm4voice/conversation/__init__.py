"""Conversation sessions shared by every front end (the OpenAI-compatible API; the page's live mode).

- :mod:`~glm4voice.conversation.session`: :class:`ConversationSession`, one conversation's state
  machine (items as token ids, the input audio buffer with turn detection, the answer in flight,
  cancellation that closes the token stream, truncation to what was heard), reporting the typed events
  of :mod:`~glm4voice.conversation.events`; its data in :mod:`~glm4voice.conversation.items`;
- :mod:`~glm4voice.conversation.history`: prompts from turns (as the page builds them) and the
  truncation rule;
- :mod:`~glm4voice.conversation.vad`: silero-vad turn detection in audio time;
- :mod:`~glm4voice.conversation.resampling`: streaming resampling without seams.
"""

from glm4voice.conversation.events import (
    InputCleared,
    InputCommitted,
    ItemAdded,
    ItemDeleted,
    ItemTruncated,
    ResponseAudioDelta,
    ResponseCreated,
    ResponseDone,
    ResponseTextDelta,
    SessionEvent,
    SessionFailure,
    SpeechStarted,
    SpeechStopped,
)
from glm4voice.conversation.history import Turn, build_prompt, heard_audio_tokens, heard_reply
from glm4voice.conversation.items import (
    AssistantItem,
    CancelReason,
    Item,
    ItemStatus,
    Response,
    ResponseStatus,
    SessionError,
    UserItem,
    new_id,
)
from glm4voice.conversation.resampling import StreamResampler
from glm4voice.conversation.session import ConversationSession, SessionConfig
from glm4voice.conversation.vad import SileroVAD, TurnDetection

__all__ = [
    "AssistantItem",
    "CancelReason",
    "ConversationSession",
    "InputCleared",
    "InputCommitted",
    "Item",
    "ItemAdded",
    "ItemDeleted",
    "ItemStatus",
    "ItemTruncated",
    "Response",
    "ResponseAudioDelta",
    "ResponseCreated",
    "ResponseDone",
    "ResponseStatus",
    "ResponseTextDelta",
    "SessionConfig",
    "SessionError",
    "SessionEvent",
    "SessionFailure",
    "SileroVAD",
    "SpeechStarted",
    "SpeechStopped",
    "StreamResampler",
    "Turn",
    "TurnDetection",
    "UserItem",
    "build_prompt",
    "heard_audio_tokens",
    "heard_reply",
    "new_id",
]
