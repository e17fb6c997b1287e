"""One spoken-chat turn, end to end, independent of any UI.

    chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, AsyncTokenClient(url))
    session = chat.new_session()                       # one per user / browser tab
    async for event in chat.run_turn(session, UserSpeech("question.wav"), GenerationOptions()):
        ...   # InputAccepted, AssistantText, AssistantAudio, TurnFinished or TurnFailed

Three modules:

- :mod:`glm4voice.pipeline.events`: the turn's vocabulary (requests, options, events, failure kinds);
- :mod:`glm4voice.pipeline.policy`: where a turn's audio is cut into blocks for the decoder (a
  function of the tokens only: fixed sizes, or cut for a listener) and when a cut block is decoded
  (the pacing, which follows the measured load but only ever holds blocks back);
- :mod:`glm4voice.pipeline.chat`: the orchestration (:class:`VoiceChat`, :class:`ChatSession`).

Every public name is importable from ``glm4voice.pipeline`` itself.
"""

from glm4voice.defaults import DEMO_MAX_NEW_TOKENS as DEFAULT_MAX_NEW_TOKENS
from glm4voice.defaults import DEMO_TEMPERATURE as DEFAULT_TEMPERATURE
from glm4voice.defaults import DEMO_TOP_P as DEFAULT_TOP_P
from glm4voice.defaults import MAX_INPUT_SECONDS, MAX_TEXT_CHARS, PLAYER_LEAD_S
from glm4voice.pipeline.chat import (
    MAX_PENDING_BLOCKS,
    SILENCE_PEAK,
    AudioDecoderLike,
    ChatSession,
    DecoderStreamLike,
    PipelineConfig,
    SpeechTokenizerLike,
    TokenStreamClient,
    TurnLoad,
    TurnProgress,
    VoiceChat,
)
from glm4voice.pipeline.events import (
    AssistantAudio,
    AssistantText,
    BlockTiming,
    FailureKind,
    GenerationOptions,
    InputAccepted,
    TurnError,
    TurnEvent,
    TurnFailed,
    TurnFinished,
    TurnTimings,
    UserRequest,
    UserSpeech,
    UserText,
)
from glm4voice.pipeline.policy import (
    MIN_TOKEN_RATE,
    AdaptiveBlocks,
    BlockPacing,
    BlockPolicy,
    DemuxState,
    FixedBlocks,
    ListenerPacing,
    SharedLoad,
    TokenKind,
    cut_and_demux,
)

__all__ = [
    "AdaptiveBlocks", "AssistantAudio", "AssistantText", "AudioDecoderLike", "BlockPacing", "BlockPolicy",
    "BlockTiming", "ChatSession", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P",
    "DecoderStreamLike", "DemuxState", "FailureKind", "FixedBlocks", "GenerationOptions", "InputAccepted",
    "ListenerPacing", "MAX_INPUT_SECONDS", "MAX_PENDING_BLOCKS", "MAX_TEXT_CHARS", "MIN_TOKEN_RATE",
    "PLAYER_LEAD_S", "PipelineConfig", "SILENCE_PEAK", "SharedLoad",
    "SpeechTokenizerLike", "TokenKind", "TokenStreamClient", "TurnError", "TurnEvent", "TurnFailed", "TurnFinished",
    "TurnLoad", "TurnProgress", "TurnTimings", "UserRequest", "UserSpeech", "UserText", "VoiceChat",
    "cut_and_demux",
]  # fmt: skip
