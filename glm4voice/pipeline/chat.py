"""The orchestration of a turn: :class:`VoiceChat` (shared by every session) and :class:`ChatSession`.

A turn: check and tokenize the input (speech through the speech tokenizer, in a worker thread),
build the prompt from the session's history ids (:class:`glm4voice.protocol.Conversation`), stream
token ids from ``model_server.py`` (:class:`glm4voice.client.AsyncTokenClient`), split them into
text and audio blocks (:class:`glm4voice.protocol.Demuxer`, consulting the turn's
:class:`~glm4voice.pipeline.policy.BlockPolicy` at every token) and decode each block to PCM
(``AudioDecoder.stream()``) while tokens keep arriving.

Where blocks are cut is a function of the token sequence only (the policy never sees a clock), so a
seeded turn's audio does not depend on the machine's load; when a cut block is decoded is the
turn's :class:`~glm4voice.pipeline.policy.BlockPacing`'s (measured timing), which can only hold
blocks back.

Overlap: a reader task reads the token stream and demultiplexes it; audio blocks go through a
bounded queue to a decode task, which runs them in a single worker thread shared by all sessions
(so decoder calls never run concurrently and never block the event loop); blocks of different
sessions that wait at the same time are decoded as one batch, and a session's blocks that wait
together are decoded in order in the same job (:class:`glm4voice.block_batcher.BlockBatcher`). The
reader only waits on the decoder when ``max_pending_blocks`` blocks are already queued (the decoder
is then far behind real time and backpressure on the server is the right answer).

Front ends that keep their own history (``glm4voice.conversation``: the OpenAI-compatible API)
use the two halves of a turn: :meth:`VoiceChat.prepare_input` (check and tokenize an input) and
:meth:`VoiceChat.generate` (stream the answer to prompt ids they built; optionally text only, without
the decoder; a :class:`TurnProgress` shows the ids generated so far, also after a cancel).

Every failure ends the turn with one :class:`~glm4voice.pipeline.events.TurnFailed` event
carrying a message meant for the person using the demo; the session stays usable and its history
is unchanged (a failed or cancelled turn is not recorded).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, aclosing, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import httpx
import numpy as np

from glm4voice.audio import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
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
from glm4voice.defaults import MAX_INPUT_SECONDS, MAX_TEXT_CHARS, PLAYER_LEAD_S
from glm4voice.memory import MemoryOwners
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
    HELD_RECHECK_S,
    MIN_TOKEN_RATE,
    QUICK_START_MAX_TURNS,
    SPARE_MAX_TURNS,
    SPARE_STARTING_TOKENS,
    URGENT_IN_HAND_S,
    AdaptiveBlocks,
    BlockPacing,
    BlockPolicy,
    FixedBlocks,
    ListenerPacing,
    TokenKind,
    cut_and_demux,
)
from glm4voice.protocol import (
    LOW_LATENCY_BLOCK_SIZES,
    AudioBlock,
    AudioInput,
    BlockSchedule,
    Conversation,
    Demuxer,
    EndOfTurn,
    InputMode,
    SpecialTokens,
    StreamError,
    TextDelta,
    TextInput,
)
from glm4voice.text_tokenizer import GLMTokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")

SILENCE_PEAK = 10 ** (-60 / 20)
"""Input whose loudest sample is below -60 dBFS is treated as containing no speech."""
MAX_PENDING_BLOCKS = 32


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
    """Cuts and pacing for a listener (:class:`~glm4voice.pipeline.policy.AdaptiveBlocks`,
    :class:`~glm4voice.pipeline.policy.ListenerPacing`): on top of the schedule, a block is cut at
    the end of an audio run while a listener of an answer streamed at ``min_token_rate`` would
    otherwise run dry before the next chance to cut (young answers: at their first runs' ends). Where
    blocks are cut depends on the tokens only; under load a quick first block is decoded only once
    the next one is cut (the listener then starts with both). Off: the schedule's cuts, every block
    decoded at once, as the original."""
    min_token_rate: float = MIN_TOKEN_RATE
    """The slowest answer (tokens/s) whose listener adaptive cuts keep gapless (default: three times
    real time); a lower rate cuts more, smaller blocks, which cost the decoder more per second of audio."""
    player_lead_s: float = PLAYER_LEAD_S
    """The listener's player starts this long after the first audio arrives (adaptive cuts and pacing
    count it as audio in hand)."""
    decode_batch: int | None = None
    """Most blocks of different sessions decoded as one batch (None: as many as the decoder has
    graphs for, 16; 1: one block at a time). See :mod:`glm4voice.block_batcher`."""
    first_blocks_first: bool = True
    """With an engine in this process (the one-process layout: a client with ``make_way``), the
    engine starts no new step while a turn's first audio block is decoded (``Engine.make_way``): the
    listener waiting for it then does not share the GPU with generation. Off: both run at once."""
    spare_starting_tokens: int = SPARE_STARTING_TOKENS
    """With ``first_blocks_first``: while a first block is decoded, the engine goes on stepping, alone,
    the requests that have generated fewer tokens than this (and new prompts' prefills), instead of
    pausing them with the others (``Engine.make_way``'s ``starting_tokens``), so that turns starting
    together do not wait for each other's first blocks. The default, 78, spares a turn through its
    first three blocks (the answer's first two segments of 13 text and 26 audio tokens); 39 through its
    first two, 23 through its first. On an H200 under Poisson load, in the same process, 39 lowered TTFA
    p95 from 0.55 to 0.42 s (0.2 conversations/s), from 0.75 to 0.52 s (0.27/s) and from 0.85 to 0.46 s
    (0.35/s), but each value leaves turns dry in a burst of starting turns at the first block it does not
    spare (23: the second, 6 turns at 0.35/s; 39: the third, 2-3 turns), whose tokens waited behind the
    burst's first blocks; 78 left none dry at 0.35/s (docs/PERFORMANCE.md, "2026-11-29, H200, second
    session" and "third session"). 0: every request pauses."""
    spare_max_turns: int = SPARE_MAX_TURNS
    """With ``spare_starting_tokens``: requests are spared only while at most this many turns are
    starting (their listeners have heard nothing yet); with more, every request pauses as with 0. On an
    H200, 64 conversations started together with every starting turn spared ran dry 37-43 of 64 per run
    (against 5-16 without sparing) and, with ``cover_start``, started after 6.5-11 s instead of 4-6 s;
    with this limit they run as without sparing (52-64 dry; with ``cover_start`` 0 of 64 in three runs,
    TTFA p50 12.7-15.4 s: docs/PERFORMANCE.md, "2026-11-29, H200, third session")."""
    urgent_in_hand_s: float = URGENT_IN_HAND_S
    """With ``adaptive_blocks``: a later block whose listener, already playing, has less audio than this
    in hand when the block is handed to the decoder goes with the first blocks (:mod:`glm4voice.block_batcher`: the
    decoder's next job, ahead of other sessions' later blocks, and ``first_blocks_first``'s pause), as
    the block after the first always does (:meth:`~glm4voice.pipeline.policy.ListenerPacing.urgent`).
    Under Poisson load a burst of starting turns keeps the decoder on first blocks: with 39 starting
    tokens spared a young answer's third block waited 0.3-0.6 s for its call while its listener had
    about 0.5 s left (H200, 0.27 and 0.35 conversations/s: the only turns that ran dry); urgent, its
    call took 0.28-0.35 s. Its effect on TTFA p95 and gaps was within the runs' spread in three
    comparisons (docs/PERFORMANCE.md, "2026-11-29, H200, third session"); with 78 starting tokens
    spared no later block was urgent in ten runs at 0.27-0.43/s, 11 were at 0.5/s ("fourth session").
    0: only the blocks that start a listener."""
    quick_start_max_turns: int = QUICK_START_MAX_TURNS
    """With ``adaptive_blocks``: while more turns than this are starting (see
    ``quick_start_counts_unheard``), a turn's quick first block is held back: its listener starts only
    with the next block (:meth:`~glm4voice.pipeline.policy.ListenerPacing.hold_first_block`)."""
    quick_start_counts_unheard: bool = True
    """With ``adaptive_blocks``: the turns counted against ``quick_start_max_turns`` are those whose
    listener has heard nothing yet (the turns starting, whose first blocks share the decoder's calls),
    not every running turn. Under Poisson load most running turns are long past their start, so far
    fewer first blocks are held; 64 turns started together count as before. Held first blocks set
    TTFA p95 under Poisson load: on an H200 at 0.35 conversations/s, counting every running turn held
    30-32 of 87 turns' first blocks and gave TTFA p95 0.86-0.98 s; counting the unheard ones (with
    ``decode_held_first_block``) held 4 and gave 0.61-0.66 s (docs/PERFORMANCE.md, "2026-11-28, H200,
    late"). Off: every running turn counts."""
    decode_held_first_block: bool = True
    """With ``adaptive_blocks``: a quick first block that the pacing holds back is decoded at once, and
    only its audio is kept back until the next block is decoded (the listener still starts with both),
    so that the listener then waits for one decoder call, the next block's, not for two. What is cut
    and decoded, and in which order, does not change. Off: the held block goes to the decoder together
    with the next one."""
    start_held_early: bool = True
    """With ``adaptive_blocks`` and ``decode_held_first_block``: a held first block's audio goes out as
    soon as the next block, from the tokens in so far at the answer's measured rate and the decoder's
    measured latency, is expected before the first chunk has played
    (:meth:`~glm4voice.pipeline.policy.ListenerPacing.held_start_in_s`), instead of once the next
    block is decoded; not while more than ``quick_start_max_turns`` turns are starting. The estimate
    (two average decoder calls) misses a next block stuck behind a long call of later blocks: without
    ``later_calls_yield``, four of six runs on an H200 under Poisson load had a turn run dry after its
    first chunk (docs/PERFORMANCE.md, "2026-11-29, H200, fourth session"). With it: TTFA p95
    0.422-0.445 s at 0.35 conversations/s (two runs, none dry) and 0.430-0.495 s at 0.43/s (three runs;
    1, 0 and 3 turns dry), against 0.436-0.609 s without this in the same calls (0, 0 and 1 dry at
    0.43/s; "2026-11-29, H200, fifth session"). Off: the listener starts with the next block."""
    first_blocks_cut_in: bool = False
    """A turn's first block need not wait for the decoder call that is running: the call stands aside
    between its ODE steps (and before its vocoder, and between its batches) and decodes the waiting
    first blocks there (:mod:`glm4voice.block_batcher`). On an H200 under Poisson load (0.27/s) this
    halved the first block's call at the median and lowered TTFA p50 by 60-80 ms, but not p95, and a
    turn ran dry in 3 of 5 runs against none (docs/PERFORMANCE.md, "2026-11-28, H200, evening"); with
    78 starting tokens spared, at 0.35/s: TTFA p95 6.7 s and 52 of 78 turns dry ("2026-11-29, H200,
    fourth session"). Off: a first block waits for the running call to end, then goes first."""
    later_calls_yield: bool = True
    """A decoder call of later blocks ends between its batches once a first block (or a block its
    listener waits for) is waiting; the blocks of its batches left go back, undecoded, ahead of the
    later blocks that wait, and the first blocks go next (:mod:`glm4voice.block_batcher`). On an H200
    under Poisson load (78 starting tokens spared), in the same calls: at 0.35 conversations/s TTFA
    p95 0.436 s against 0.494 s, at 0.43/s 0.554 s and no turn dry against 0.831 s and three turns dry
    (docs/PERFORMANCE.md, "2026-11-29, H200, fifth session"). A call of one batch still runs to its
    end. Off: a first block waits for the running call to end."""
    queue_finishes: bool = False
    """An answer's last decode (its pending tokens and the tail the decoder held back) waits in the
    block batcher's queue behind the first blocks waiting, and yields to them as later calls do
    (:meth:`~glm4voice.block_batcher.BlockBatcher.finish`), instead of going straight to the decoder's
    thread. Under Poisson load on an H200 (0.43-0.5 conversations/s), finishes stood between a
    waiting first block and its call: bursts of up to seven of 10-15 ms each, and finishes of a few
    pending tokens of 0.11-0.19 s (bench/e2e.py's ``finishes_meanwhile``; docs/PERFORMANCE.md,
    "2026-11-29, H200, fifth session"). Measured against the default in the same process: at 0.43
    conversations/s TTFA p95 0.434 s and no gap against 0.512 s and two turns dry, but at 0.5/s 15
    turns with a gap against 8, some at the answer's tail (a queued finish came after its listener's
    last block had played; "sixth session"). Since then a finish whose listener has less than
    :data:`~glm4voice.block_batcher.FINISH_DUE_S` of audio left when a decoder call starts goes in that
    call and does not yield (not measured yet). Off: each finish goes to the decoder's thread when its
    answer ends."""
    cover_start: bool = False
    """With ``adaptive_blocks``: a turn's first audio goes out only once the audio decoded so far covers
    the wait for every later block at the answer's measured token rate and the decoder's measured
    latency (:meth:`~glm4voice.pipeline.policy.ListenerPacing.start_covered`); the blocks are decoded
    as usual meanwhile, only their audio is kept back. Under heavy load the first audio comes later
    and then plays without a gap (64 conversations started together on an H100: 0-2 of 64 ran dry
    against 25-43; on an H200 with ``pace_generation``: 0 in three runs, TTFA p50 4.1-6.0 s); at
    moderate load it costs time to first audio for few or no gaps saved (docs/PERFORMANCE.md,
    "2026-11-28, evening" and "2026-11-28, H200"). Off: the first decoded audio goes out at once."""
    pace_generation: bool = True
    """With ``adaptive_blocks``, for turns whose ``GenerationOptions.paced`` is true: the turn's token
    reader stops reading while its listener has several seconds more in hand than its next block needs
    (:meth:`~glm4voice.pipeline.policy.ListenerPacing.read_delay_s`); an engine in this process then
    stops generating that stream once ``max_unread_tokens`` wait (``EngineConfig``), leaving the GPU to
    the decoder and to turns that need tokens. What is cut and decoded does not change; the answer's
    text then streams a few seconds ahead of its audio rather than all at once. On an H200, 64
    conversations started together: 51 of 384 ran dry over six runs against 95; Poisson load at 1.0
    conversations/s: no turn dry in two runs against 4 and 2, TTFA within the runs' spread
    (docs/PERFORMANCE.md, "2026-11-28, H200"). Off: tokens are read as fast as they come."""

    def __post_init__(self) -> None:
        BlockSchedule(tuple(self.block_sizes))  # validates
        bad_batch = self.decode_batch is not None and self.decode_batch < 1
        limits_ok = self.max_input_seconds > 0 and self.max_text_chars >= 1 and self.max_pending_blocks >= 1
        limits_ok = limits_ok and self.quick_start_max_turns >= 0 and self.spare_starting_tokens >= 0
        limits_ok = limits_ok and self.spare_max_turns >= 0 and self.urgent_in_hand_s >= 0
        if not limits_ok or bad_batch or not self.player_lead_s >= 0 or not self.min_token_rate > 0:
            raise ValueError(f"invalid pipeline limits: {self}")


# --- the parts a pipeline drives ----------------------------------------------------------------------


class SpeechTokenizerLike(Protocol):
    def tokenize(self, audio: Any) -> list[int]: ...
    def memory_owners(self) -> MemoryOwners: ...


class DecoderStreamLike(Protocol):
    def feed(self, codes: Sequence[int]) -> np.ndarray: ...
    def finish(self) -> np.ndarray: ...


class AudioDecoderLike(Protocol):
    """What the pipeline needs of the speech decoder (``flow_inference.AudioDecoder``)."""

    @property
    def hold_back_s(self) -> float:
        """Audio a stream holds back until its next block (seconds)."""
        ...

    @property
    def min_block_tokens(self) -> int:
        """Fewest pending tokens a stream decodes; smaller early blocks are not worth handing out."""
        ...

    def stream(self, seed: int | None = None) -> DecoderStreamLike:
        """A new stream; called on the event loop, so host work only (the decoding runs in ``feed``)."""
        ...

    def memory_owners(self) -> MemoryOwners: ...


class TokenStreamClient(Protocol):
    def stream(self, prompt: str | None = None, **params: Any) -> AsyncGenerator[int, None]: ...


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

    def follow(self, demuxer: Demuxer) -> None:
        """Report what ``demuxer`` (the running turn's) has kept."""
        self._demuxer = demuxer

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


class TurnLoad:
    """The :class:`~glm4voice.pipeline.policy.SharedLoad` a :class:`VoiceChat` gives its turns' block
    pacing: the turns running now, and the decoder jobs' measured durations."""

    def __init__(self, blocks: BlockBatcher):
        self.blocks = blocks
        self.active_turns = 0
        """Turns running now whose audio is decoded (text-only answers leave the decoder alone)."""
        self.unheard_turns = 0
        """Those of them whose listener has not had any audio yet (from the input to the first audio)."""

    def turn_started(self, speaking: bool) -> None:
        """A turn began; ``speaking``: its audio is decoded (a text-only answer leaves the decoder alone)."""
        self.active_turns += speaking
        self.unheard_turns += speaking

    def first_audio_sent(self) -> None:
        """A speaking turn's listener got its first audio: it is no longer starting."""
        self.unheard_turns -= 1

    def turn_ended(self, speaking: bool, heard: bool) -> None:
        """A turn ended; ``heard``: its first audio was sent (then it left the unheard ones already)."""
        self.active_turns -= speaking
        if not heard:
            self.unheard_turns -= speaking

    def decoder_wait_s(self) -> float | None:
        """Alone, a small block's job (the fastest seen); with other turns running, the recent
        average (their blocks share the jobs)."""
        return self.blocks.fastest_s if self.active_turns <= 1 else self.blocks.latency_s

    def decoder_round_s(self) -> float | None:
        """A decoder job's time per block, times the turns running: how long the decoder takes to decode
        the next block of every running turn (None: no job measured yet)."""
        per_block = self.blocks.block_s
        return None if per_block is None else per_block * max(1, self.active_turns)


@dataclass(frozen=True)
class _EndOfStream:
    """Reader -> decode task: no more blocks; how the stream ended."""

    end: EndOfTurn | None
    failure: TurnError | None
    ignored_tokens: int = 0


_DONE = object()


def _as_samples(pcm: Any) -> np.ndarray:
    """A decoder's output as one float32 channel."""
    return np.asarray(pcm, dtype=np.float32).reshape(-1)


def _take_waiting(item, blocks: asyncio.Queue, ready: list) -> _EndOfStream | None:
    """Append ``item`` and every block already waiting in ``blocks`` to ``ready``, in order; the end of
    the stream if it came."""
    while not isinstance(item, _EndOfStream):
        ready.append(item)
        if blocks.empty():
            return None
        item = blocks.get_nowait()
    return item


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
        self.server_url = server_url or str(getattr(client, "base_url", "the model server"))
        # One thread each: model calls are serialized (safe for shared weights and GPU graphs)
        # and run off the event loop; a thread waits on its queue, it does not poll.
        self._input_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4voice-tokenize")
        self._decode_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4voice-decode")
        self._engine_make_way = getattr(client, "make_way", None) if config.first_blocks_first else None
        self.blocks = BlockBatcher(
            decoder,
            self._decode_worker,
            config.decode_batch,
            make_way=self._make_way if self._engine_make_way is not None else None,
            cut_in=config.first_blocks_cut_in,
            yield_to_first=config.later_calls_yield,
        )
        self.load = TurnLoad(self.blocks)
        """What every turn's block pacing may know of the others (turns running, decoder job time)."""
        self._turns_running = 0

    def _make_way(self) -> AbstractContextManager[None]:
        """The engine's pause for a first block (decoder thread): sparing the starting turns' requests
        while few turns are starting (``spare_starting_tokens``, ``spare_max_turns``)."""
        assert self._engine_make_way is not None  # given to the batcher only then
        few = self.load.unheard_turns <= self.config.spare_max_turns  # an int set on the event loop: read once
        return self._engine_make_way(starting_tokens=self.config.spare_starting_tokens if few else 0)

    @property
    def active_turns(self) -> int:
        """Turns running now (all sessions), text-only answers included."""
        return self._turns_running

    @contextmanager
    def _running(self, decodes_audio: bool, clock: _TurnClock) -> Iterator[None]:
        """Count a turn while it runs: in ``active_turns``, and in the decoder's load unless it is text
        only (there among the unheard turns until ``_decode_blocks`` sends its first audio)."""
        self._turns_running += 1
        self.load.turn_started(decodes_audio)
        try:
            yield
        finally:
            self._turns_running -= 1
            self.load.turn_ended(decodes_audio, heard="first_audio" in clock.marks)

    def decoder_wait_s(self) -> float | None:
        """Expected duration of the decoder call a new block joins (see :meth:`TurnLoad.decoder_wait_s`)."""
        return self.load.decoder_wait_s()

    @property
    def first_block_sizes(self) -> tuple[int, ...]:
        """Every size a turn's first block can have (what the decoder's ``warm_up`` should capture)."""
        return self.block_policy().first_block_sizes

    def block_policy(self) -> BlockPolicy:
        """A new turn's cuts (adaptive or fixed, as configured): a function of its tokens only."""
        if not self.config.adaptive_blocks:
            return FixedBlocks(self.schedule)
        return AdaptiveBlocks(
            self.schedule,
            hold_back_s=self.decoder.hold_back_s,
            min_block_tokens=self.decoder.min_block_tokens,
            player_lead_s=self.config.player_lead_s,
            min_token_rate=self.config.min_token_rate,
        )

    def block_pacing(self, paced: bool = True) -> BlockPacing:
        """A new turn's pacing: when its cut blocks are decoded (adaptive: may hold a quick first block
        back under load; fixed: every block at once); ``paced``: the turn's listener plays the audio as
        it arrives (see ``GenerationOptions.paced``)."""
        if not self.config.adaptive_blocks:
            return BlockPacing()
        return ListenerPacing(
            self.load,
            first_block=self.schedule.sizes[0],
            hold_back_s=self.decoder.hold_back_s,
            min_block_tokens=self.decoder.min_block_tokens,
            player_lead_s=self.config.player_lead_s,
            schedule=self.schedule,
            cover_start=self.config.cover_start,
            pace_generation=self.config.pace_generation and paced,
            quick_start_max_turns=self.config.quick_start_max_turns,
            quick_start_counts_unheard=self.config.quick_start_counts_unheard,
            urgent_in_hand_s=self.config.urgent_in_hand_s,
            start_held_early=self.config.start_held_early and self.config.decode_held_first_block,
        )

    def memory_owners(self) -> MemoryOwners:
        """What the speech side holds on its device (see :mod:`glm4voice.memory`): the speech
        tokenizer's and the decoder's weights, the decoder's graph pool, the streams they run on."""
        return self.speech_tokenizer.memory_owners() + self.decoder.memory_owners()

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
        session.turns_started += 1
        epoch = session.epoch
        try:
            with self._running(decodes_audio=True, clock=clock):
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
    ) -> AsyncGenerator[TurnEvent, None]:
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
        with self._running(decode_audio, clock):  # a text-only answer is no load on the decoder
            async for event in self._reply(
                list(prompt_ids), options, clock, decode_audio=decode_audio, progress=progress
            ):
                yield event

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
        # text only: no decoder, so neither cuts for a listener nor pacing
        policy = self.block_policy() if decode_audio else FixedBlocks(self.schedule)
        pacing = self.block_pacing(options.paced) if decode_audio else BlockPacing()
        demuxer = Demuxer(self.text_tokenizer, self.special, policy.demuxer_schedule)
        if progress is not None:
            progress.follow(demuxer)
        out: asyncio.Queue = asyncio.Queue()
        blocks: asyncio.Queue = asyncio.Queue(maxsize=self.config.max_pending_blocks)
        reader = asyncio.create_task(
            self._read_tokens(prompt_ids, options, demuxer, policy, pacing, clock, out, blocks)
        )
        decoder = asyncio.create_task(self._decode_blocks(options, pacing, clock, out, blocks, decode_audio))
        ending = False

        def died(task: asyncio.Task) -> None:
            """A task that ends by an error it did not handle, or cancelled from elsewhere (the
            workers shut down under it), still ends the turn: the consumer never waits forever."""
            nonlocal ending
            if ending or not (task.cancelled() or task.exception() is not None):
                return
            ending = True  # one report, even if both tasks die
            why = "it was cancelled" if task.cancelled() else repr(task.exception())
            error = TurnError(FailureKind.INTERNAL, f"Internal error: the turn's {task.get_name()} stopped ({why}).")
            out.put_nowait(self._failed(error, clock, clock.text))
            out.put_nowait(_DONE)

        for task, name in ((reader, "token reader"), (decoder, "audio decoder")):
            task.set_name(name)
            task.add_done_callback(died)
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
            ending = True
            for task in (reader, decoder):
                task.cancel()
            await asyncio.gather(reader, decoder, return_exceptions=True)

    async def _read_tokens(self, prompt_ids, options, demuxer: Demuxer, policy: BlockPolicy, pacing: BlockPacing,
                           clock: _TurnClock, out: asyncio.Queue, blocks: asyncio.Queue) -> None:  # fmt: skip
        end: EndOfTurn | None = None
        failure: TurnError | None = None
        try:
            clock.mark("request_sent")
            stream = self.client.stream(
                prompt_token_ids=prompt_ids,
                temperature=float(options.temperature),
                top_p=float(options.top_p),
                max_new_tokens=int(options.max_new_tokens),
                seed=options.seed,
            )
            audio_cut = 0  # audio tokens handed out in blocks
            async with aclosing(stream) as tokens:
                async for token_id in tokens:
                    clock.mark("first_token")
                    clock.mark("last_token", first=False)
                    clock.tokens += 1
                    kind = self._kind(token_id)
                    if kind is TokenKind.AUDIO:
                        clock.mark("first_audio_token")
                    pacing.token(clock.now())
                    for event in cut_and_demux(token_id, kind, demuxer, policy):
                        if isinstance(event, AudioBlock):
                            audio_cut += len(event.codes)
                        end = await self._route(event, clock, out, blocks) or end
                    if demuxer.finished:
                        break
                    if not pacing.paces_reading:
                        continue
                    next_block = policy.demuxer_schedule.size(demuxer.blocks_emitted)
                    delay = pacing.read_delay_s(clock.now(), clock.marks.get("first_audio"), audio_cut,
                                                demuxer.pending_audio, next_block)  # fmt: skip
                    if delay:  # the listener is far ahead: leave the next tokens with the engine
                        pacing.paused(delay)
                        await asyncio.sleep(delay)
            if not demuxer.finished:
                for event in demuxer.close():
                    end = await self._route(event, clock, out, blocks) or end
        except TokenServerError as error:
            failure = await self._server_failure(error)
            for event in demuxer.fail(failure.message):
                if not isinstance(event, StreamError):
                    await self._route(event, clock, out, blocks)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: report it in the page, keep the traceback in the log
            logger.exception("token reader failed")
            failure = TurnError(FailureKind.INTERNAL, f"Internal error while reading the answer: {error}")
        await blocks.put(_EndOfStream(end, failure, demuxer.dropped_ids))

    def _kind(self, token_id: int) -> TokenKind:
        return TokenKind.of(token_id, self.special)

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

    async def _decode_blocks(self, options: GenerationOptions, pacing: BlockPacing, clock: _TurnClock,
                             out: asyncio.Queue, blocks: asyncio.Queue, decode_audio: bool = True) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        chunks: list[np.ndarray] = []
        position = 0

        def emit(samples: np.ndarray, timing: BlockTiming, sent: float) -> None:
            """Send a decoded block's audio (``sent``: now) and record its timing."""
            nonlocal position
            clock.blocks.append(replace(timing, sent=sent))
            if len(samples):
                if "first_audio" not in clock.marks:
                    self.load.first_audio_sent()  # counted by _running
                clock.mark("first_audio")
                chunks.append(samples)
                out.put_nowait(AssistantAudio(samples, self.sample_rate, position, timing.index, sent))
                position += len(samples)

        def when_done(pcm: asyncio.Future) -> list[float]:
            """The turn's time when ``pcm`` is settled (filled in then)."""
            at: list[float] = []
            pcm.add_done_callback(lambda _: at.append(clock.now()))
            return at

        stream = None
        pcms: list[asyncio.Future] = []
        try:
            if not decode_audio:  # text only: the blocks are drained, the decoder never runs
                while not isinstance(item := await blocks.get(), _EndOfStream):
                    pass
                stream_end = item
            else:
                stream = self.decoder.stream(seed=options.seed)  # host work only: no wait for the decoder's calls
                ready: list[tuple[AudioBlock, float]] = []  # cut, not yet handed to the decoder
                cut: list[int] = []  # sizes of the blocks handed to the decoder
                unheard: list[tuple[np.ndarray, BlockTiming]] = []  # decoded, not yet sent
                end: _EndOfStream | None = None
                paced = started_playing = False
                held = False  # a held first block decoded at once: the listener waits for the next block

                def send_if_started(start: bool) -> None:
                    """Send the unheard audio if the listener plays, or may start now (``start``; callers
                    ask the pacing only while it does not play)."""
                    nonlocal started_playing, unheard
                    if started_playing or start:
                        started_playing = True
                        sent = clock.now()
                        for samples, timing in unheard:
                            emit(samples, timing, sent)
                        unheard = []

                async def await_or_start_held(waiting: Awaitable[T]) -> T:
                    """``await waiting``; meanwhile a held first block's decoded audio goes out once the
                    pacing expects the next block in time (``PipelineConfig.start_held_early``)."""
                    nonlocal held
                    if not (held and unheard):
                        return await waiting
                    future = asyncio.ensure_future(waiting)
                    try:
                        while (wait := pacing.held_start_in_s(clock.now())) is not None:
                            if wait <= 0:
                                held = False
                                send_if_started(started_playing or pacing.start_covered(clock.now(), cut))
                                break
                            await asyncio.wait([future], timeout=max(wait, HELD_RECHECK_S))
                            if future.done():
                                break
                        return await future
                    finally:
                        future.cancel()  # left waiting only when the turn is cancelled

                while end is None:
                    end = _take_waiting(await await_or_start_held(blocks.get()), blocks, ready)
                    if not paced and end is None and [block.index for block, _ in ready] == [0]:
                        paced = True
                        if pacing.hold_first_block(clock.now()):
                            if not self.config.decode_held_first_block:
                                continue  # decoded once the next block is cut, in order
                            held = True  # decoded now, heard with the next block
                    if not ready:
                        continue
                    started = clock.now()
                    # the block after the first goes with the first blocks: its listener has heard only the
                    # short first block (0.4 s of audio once the decoder's hold-back is taken), or nothing;
                    # so does a later one whose listener is about to run dry (urgent_in_hand_s)
                    urgent = len(cut) > 1 and pacing.urgent(clock.now(), clock.marks.get("first_audio"), sum(cut))
                    pcms = self.blocks.submit(
                        stream, [block.codes for block, _ in ready], first=True if len(cut) == 1 or urgent else None
                    )
                    done_at = [when_done(pcm) for pcm in pcms]
                    cut += [len(block.codes) for block, _ in ready]
                    # blocks handed over together reach the listener together: a held first block and
                    # the block after it start playing as one (the player's lead covers neither gap)
                    decoded = await await_or_start_held(asyncio.gather(*pcms))
                    for (block, ready_at), pcm, at in zip(ready, decoded, done_at):
                        samples = _as_samples(pcm)
                        timing = BlockTiming(block.index, len(block.codes), ready_at, started, at[0], len(samples),
                                             urgent=urgent)  # fmt: skip
                        unheard.append((samples, timing))
                    ready, pcms = [], []
                    held = held and len(cut) == 1
                    send_if_started(
                        started_playing or end is not None or (not held and pacing.start_covered(clock.now(), cut))
                    )
                send_if_started(True)  # the answer ended before its start was covered
                started = clock.now()
                if self.config.queue_finishes:  # with the time its listener has left, if known
                    due_in = pacing.due_in_s(started, clock.marks.get("first_audio"), sum(cut))
                    finishing = self.blocks.finish(stream, None if due_in is None else loop.time() + due_in)
                else:
                    finishing = loop.run_in_executor(self._decode_worker, stream.finish)
                tail = _as_samples(await finishing)
                decoded_at = clock.now()
                emit(tail, BlockTiming(None, 0, started, started, decoded_at, len(tail)), decoded_at)
                stream_end = end
        except asyncio.CancelledError:
            for pcm in pcms:  # blocks not decoded yet are dropped
                pcm.cancel()
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
        if stream_end.failure is not None or stream_end.end is None:
            failure = stream_end.failure or TurnError(FailureKind.INTERNAL, "The answer ended without an end of turn.")
            out.put_nowait(self._failed(failure, clock, clock.text))
        else:
            ignored_tokens = stream_end.ignored_tokens
            turn_end = stream_end.end
            audio_tokens = sum(1 for i in turn_end.reply_ids if self.special.is_audio(i))
            audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
            out.put_nowait(
                TurnFinished(
                    turn_end.text,
                    audio,
                    self.sample_rate,
                    turn_end.reason,
                    turn_end.reply_ids,
                    len(turn_end.reply_ids) - audio_tokens,
                    audio_tokens,
                    ignored_tokens,
                    clock.timings(),
                    clock.now(),
                )
            )
        out.put_nowait(_DONE)

    # --- errors ---------------------------------------------------------------------------------------

    async def _server_failure(self, error: TokenServerError) -> TurnError:
        url = self.server_url
        if isinstance(error, ServerUnavailableError):
            cause = error.__cause__ or error
            if isinstance(cause, httpx.TimeoutException) and not isinstance(cause, httpx.ConnectTimeout):
                message = f"The model server at {url} did not answer in time ({cause}). Please try again."
                return TurnError(FailureKind.SERVER_UNAVAILABLE, message)
            return TurnError(FailureKind.SERVER_UNAVAILABLE, _not_running(url, str(cause)))
        if isinstance(error, ServerBusyError):
            # 503 means busy only from a server that is up: one that is stopping, restarting or whose
            # engine stopped answers 503 too, and its /health says which
            down = await self._server_down(error)
            if down is not None:
                return TurnError(FailureKind.SERVER_UNAVAILABLE, _not_running(url, down))
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

    async def _server_down(self, busy: ServerBusyError) -> str | None:
        """Why a server that answered 503 is not serving (None: it is up and busy), from its ``/health``."""
        health = getattr(self.client, "health", None)
        if health is None:
            return None
        try:
            info = await health()
        except ServerUnavailableError as error:
            return str(error.__cause__ or error)
        except TokenServerError:  # /health answers 503 itself: stopping, or its engine stopped
            return f"it answers {busy.text!r}"
        status = info.get("status") if isinstance(info, dict) else None
        return None if status == "ready" else f"its status is {status!r}: {busy.text}"

    def _failed(self, error: TurnError, clock: _TurnClock, partial_text: str) -> TurnFailed:
        logger.info("turn failed (%s): %s", error.kind.value, error.message)
        return TurnFailed(error.kind, error.message, partial_text, clock.timings(), clock.now())


def _not_running(url: str, detail: str) -> str:
    return (
        f"The model server is not running or is restarting ({url}: {detail}). "
        "The next turn works as soon as model_server.py is back."
    )
