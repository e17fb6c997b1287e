"""One spoken-chat turn, end to end, independent of any UI.

    chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, AsyncTokenClient(url))
    session = chat.new_session()                       # one per user / browser tab
    async for event in chat.run_turn(session, UserSpeech("question.wav"), GenerationOptions()):
        ...   # InputAccepted, AssistantText, AssistantAudio, TurnFinished or TurnFailed

A turn: check and tokenize the input (speech through the speech tokenizer, in a worker thread),
build the prompt from the session's history ids (:class:`glm4voice.protocol.Conversation`), stream
token ids from ``model_server.py`` (:class:`glm4voice.client.AsyncTokenClient`), split them into
text and audio blocks (:class:`glm4voice.protocol.Demuxer`, block sizes from ``block_sizes``) and
decode each block to PCM (``AudioDecoder.stream()``) while tokens keep arriving.

Overlap: a reader task reads the token stream and demultiplexes it; audio blocks go through a
bounded queue to a decode task, which runs each block in a single worker thread shared by all
sessions (so decoder calls never run concurrently and never block the event loop); blocks of
different sessions that wait at the same time are decoded as one batch
(:class:`glm4voice.block_batcher.BlockBatcher`). The reader
only waits on the decoder when ``max_pending_blocks`` blocks are already queued (the decoder
is then far behind real time and backpressure on the server is the right answer).

Front ends that keep their own history (``glm4voice.conversation``: the OpenAI-compatible API)
use the two halves of a turn: :meth:`VoiceChat.prepare_input` (check and tokenize an input) and
:meth:`VoiceChat.generate` (stream the answer to prompt ids they built; optionally text only, without
the decoder; a :class:`TurnProgress` shows the ids generated so far, also after a cancel).

Every failure ends the turn with one :class:`TurnFailed` event carrying a message meant for the
person using the demo; the session stays usable and its history is unchanged (a failed or
cancelled turn is not recorded). Every event carries ``elapsed`` (seconds since the turn began),
and :class:`TurnFinished` carries :class:`TurnTimings` for latency measurements.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, Sequence, Union

import numpy as np

from glm4voice.audio import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    SPEECH_TOKEN_RATE,
    Audio,
    AudioError,
    AudioSource,
    AudioTooLongError,
    CorruptAudioError,
    EmptyAudioError,
    load_audio,
)
from glm4voice.block_batcher import BlockBatcher
from glm4voice.client import (
    ProtocolError,
    RequestRejectedError,
    ServerBusyError,
    ServerUnavailableError,
    StreamFailedError,
    TokenServerError,
)
from glm4voice.protocol import (
    AUDIO_TOKENS_PER_SEGMENT,
    LOW_LATENCY_BLOCK_SIZES,
    TEXT_TOKENS_PER_SEGMENT,
    AudioBlock,
    AudioInput,
    BlockSchedule,
    Conversation,
    Demuxer,
    EndOfTurn,
    EndReason,
    InputMode,
    SpecialTokens,
    StreamError,
    TextDelta,
    TextInput,
)
from glm4voice.text_tokenizer import GLMTokenizer

logger = logging.getLogger(__name__)

# --- limits and defaults ------------------------------------------------------------------------------

DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.8
DEFAULT_MAX_NEW_TOKENS = 2000
"""The original web demo's generation defaults."""
MAX_INPUT_SECONDS = 120.0
"""Longest spoken input accepted by the demo (the tokenizer itself takes up to 10 minutes)."""
MAX_TEXT_CHARS = 4000
SILENCE_PEAK = 10 ** (-60 / 20)
"""Input whose loudest sample is below -60 dBFS is treated as containing no speech."""
MAX_PENDING_BLOCKS = 32
EARLY_FLUSH_MIN_TOKENS = 10
"""Smallest block handed out early (the decoder's own block size)."""
EARLY_FLUSH_MARGIN_S = 0.5
"""Time kept in hand for decoding a block under load when deciding on an early flush."""
QUICK_START_MARGIN_S = 0.1
QUICK_START_MAX_TURNS = 8
"""A quick first block only while at most this many turns run (measured on an H100, bench/e2e.py:
with 16 turns starting together, a quarter of the quick starts ran dry once; with 8, none)."""
DECODER_HOLD_BACK_S = 0.4
"""Audio the streaming decoder holds back until the next block (its 34-frame mel overlap)."""
PLAYER_LEAD_S = 0.15
"""The web player's lead before its first sample (``START_LEAD_S`` in glm4voice/web/player.js)."""


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

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None
    """Seeds the server's sampling and the decoder's noise: the same seed repeats a turn."""

    def check(self) -> None:
        """Raise :class:`TurnError` (INVALID_INPUT) with a readable message for bad settings."""
        problems = []
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 10.0):
            problems.append(f"temperature must be between 0 and 10 (got {self.temperature})")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            problems.append(f"top-p must be in (0, 1] (got {self.top_p})")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            problems.append(f"max new tokens must be a whole number of at least 1 (got {self.max_new_tokens})")
        if problems:
            raise TurnError(FailureKind.INVALID_INPUT, "Invalid settings: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class PipelineConfig:
    block_sizes: tuple[int, ...] = LOW_LATENCY_BLOCK_SIZES
    """Audio tokens per decoded block (first, second, ..., the last repeating); the first size
    sets the time to first audio."""
    max_input_seconds: float = MAX_INPUT_SECONDS
    max_text_chars: int = MAX_TEXT_CHARS
    silence_peak: float = SILENCE_PEAK
    max_pending_blocks: int = MAX_PENDING_BLOCKS
    adaptive_blocks: bool = True
    """Block sizes that follow the listener's buffer (see :class:`_Pacer`): the first block is
    ``block_sizes[0]`` tokens only if the answer's token rate and the decoder's latency let the next
    block arrive before that short first chunk has played, else it waits for the end of the first
    audio run; and when an audio run ends while the listener has little audio in hand, the pending
    audio is decoded at once instead of waiting through the run of text tokens. Off: fixed sizes,
    as the original."""
    decode_batch: int | None = None
    """Most blocks of different sessions decoded as one batch (None: as many as the decoder has
    graphs for, 16; 1: one block at a time). See :mod:`glm4voice.block_batcher`."""

    def __post_init__(self) -> None:
        BlockSchedule(tuple(self.block_sizes))  # validates
        bad_batch = self.decode_batch is not None and self.decode_batch < 1
        if self.max_input_seconds <= 0 or self.max_text_chars < 1 or self.max_pending_blocks < 1 or bad_batch:
            raise ValueError(f"invalid pipeline limits: {self}")


# --- what a turn takes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserText:
    text: str


@dataclass(frozen=True)
class UserSpeech:
    """Spoken input: a file path, encoded bytes, an ``(array, rate)`` tuple or an :class:`Audio`."""

    source: Union[AudioSource, Audio]


UserRequest = Union[UserText, UserSpeech]


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
    decoded: float
    samples: int


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


TurnEvent = Union[InputAccepted, AssistantText, AssistantAudio, TurnFinished, TurnFailed]


# --- the parts a pipeline drives ----------------------------------------------------------------------


class SpeechTokenizerLike(Protocol):
    def tokenize(self, audio: Any) -> list[int]: ...


class DecoderStreamLike(Protocol):
    def feed(self, codes: Sequence[int]) -> np.ndarray: ...
    def finish(self) -> np.ndarray: ...


class AudioDecoderLike(Protocol):
    def stream(self, seed: int | None = None) -> DecoderStreamLike: ...


class TokenStreamClient(Protocol):
    def stream(self, prompt: str | None = None, **params: Any) -> AsyncIterator[int]: ...


# --- per-session state --------------------------------------------------------------------------------


@dataclass
class ChatSession:
    """One user's conversation (history as token ids). Not shared between users."""

    conversation: Conversation
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    turns_started: int = 0
    busy: bool = False
    epoch: int = 0
    """Bumped by :meth:`clear`; a turn started before a clear never writes into the new history."""

    @property
    def turns(self) -> int:
        """Finished turns in the history."""
        return self.conversation.turns

    @property
    def history_ids(self) -> list[int]:
        return list(self.conversation.history)

    def clear(self) -> None:
        self.conversation.clear()
        self.epoch += 1


class TurnProgress:
    """A live view of what a running turn has generated, for callers that may stop it early.

    Pass one to :meth:`VoiceChat.generate`; :attr:`reply_ids` can be read at any time, also after the
    turn was cancelled (a front end that cuts an answer keeps the part that was heard)."""

    def __init__(self) -> None:
        self._demuxer: Demuxer | None = None

    @property
    def reply_ids(self) -> tuple[int, ...]:
        """Generated ids kept so far (stop tokens and ids past the audio codebook left out)."""
        return self._demuxer.reply_ids if self._demuxer is not None else ()


class _TurnClock:
    """Collects the stage times (and the text so far) of one turn."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}
        self.blocks: list[BlockTiming] = []
        self.tokens = 0
        self.text_parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def now(self) -> float:
        return time.perf_counter() - self.start

    def mark(self, name: str, *, first: bool = True) -> float:
        t = self.now()
        if not first or name not in self.marks:
            self.marks[name] = t
        return t

    def timings(self) -> TurnTimings:
        return TurnTimings(**self.marks, tokens=self.tokens, blocks=tuple(self.blocks))


class _Pacer:
    """Adaptive block sizes for one turn: hands blocks to the decoder when the listener needs them.

    Audio in hand = the tokens handed to the decoder, less what the decoder holds back, less what
    has played since the first PCM. Waiting for a block costs its missing audio tokens plus the text
    tokens of the interleave (13 per 26 audio) at the answer's measured token rate.

    - Quick start: the first block is ``block_sizes[0]`` tokens only if the rest of the first audio
      run can be generated and decoded before that short chunk (~0.4 s) and the player's lead have
      played, and at most ``QUICK_START_MAX_TURNS`` turns run; otherwise it is the whole first run
      (~1.7 s in hand), which keeps many simultaneous listeners gapless.
    - Early flush: when an audio run ends (a text token follows audio) and the audio in hand would
      not last until the next block at its scheduled size, the pending audio is decoded at once
      instead of waiting through the text run.
    """

    def __init__(self, clock: _TurnClock, chat: "VoiceChat"):
        self.clock = clock
        self.chat = chat
        self.schedule = chat.schedule
        self.quick = chat.schedule.sizes[0]
        self.audio_tokens_out = 0
        self.after_audio = False

    @staticmethod
    def demuxer_schedule(schedule: BlockSchedule) -> BlockSchedule:
        """The Demuxer's own schedule: a first block of a whole audio run (a quick one is cut here)."""
        sizes = schedule.sizes
        return BlockSchedule((max(sizes[0], AUDIO_TOKENS_PER_SEGMENT),) + tuple(sizes[1:]))

    def feed(self, token_id: int, is_audio: bool, demuxer: Demuxer) -> list:
        """``demuxer.feed(token_id)``, with the blocks this pacing hands out early."""
        events: list = []
        if not is_audio and self.after_audio and token_id not in self.chat.special.stop_ids:
            scheduled = self.schedule.size(demuxer.blocks_emitted)
            if self._should_flush(demuxer.pending_audio, scheduled):
                events.append(demuxer.flush_audio())
        self.after_audio = is_audio
        events += demuxer.feed(token_id)
        if is_audio and demuxer.blocks_emitted == 0 and demuxer.pending_audio == self.quick and self._quick_start():
            events.append(demuxer.flush_audio())
        self.audio_tokens_out += sum(len(e.codes) for e in events if isinstance(e, AudioBlock))
        return events

    def _rate(self) -> float | None:
        first_token = self.clock.marks.get("first_token")
        elapsed = 0.0 if first_token is None else self.clock.now() - first_token
        return (self.clock.tokens - 1) / elapsed if self.clock.tokens >= 2 and elapsed > 0 else None

    def _in_hand_s(self) -> float:
        first_audio = self.clock.marks.get("first_audio")
        played = 0.0 if first_audio is None else self.clock.now() - first_audio
        return self.audio_tokens_out / SPEECH_TOKEN_RATE - DECODER_HOLD_BACK_S - played

    def _should_flush(self, pending: int, scheduled: int) -> bool:
        if pending < EARLY_FLUSH_MIN_TOKENS:
            return False
        rate = self._rate()
        if rate is None:
            return True
        per_audio = (TEXT_TOKENS_PER_SEGMENT + AUDIO_TOKENS_PER_SEGMENT) / AUDIO_TOKENS_PER_SEGMENT
        wait_s = (TEXT_TOKENS_PER_SEGMENT + (scheduled - pending) * per_audio) / rate
        return self._in_hand_s() < wait_s + EARLY_FLUSH_MARGIN_S

    def _quick_start(self) -> bool:
        if self.chat.active_turns > QUICK_START_MAX_TURNS:
            return False
        rate = self._rate()
        if rate is None:
            return True
        rest_s = (AUDIO_TOKENS_PER_SEGMENT - self.quick) / rate
        chunk_s = self.quick / SPEECH_TOKEN_RATE - DECODER_HOLD_BACK_S
        decoder_s = self.chat.decoder_wait_s() or 0.0  # one call to wait for, one to run
        return rest_s + 2 * decoder_s + QUICK_START_MARGIN_S <= chunk_s + PLAYER_LEAD_S


@dataclass(frozen=True)
class _EndOfStream:
    """Reader -> decode task: no more blocks; how the stream ended."""

    end: EndOfTurn | None
    failure: TurnError | None
    ignored_tokens: int = 0


_DONE = object()


# --- the pipeline -------------------------------------------------------------------------------------


class VoiceChat:
    """The models and the server client a turn needs, shared by every session.

    ``close()`` stops the worker threads (the caller owns and closes the client).
    """

    def __init__(
        self,
        text_tokenizer: GLMTokenizer,
        speech_tokenizer: SpeechTokenizerLike,
        decoder: AudioDecoderLike,
        client: TokenStreamClient,
        config: PipelineConfig = PipelineConfig(),
        *,
        sample_rate: int = OUTPUT_SAMPLE_RATE,
        server_url: str | None = None,
    ):
        self.text_tokenizer = text_tokenizer
        self.special = SpecialTokens.from_tokenizer(text_tokenizer)
        self.speech_tokenizer = speech_tokenizer
        self.decoder = decoder
        self.client = client
        self.config = config
        self.schedule = BlockSchedule(tuple(config.block_sizes))
        self.sample_rate = sample_rate
        self.server_url = server_url or getattr(client, "base_url", "the model server")
        # One thread each: model calls are serialized (safe for shared weights and GPU graphs)
        # and run off the event loop; a thread waits on its queue, it does not poll.
        self._input_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4voice-tokenize")
        self._decode_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4voice-decode")
        self.blocks = BlockBatcher(decoder, self._decode_worker, config.decode_batch)
        self.active_turns = 0
        """Turns running now (all sessions)."""

    def close(self) -> None:
        self._input_worker.shutdown(wait=False, cancel_futures=True)
        self._decode_worker.shutdown(wait=False, cancel_futures=True)

    def new_session(self) -> ChatSession:
        return ChatSession(Conversation(self.text_tokenizer, self.special))

    # --- a turn ---------------------------------------------------------------------------------------

    async def run_turn(
        self,
        session: ChatSession,
        request: UserRequest,
        options: GenerationOptions = GenerationOptions(),
    ) -> AsyncIterator[TurnEvent]:
        """Events of one turn; always ends with exactly one TurnFinished or TurnFailed (unless the
        consumer stops early, which cancels the turn and closes the server stream)."""
        clock = _TurnClock()
        if session.busy:
            busy = TurnError(FailureKind.SESSION_BUSY, "Please wait: the previous answer is still being generated.")
            yield self._failed(busy, clock, "")
            return
        session.busy = True
        self.active_turns += 1
        session.turns_started += 1
        epoch = session.epoch
        try:
            try:
                options.check()
                user_input, speech_seconds = await self._prepare_input(request, clock)
                prompt_ids = session.conversation.prompt_for(user_input)
            except TurnError as error:
                yield self._failed(error, clock, "")
                return
            clock.mark("input_ready")
            mode = InputMode.AUDIO if isinstance(user_input, AudioInput) else InputMode.TEXT
            speech_tokens = len(user_input.codes) if isinstance(user_input, AudioInput) else 0
            yield InputAccepted(mode, len(prompt_ids), speech_tokens, speech_seconds, clock.now())
            async for event in self._reply(prompt_ids, options, clock):
                if isinstance(event, TurnFinished) and session.epoch == epoch:
                    session.conversation.add_turn(prompt_ids, event.reply_ids)
                yield event
        finally:
            session.busy = False
            self.active_turns -= 1

    async def prepare_input(self, request: UserRequest) -> TextInput | AudioInput:
        """Check and tokenize one input without running a turn (speech through the speech tokenizer
        in its worker thread), for callers that keep their own history (``glm4voice.conversation``).
        Raises :class:`TurnError` with a message for the user."""
        user_input, _ = await self._prepare_input(request, _TurnClock())
        return user_input

    async def generate(
        self,
        prompt_ids: Sequence[int],
        options: GenerationOptions = GenerationOptions(),
        *,
        decode_audio: bool = True,
        progress: TurnProgress | None = None,
    ) -> AsyncIterator[TurnEvent]:
        """The answer to a prompt the caller built (e.g. from its own history): AssistantText and
        AssistantAudio events, then exactly one TurnFinished or TurnFailed (no InputAccepted). With
        ``decode_audio=False`` the decoder is never called: audio tokens are generated (the model
        interleaves them) and kept in ``reply_ids``, and no AssistantAudio comes. Stopping the
        iteration early cancels the turn and closes the server stream, as with :meth:`run_turn`."""
        clock = _TurnClock()
        try:
            options.check()
        except TurnError as error:
            yield self._failed(error, clock, "")
            return
        self.active_turns += 1
        try:
            async for event in self._reply(
                list(prompt_ids), options, clock, decode_audio=decode_audio, progress=progress
            ):
                yield event
        finally:
            self.active_turns -= 1

    async def _prepare_input(
        self, request: UserRequest, clock: _TurnClock
    ) -> tuple[TextInput | AudioInput, float | None]:
        if isinstance(request, UserText):
            text = (request.text or "").strip()
            if not text:
                raise TurnError(FailureKind.EMPTY_INPUT, "Please type a message first.")
            if len(text) > self.config.max_text_chars:
                raise TurnError(
                    FailureKind.INPUT_TOO_LONG,
                    f"The message has {len(text)} characters; the limit is {self.config.max_text_chars}.",
                )
            return TextInput(text), None
        if not isinstance(request, UserSpeech):
            raise TypeError(f"a turn takes UserText or UserSpeech, not {type(request).__name__}")
        if request.source is None:
            raise TurnError(FailureKind.EMPTY_INPUT, "Please record or upload some speech first.")
        loop = asyncio.get_running_loop()
        audio = await loop.run_in_executor(self._input_worker, self._load_speech, request.source)
        clock.mark("input_loaded")
        if not np.any(np.abs(audio.samples) >= self.config.silence_peak):
            raise TurnError(
                FailureKind.NO_SPEECH, f"No speech detected: the {audio.duration:.1f} s of audio are silent."
            )
        try:
            codes = await loop.run_in_executor(self._input_worker, self.speech_tokenizer.tokenize, audio)
        except AudioError as error:
            raise TurnError(FailureKind.INVALID_INPUT, f"Unusable audio: {error}.") from error
        except Exception as error:  # a model failure: say it in the page, keep the traceback in the log
            logger.exception("speech tokenizer failed")
            raise TurnError(FailureKind.INTERNAL, f"The speech tokenizer failed: {error}") from error
        clock.mark("speech_tokenized")
        if not codes:
            raise TurnError(
                FailureKind.NO_SPEECH, "No speech detected in the audio (the speech tokenizer found nothing)."
            )
        return AudioInput(tuple(int(c) for c in codes)), audio.duration

    def _load_speech(self, source: AudioSource | Audio) -> Audio:
        limit = self.config.max_input_seconds
        try:
            if isinstance(source, Audio):
                source = (source.samples, source.sample_rate)
            return load_audio(source, INPUT_SAMPLE_RATE, max_seconds=limit)
        except AudioTooLongError as error:
            raise TurnError(FailureKind.INPUT_TOO_LONG, f"The recording is too long: {error}.") from error
        except EmptyAudioError as error:
            raise TurnError(FailureKind.EMPTY_INPUT, f"The recording is empty: {error}.") from error
        except CorruptAudioError as error:
            logger.info("unreadable audio input: %s", error)
            raise TurnError(
                FailureKind.INVALID_INPUT,
                "Unsupported or corrupt audio file: it could not be read as wav, flac, ogg or mp3.",
            ) from error
        except AudioError as error:
            raise TurnError(FailureKind.INVALID_INPUT, f"Unusable audio: {error}.") from error

    async def _reply(
        self,
        prompt_ids: list[int],
        options: GenerationOptions,
        clock: _TurnClock,
        *,
        decode_audio: bool = True,
        progress: TurnProgress | None = None,
    ) -> AsyncIterator[TurnEvent]:
        adaptive = self.config.adaptive_blocks and decode_audio
        schedule = _Pacer.demuxer_schedule(self.schedule) if adaptive else self.schedule
        demuxer = Demuxer(self.text_tokenizer, self.special, schedule)
        if progress is not None:
            progress._demuxer = demuxer
        out: asyncio.Queue = asyncio.Queue()
        blocks: asyncio.Queue = asyncio.Queue(maxsize=self.config.max_pending_blocks)
        reader = asyncio.create_task(self._read_tokens(prompt_ids, options, demuxer, clock, out, blocks, adaptive))
        decoder = asyncio.create_task(self._decode_blocks(options, clock, out, blocks, decode_audio))
        try:
            while True:
                event = await out.get()
                if event is _DONE:
                    break
                yield event
        finally:
            # Normal end: both tasks are done. Early exit or failure: cancelling the reader closes
            # the HTTP stream, which frees the server's slot; a block being decoded in the worker
            # thread finishes there and is dropped.
            for task in (reader, decoder):
                task.cancel()
            await asyncio.gather(reader, decoder, return_exceptions=True)

    async def _read_tokens(self, prompt_ids, options, demuxer: Demuxer, clock: _TurnClock,
                           out: asyncio.Queue, blocks: asyncio.Queue, adaptive: bool) -> None:  # fmt: skip
        end: EndOfTurn | None = None
        failure: TurnError | None = None
        pacer = _Pacer(clock, self) if adaptive else None
        try:
            clock.mark("request_sent")
            stream = self.client.stream(
                prompt_token_ids=prompt_ids,
                temperature=float(options.temperature),
                top_p=float(options.top_p),
                max_new_tokens=int(options.max_new_tokens),
                seed=options.seed,
            )
            async with aclosing(stream) as tokens:
                async for token_id in tokens:
                    clock.mark("first_token")
                    clock.mark("last_token", first=False)
                    clock.tokens += 1
                    is_audio = self.special.is_audio(token_id)
                    if is_audio:
                        clock.mark("first_audio_token")
                    events = demuxer.feed(token_id) if pacer is None else pacer.feed(token_id, is_audio, demuxer)
                    for event in events:
                        end = await self._route(event, clock, out, blocks) or end
                    if demuxer.finished:
                        break
            if not demuxer.finished:
                for event in demuxer.close():
                    end = await self._route(event, clock, out, blocks) or end
        except TokenServerError as error:
            failure = self._server_failure(error)
            for event in demuxer.fail(failure.message):
                if not isinstance(event, StreamError):
                    await self._route(event, clock, out, blocks)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: report it in the page, keep the traceback in the log
            logger.exception("token reader failed")
            failure = TurnError(FailureKind.INTERNAL, f"Internal error while reading the answer: {error}")
        await blocks.put(_EndOfStream(end, failure, demuxer.dropped_ids))

    async def _route(self, event, clock: _TurnClock, out: asyncio.Queue, blocks: asyncio.Queue) -> EndOfTurn | None:
        if isinstance(event, TextDelta):
            if event.text:
                clock.mark("first_text")
                clock.text_parts.append(event.text)
                out.put_nowait(AssistantText(event.text, clock.now()))
        elif isinstance(event, AudioBlock):
            clock.mark("first_block_ready")
            await blocks.put((event, clock.now()))
        elif isinstance(event, EndOfTurn):
            return event
        return None

    async def _decode_blocks(self, options: GenerationOptions, clock: _TurnClock,
                             out: asyncio.Queue, blocks: asyncio.Queue, decode_audio: bool = True) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        chunks: list[np.ndarray] = []
        position = 0

        def emit(samples: np.ndarray, index: int | None, codes: int, ready: float, started: float) -> None:
            nonlocal position
            samples = np.asarray(samples, dtype=np.float32).reshape(-1)
            decoded = clock.now()
            clock.blocks.append(BlockTiming(index, codes, ready, started, decoded, len(samples)))
            if len(samples):
                clock.mark("first_audio")
                chunks.append(samples)
                out.put_nowait(AssistantAudio(samples, self.sample_rate, position, index, decoded))
                position += len(samples)

        stream = None
        try:
            if not decode_audio:  # text only: the blocks are drained, the decoder never runs
                while not isinstance(item := await blocks.get(), _EndOfStream):
                    pass
            else:
                stream = await loop.run_in_executor(self._decode_worker, lambda: self.decoder.stream(seed=options.seed))
                while True:
                    item = await blocks.get()
                    if isinstance(item, _EndOfStream):
                        break
                    block, ready = item
                    started = clock.now()
                    samples = await self.blocks.feed(stream, block.codes)
                    emit(samples, block.index, len(block.codes), ready, started)
                started = clock.now()
                tail = await loop.run_in_executor(self._decode_worker, stream.finish)
                emit(tail, None, 0, started, started)
        except asyncio.CancelledError:
            if stream is not None and hasattr(stream, "close"):
                # after the block the worker may still be decoding (the worker runs jobs in order)
                self._decode_worker.submit(stream.close)
            raise
        except Exception as error:
            logger.exception("speech decoder failed")
            out.put_nowait(
                self._failed(
                    TurnError(FailureKind.DECODER_FAILED, f"The speech decoder failed: {error}"), clock, clock.text
                )
            )
            out.put_nowait(_DONE)
            return
        clock.mark("finished")
        if item.failure is not None or item.end is None:
            failure = item.failure or TurnError(FailureKind.INTERNAL, "The answer ended without an end of turn.")
            out.put_nowait(self._failed(failure, clock, clock.text))
        else:
            end = item.end
            audio_tokens = sum(1 for i in end.reply_ids if self.special.is_audio(i))
            audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
            out.put_nowait(
                TurnFinished(
                    end.text,
                    audio,
                    self.sample_rate,
                    end.reason,
                    end.reply_ids,
                    len(end.reply_ids) - audio_tokens,
                    audio_tokens,
                    item.ignored_tokens,
                    clock.timings(),
                    clock.now(),
                )
            )
        out.put_nowait(_DONE)

    def decoder_wait_s(self) -> float | None:
        """Expected duration of the decoder call a new block joins: alone, a small block's (the fastest
        call seen); with other turns running, the recent average (their blocks share the calls)."""
        return self.blocks.fastest_s if self.active_turns <= 1 else self.blocks.latency_s

    # --- errors ---------------------------------------------------------------------------------------

    def _server_failure(self, error: TokenServerError) -> TurnError:
        url = self.server_url
        if isinstance(error, ServerUnavailableError):
            cause = error.__cause__ or error
            return TurnError(
                FailureKind.SERVER_UNAVAILABLE,
                f"Cannot reach the model server at {url}. Is model_server.py running? ({cause})",
            )
        if isinstance(error, ServerBusyError):
            wait = (
                f" Please try again in {error.retry_after:g} s." if error.retry_after else " Please try again shortly."
            )
            return TurnError(FailureKind.SERVER_BUSY, f"The model server is busy (every stream is in use).{wait}")
        if isinstance(error, RequestRejectedError):
            hint = " The conversation is too long: press Clear to start a new one." if error.status == 413 else ""
            return TurnError(FailureKind.SERVER_REJECTED, f"The model server refused the request ({error}).{hint}")
        if isinstance(error, StreamFailedError):
            return TurnError(FailureKind.STREAM_FAILED, f"The answer was cut off: {error}. Please try again.")
        if isinstance(error, ProtocolError):
            return TurnError(FailureKind.STREAM_FAILED, f"The model server sent something unexpected: {error}")
        return TurnError(FailureKind.STREAM_FAILED, f"Model server error: {error}")

    def _failed(self, error: TurnError, clock: _TurnClock, partial_text: str) -> TurnFailed:
        logger.info("turn failed (%s): %s", error.kind.value, error.message)
        return TurnFailed(error.kind, error.message, partial_text, clock.timings(), clock.now())
