"""The vocabulary of one turn: what it takes, the options it runs with, what it yields, how it fails.

A turn takes a :data:`UserRequest` (:class:`UserText` or :class:`UserSpeech`) and
:class:`GenerationOptions`, and yields :data:`TurnEvent` values: :class:`InputAccepted` first,
then :class:`AssistantText` and :class:`AssistantAudio` as the answer streams, and exactly one
:class:`TurnFinished` or :class:`TurnFailed` (with a :class:`FailureKind` and a message for the
person using the demo). Every event carries ``elapsed``, seconds since the turn began; the end
events carry :class:`TurnTimings`. Plain frozen data: no behaviour beyond validating options.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from glm4voice.audio import Audio, AudioSource
from glm4voice.defaults import (
    DEMO_MAX_NEW_TOKENS,
    DEMO_TEMPERATURE,
    DEMO_TOP_P,
    max_new_tokens_problem,
    temperature_problem,
    top_p_problem,
)
from glm4voice.protocol import EndReason, InputMode


class FailureKind(str, enum.Enum):
    """Why a turn failed (the UI shows :attr:`TurnFailed.message`; tests and logs use the kind)."""

    EMPTY_INPUT = "empty_input"  # no text typed, no recording, an empty file
    INVALID_INPUT = "invalid_input"  # a file that is not audio, bad generation settings
    INPUT_TOO_LONG = "input_too_long"
    NO_SPEECH = "no_speech"
    SESSION_BUSY = "session_busy"  # a turn of this session is still running
    SERVER_UNAVAILABLE = "server_unavailable"
    SERVER_BUSY = "server_busy"
    SERVER_REJECTED = "server_rejected"
    STREAM_FAILED = "stream_failed"
    DECODER_FAILED = "decoder_failed"
    INTERNAL = "internal"


class TurnError(Exception):
    """A failure with a message for the user (raised inside the pipeline, reported as TurnFailed)."""

    def __init__(self, kind: FailureKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


# --- options ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings of one turn (the UI's sliders)."""

    temperature: float = DEMO_TEMPERATURE
    top_p: float = DEMO_TOP_P
    max_new_tokens: int = DEMO_MAX_NEW_TOKENS
    seed: int | None = None
    """Seeds the server's sampling and the decoder's noise: the same seed repeats a turn."""
    paced: bool = True
    """The answer's audio is played as it arrives (the page, a Realtime or streaming client): the
    pipeline may read its tokens no faster than the listener needs them
    (``PipelineConfig.pace_generation``). False: as fast as it can (a caller that waits for the whole
    answer, such as a chat completion without ``stream``)."""

    def check(self) -> None:
        """Raise :class:`TurnError` (INVALID_INPUT) with a readable message for bad settings."""
        checks = (("temperature", temperature_problem(self.temperature)), ("top-p", top_p_problem(self.top_p)),
                  ("max new tokens", max_new_tokens_problem(self.max_new_tokens)))  # fmt: skip
        problems = [f"{name} {problem}" for name, problem in checks if problem is not None]
        if problems:
            raise TurnError(FailureKind.INVALID_INPUT, "Invalid settings: " + "; ".join(problems) + ".")


# --- what a turn takes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserText:
    text: str


@dataclass(frozen=True)
class UserSpeech:
    """Spoken input: a file path, encoded bytes, an ``(array, rate)`` tuple or an :class:`Audio`."""

    source: AudioSource | Audio


UserRequest = UserText | UserSpeech


# --- what a turn yields -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputAccepted:
    mode: InputMode
    prompt_tokens: int
    """Length of the prompt sent to the server (history included)."""
    speech_tokens: int
    """Audio tokens of the spoken input (0 for text)."""
    input_seconds: float | None
    """Duration of the spoken input."""
    elapsed: float


@dataclass(frozen=True)
class AssistantText:
    text: str
    """New text (may be several tokens' worth; a split UTF-8 character waits for its rest)."""
    elapsed: float


@dataclass(frozen=True)
class AssistantAudio:
    samples: np.ndarray
    """float32 mono PCM at ``sample_rate``; never empty; consecutive chunks are contiguous."""
    sample_rate: int
    start_sample: int
    """Position of the first sample in the turn's audio."""
    block_index: int | None
    """The decoded block (None: the decoder's final flush)."""
    elapsed: float


@dataclass(frozen=True)
class BlockTiming:
    index: int | None
    codes: int
    ready: float
    """When the demultiplexer completed the block (s since turn start)."""
    decode_started: float
    """When the block went to the decoder."""
    decoded: float
    """When the decoder returned it."""
    samples: int
    sent: float | None = None
    """When its audio went to the listener (later than ``decoded`` while the listener's start waits for
    later blocks; None: as ``decoded``)."""
    urgent: bool = False
    """It went to the decoder with the first blocks because its listener, already playing, was short of
    audio (``PipelineConfig.urgent_in_hand_s``); the block after the first always goes with them and is
    not counted here."""


@dataclass(frozen=True)
class TurnTimings:
    """Seconds since the turn began (None: the stage did not happen)."""

    input_loaded: float | None = None
    """Spoken input read and resampled to 16 kHz."""
    speech_tokenized: float | None = None
    """Speech tokenizer done."""
    input_ready: float | None = None
    """Input checked and tokenized, prompt built."""
    request_sent: float | None = None
    first_token: float | None = None
    first_text: float | None = None
    first_audio_token: float | None = None
    first_block_ready: float | None = None
    first_audio: float | None = None
    """First PCM out of the decoder (what a listener waits for, minus the network)."""
    last_token: float | None = None
    finished: float | None = None
    tokens: int = 0
    blocks: tuple[BlockTiming, ...] = ()


@dataclass(frozen=True)
class TurnFinished:
    text: str
    audio: np.ndarray
    """The whole answer: the concatenation of every AssistantAudio chunk (may be empty)."""
    sample_rate: int
    reason: EndReason
    reply_ids: tuple[int, ...]
    """Every generated id except the stop token (what the history records)."""
    text_tokens: int
    audio_tokens: int
    ignored_tokens: int
    """Generated ids past the audio codebook (padded embedding rows), left out of reply_ids."""
    timings: TurnTimings
    elapsed: float

    @property
    def audio_seconds(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass(frozen=True)
class TurnFailed:
    kind: FailureKind
    message: str
    """For the person using the demo."""
    partial_text: str
    timings: TurnTimings
    elapsed: float


TurnEvent = InputAccepted | AssistantText | AssistantAudio | TurnFinished | TurnFailed
