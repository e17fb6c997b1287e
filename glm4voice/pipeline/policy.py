"""Where a turn's audio is cut into blocks for the speech decoder, and when a cut block is decoded.

The decoder's audio depends on where blocks are cut (each block's flow runs over its prompt and its
new tokens; the mel cross-fade and the vocoder's carried frame sit at the cuts), so the two
decisions are kept apart:

- **Cuts** (:class:`BlockPolicy`): a function of the token sequence only. The demultiplexing loop of a
  turn (:class:`glm4voice.pipeline.VoiceChat`) cuts audio tokens into blocks by a
  :class:`glm4voice.protocol.BlockSchedule` and asks the policy before every token whether to hand
  out the pending audio first. The policy sees the token's kind and what the demultiplexer holds
  (:class:`DemuxState`), never a clock or the load: a seeded turn's audio is the same whatever the
  machine is doing.

  - :class:`FixedBlocks`: blocks of the schedule's sizes only, as the original.
  - :class:`AdaptiveBlocks`: the schedule, plus a cut at the end of an audio run when a listener
    fed at :data:`MIN_TOKEN_RATE` would otherwise run dry before the next chance to cut.

- **Pacing** (:class:`BlockPacing`): when a cut block goes to the decoder or its audio to the
  listener. It may only delay: a block held back is decoded or heard later, in order, never merged
  with the next one or cut elsewhere.

  - :class:`BlockPacing`: every block at once.
  - :class:`ListenerPacing`: holds a quick first block back when the next one could not follow in
    time (the measured token rate, decoder latency and turns running through the narrow
    :class:`SharedLoad`), until the next block is decoded (or, optionally, expected in time from the
    tokens in so far), so that a listener who starts hearing the answer does not run dry after the
    first chunk; and starts the listener only once the audio decoded so far covers the wait for every
    later block of the schedule (:meth:`ListenerPacing.start_covered`); and lets a turn's token
    reader wait while its listener is far ahead (:meth:`ListenerPacing.read_delay_s`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from glm4voice.audio import SPEECH_TOKEN_RATE
from glm4voice.protocol import (
    AUDIO_TOKENS_PER_SEGMENT,
    TEXT_TOKENS_PER_SEGMENT,
    AudioBlock,
    BlockSchedule,
    Demuxer,
    Event,
    SpecialTokens,
)

TOKENS_PER_AUDIO_TOKEN = (TEXT_TOKENS_PER_SEGMENT + AUDIO_TOKENS_PER_SEGMENT) / AUDIO_TOKENS_PER_SEGMENT
"""Generated tokens per audio token in the 13 text / 26 audio interleave (1.5)."""
REAL_TIME_TOKEN_RATE = SPEECH_TOKEN_RATE * TOKENS_PER_AUDIO_TOKEN
"""Tokens per second an interleaved answer needs to be generated as fast as it plays (18.75)."""
MIN_TOKEN_RATE = 3 * REAL_TIME_TOKEN_RATE
"""The slowest answer (tokens/s) that :class:`AdaptiveBlocks`' cuts keep gapless: three times real
time (56.25). Cuts are planned on a clock that
counts tokens at this rate, never on measured time; answers streamed faster only have more audio in
hand than planned. A lower rate cuts more, smaller blocks, and every block costs the decoder its
prompt as well as its new tokens: at twice real time (37.5) 32 conversations started together
outran the decoder of an H200 (docs/PERFORMANCE.md, "Adaptive blocks", has the figures)."""
EARLY_CUT_MARGIN_S = 0.5
"""Audio kept in hand, on the planning clock, for the decoder's latency under load."""
QUICK_START_MARGIN_S = 0.1
"""Slack required on top of the estimated time until the second block plays."""
HELD_RECHECK_S = 0.02
"""Shortest wait before a held first block's start is estimated again
(:meth:`ListenerPacing.held_start_in_s`): the estimate moves only as tokens arrive."""
START_HORIZON_S = 15.0
"""How far into an answer's audio :meth:`ListenerPacing.start_covered` checks that later blocks arrive in
time (the schedule's blocks grow, so the first few are the tight ones; an answer slower than real time
would otherwise never start before it ends)."""
PACE_SLACK_S = 3.0
"""A paced turn (:meth:`ListenerPacing.read_delay_s`) stops reading tokens while its listener has more
than this in hand beyond what its next block needs (generating it at the answer's rate and decoding it)."""
MIN_PACE_PAUSE_S = 0.5
"""Shorter pauses are not taken: each costs the engine a hold and a resume of the stream."""
QUICK_START_MAX_TURNS = 8
"""A quick first block is heard at once only while at most this many turns start (or run: see
``PipelineConfig.quick_start_counts_unheard``): many turns starting together share the decoder's
calls, and a short first chunk then runs dry before the next block arrives (bench/e2e.py's
concurrency section; docs/PERFORMANCE.md, "Adaptive blocks")."""
SPARE_STARTING_TOKENS = 2 * (TEXT_TOKENS_PER_SEGMENT + AUDIO_TOKENS_PER_SEGMENT)
"""A turn's engine request keeps stepping while other turns' first blocks are decoded until it has
generated this many tokens (``PipelineConfig.spare_starting_tokens``): the answer's first two segments,
13 text and 26 audio tokens each, which adaptive cuts decode as its first three blocks (10, 16 and 26
audio tokens)."""
URGENT_IN_HAND_S = 1.0
"""A later block goes with the first blocks (``PipelineConfig.urgent_in_hand_s``) when its listener,
already playing, has less audio than this in hand as it is handed to the decoder: more than the
decoder's slowest calls for a later block under Poisson load on an H200 (0.3-0.68 s, while turns
starting together keep the decoder on first blocks), less than a paced listener keeps in hand."""
SPARE_MAX_TURNS = 16
"""Starting turns are spared (``SPARE_STARTING_TOKENS``) only while at most this many are starting
(``PipelineConfig.spare_max_turns``): under Poisson load a burst starts a few turns together; when
dozens start at once, sparing them all would leave the first blocks' decoder calls no pause at all."""


class TokenKind(enum.Enum):
    TEXT = "text"
    AUDIO = "audio"
    STOP = "stop"
    """A token that ends the turn (``<|user|>`` and the other eos ids)."""
    DROPPED = "dropped"
    """An id past the audio codebook (a padded embedding row): the demultiplexer drops it, and the
    cuts ignore it (they are a function of the ids the turn keeps)."""

    @classmethod
    def of(cls, token_id: int, special: SpecialTokens) -> TokenKind:
        if special.is_audio(token_id):
            return cls.AUDIO if special.audio_code(token_id) < special.num_audio_codes else cls.DROPPED
        return cls.STOP if token_id in special.stop_ids else cls.TEXT


@dataclass(frozen=True)
class DemuxState:
    """What the demultiplexer holds when a policy is consulted."""

    pending_audio: int
    """Audio tokens received but not yet in a block."""
    blocks_emitted: int
    """Blocks handed out so far (the next block's index in the schedule)."""


# --- cuts: a function of the token sequence -----------------------------------------------------------


class BlockPolicy:
    """Where a turn's audio is cut into blocks: the demultiplexer cuts by :attr:`demuxer_schedule`, and
    :meth:`before_token` may hand out the pending audio earlier. One instance per turn; it is told
    the tokens in order and nothing else, so equal token sequences are cut equally."""

    def __init__(self, schedule: BlockSchedule):
        self.schedule = schedule
        """The block sizes the turn asked for."""

    @property
    def demuxer_schedule(self) -> BlockSchedule:
        """The schedule the demultiplexer cuts by on its own (early cuts come on top)."""
        return self.schedule

    @property
    def first_block_sizes(self) -> tuple[int, ...]:
        """Every size a turn's first block can have while the answer goes on (the decoder captures a
        graph for each ahead; an answer whose audio ends sooner has a shorter one, as its last)."""
        return (self.demuxer_schedule.sizes[0],)

    def before_token(self, kind: TokenKind, demux: DemuxState) -> bool:
        """The next token is of ``kind`` (called once per token, in order, before the token is
        demultiplexed). True: hand out the pending audio as a block first."""
        return False

    def block_out(self, codes: int) -> None:
        """A block of ``codes`` audio tokens was cut (by the schedule or by :meth:`before_token`)."""


def cut_and_demux(token_id: int, kind: TokenKind, demuxer: Demuxer, policy: BlockPolicy) -> list[Event]:
    """``demuxer.feed(token_id)``, after the block ``policy`` cuts before the token: the one way a
    turn's tokens are cut into blocks (a turn's reader and any replay of its ids use it)."""
    events: list[Event] = []
    if policy.before_token(kind, DemuxState(demuxer.pending_audio, demuxer.blocks_emitted)):
        block = demuxer.flush_audio()
        if block is not None:
            events.append(block)
    events += demuxer.feed(token_id)
    for event in events:
        if isinstance(event, AudioBlock):
            policy.block_out(len(event.codes))
    return events


class FixedBlocks(BlockPolicy):
    """The original's cuts: blocks of the schedule's sizes."""


class AdaptiveBlocks(BlockPolicy):
    """The schedule's cuts (a quick first block of ``schedule.sizes[0]`` tokens: every turn's first
    block has that shape, which batches well), plus early cuts at the ends of audio runs.

    When an audio run ends (a text token follows audio) and at least ``min_block_tokens`` are
    pending, the block is cut there if a listener would otherwise run dry before the next chance to
    hand the pending audio out, planned on a clock that counts generated tokens at
    ``min_token_rate``: audio in hand = the audio cut so far, less what the decoder holds back
    (``hold_back_s``), less what has played since the first block (its player starting
    ``player_lead_s`` late), against the wait for that chance plus :data:`EARLY_CUT_MARGIN_S`. The
    next chance is the sooner of the block reaching its scheduled size (the 13 text tokens ahead and
    1.5 tokens per missing audio token) and the end of the next audio run (13 text and 26 audio
    tokens ahead). So a young answer is cut at the ends of its first runs, and each later block
    spans as many runs as the audio in hand allows, up to the schedule's size: the fewest cuts that
    keep the planned listener supplied. Every cut costs a decoder call over the block's prompt (up to
    the decoder's window) as well as its new tokens, so fewer, larger blocks are what lets one
    decoder keep many listeners supplied (docs/PERFORMANCE.md, "Adaptive blocks").
    """

    def __init__(
        self,
        schedule: BlockSchedule,
        *,
        hold_back_s: float,
        min_block_tokens: int,
        player_lead_s: float,
        min_token_rate: float = MIN_TOKEN_RATE,
    ):
        super().__init__(schedule)
        if not min_token_rate > 0:
            raise ValueError(f"min_token_rate must be positive, got {min_token_rate}")
        self.hold_back_s = hold_back_s
        self.min_block_tokens = min_block_tokens
        self.player_lead_s = player_lead_s
        self.min_token_rate = min_token_rate
        self.tokens = 0
        """Tokens seen so far (the planning clock: ``tokens / min_token_rate`` seconds)."""
        self.first_cut_at: int | None = None
        """:attr:`tokens` when the first block was cut (the planned start of playback)."""
        self.audio_tokens_out = 0
        self._after_audio = False

    def before_token(self, kind: TokenKind, demux: DemuxState) -> bool:
        if kind is TokenKind.DROPPED:
            return False
        run_ends = kind is TokenKind.TEXT and self._after_audio
        self._after_audio = kind is TokenKind.AUDIO
        self.tokens += 1
        if not run_ends or demux.blocks_emitted == 0 or demux.pending_audio < self.min_block_tokens:
            return False
        return self.in_hand_s() < self.wait_s(demux) + EARLY_CUT_MARGIN_S

    def block_out(self, codes: int) -> None:
        if self.first_cut_at is None:
            self.first_cut_at = self.tokens
        self.audio_tokens_out += codes

    def in_hand_s(self) -> float:
        """Seconds of audio a listener has left now on the planning clock."""
        played = 0.0 if self.first_cut_at is None else (self.tokens - self.first_cut_at) / self.min_token_rate
        return self.audio_tokens_out / SPEECH_TOKEN_RATE - self.hold_back_s + self.player_lead_s - played

    def wait_s(self, demux: DemuxState) -> float:
        """Seconds on the planning clock, at the end of an audio run, until the next chance to hand the
        pending audio out: it reaches its scheduled size, or the next audio run ends."""
        missing = max(0, self.schedule.size(demux.blocks_emitted) - demux.pending_audio)
        scheduled = TEXT_TOKENS_PER_SEGMENT + missing * TOKENS_PER_AUDIO_TOKEN
        return min(scheduled, TEXT_TOKENS_PER_SEGMENT + AUDIO_TOKENS_PER_SEGMENT) / self.min_token_rate


# --- pacing: when a cut block is decoded ---------------------------------------------------------------


class SharedLoad(Protocol):
    """What a turn's pacing may know about everything else the pipeline runs."""

    @property
    def active_turns(self) -> int:
        """Turns running now whose audio the decoder decodes, this one included."""
        ...

    @property
    def unheard_turns(self) -> int:
        """Those of them whose listener has heard nothing yet (the turns starting), this one included."""
        ...

    def decoder_wait_s(self) -> float | None:
        """Expected duration of the decoder call a new block joins (None: not measured yet)."""
        ...

    def decoder_round_s(self) -> float | None:
        """Expected time for the decoder to decode the next block of every running turn (None: not
        measured yet)."""
        ...


class BlockPacing:
    """When a turn's cut blocks go to the decoder: every block as soon as it is cut. One instance
    per turn. A pacing may hold blocks back, never cut or merge them: held blocks are decoded later,
    in order, exactly as cut."""

    def token(self, now: float) -> None:
        """A token arrived ``now`` (s since the turn began)."""

    def hold_first_block(self, now: float) -> bool:
        """The first block was cut at ``now``. True: its listener starts only once the next block is
        decoded too (or the answer ends); the pipeline decodes it at once and keeps its audio back, or
        hands it to the decoder with the next block (``PipelineConfig.decode_held_first_block``)."""
        return False

    def held_start_in_s(self, now: float) -> float | None:
        """A held first block (:meth:`hold_first_block`) is decoded and the next block is not. Seconds
        after ``now`` when its audio may go out all the same, ahead of the next block (0 or less: now;
        the pipeline asks again then); None: only with the next block."""
        return None

    def start_covered(self, now: float, cut: Sequence[int]) -> bool:
        """Blocks of ``cut`` audio tokens (in order: every block handed to the decoder so far) are
        decoded at ``now`` and the listener has heard nothing yet. False: keep their audio back until
        a later block is decoded (or the answer ends), then send it all."""
        return True

    def urgent(self, now: float, first_audio_at: float | None, audio_cut: int) -> bool:
        """Whether the next block, handed to the decoder ``now`` with ``audio_cut`` audio tokens in the
        blocks before it, goes with the first blocks: its listener would run dry waiting for it behind
        other sessions' blocks."""
        return False

    def due_in_s(self, now: float, first_audio_at: float | None, audio_cut: int) -> float | None:
        """Seconds after ``now`` when the listener, playing since ``first_audio_at`` the audio of the
        ``audio_cut`` audio tokens handed out, runs out of it (None: no estimate)."""
        return None

    @property
    def paces_reading(self) -> bool:
        """Whether the turn's token reader should ask :meth:`read_delay_s` after each token."""
        return False

    def read_delay_s(self, now: float, first_audio_at: float | None, audio_cut: int, pending: int, next_block: int) -> float:  # fmt: skip
        """Seconds the turn's token reader may wait before reading on (0: read now), ``now`` and
        ``first_audio_at`` on the turn's clock, ``audio_cut`` audio tokens handed out in blocks,
        ``pending`` audio tokens waiting for the next block of ``next_block``. Never changes what is
        cut or decoded, only when the tokens are read: a reader that waits leaves them with the
        engine, which then stops generating the stream (``EngineConfig.max_unread_tokens``)."""
        return 0.0

    def paused(self, seconds: float) -> None:
        """The reader waited ``seconds`` (as :meth:`read_delay_s` allowed)."""


class ListenerPacing(BlockPacing):
    """Holds a quick first block back while the block after it could not follow in time.

    A first block of ``first_block`` tokens is a quick start when the rest of its audio run (26
    tokens) is at least ``min_block_tokens``, so that the end of the run cuts the next block soon. It
    is heard at once only if that rest can be generated (at the answer's measured token rate) and
    decoded (one decoder call to wait for, one to run) before the short first chunk (less the
    decoder's ``hold_back_s``) and the player's lead (``player_lead_s``) have played, and at most
    ``quick_start_max_turns`` turns run (the pipeline's default: :data:`QUICK_START_MAX_TURNS`; with
    ``quick_start_counts_unheard`` only the turns whose listener has heard nothing yet count);
    otherwise it waits for the next block, and the listener starts with both (the pipeline decodes
    the first block meanwhile unless ``PipelineConfig.decode_held_first_block`` is off).

    With ``cover_start`` the listener also starts only once the audio decoded so far covers the wait
    for every later block (:meth:`start_covered`): under load, where the answer streams at a few
    times real time and the decoder's calls take a quarter of a second, a listener started on the
    first blocks runs dry when the schedule's blocks grow (an 80-token block is generated in about
    3 s at 40 tok/s, while the 52 tokens before it play for 4.2 s less the decoder's wait).

    With ``pace_generation`` the turn's token reader waits while its listener is far ahead
    (:meth:`read_delay_s`), so that the engine, which stops generating a stream whose tokens are not
    read, leaves the GPU to the decoder and to the turns that need tokens.

    With ``urgent_in_hand_s`` a later block whose listener, already playing, has less than that in hand
    goes with the first blocks (:meth:`urgent`).

    With ``start_held_early`` a held first block's audio goes out as soon as the next block, from the
    tokens in so far, is expected in time (:meth:`held_start_in_s`), not once it is decoded: the wait
    is then the amount by which the hold's estimate missed, not the next block's whole time.

    ``cover_start``, ``pace_generation``, ``urgent_in_hand_s``, ``start_held_early`` and the quick
    start's two settings have no defaults here: the pipeline passes its
    :class:`~glm4voice.pipeline.chat.PipelineConfig`'s, which is where the defaults live."""

    def __init__(
        self,
        load: SharedLoad,
        *,
        first_block: int,
        hold_back_s: float,
        min_block_tokens: int,
        player_lead_s: float,
        schedule: BlockSchedule | None = None,
        cover_start: bool,
        pace_generation: bool,
        quick_start_max_turns: int,
        quick_start_counts_unheard: bool,
        urgent_in_hand_s: float,
        start_held_early: bool,
    ):
        self.load = load
        self.start_held_early = start_held_early
        self.held_at_tokens: int | None = None
        """:attr:`tokens` when the first block was held back (None: not held)."""
        self.urgent_in_hand_s = urgent_in_hand_s
        self.schedule = schedule or BlockSchedule()
        self.quick_start_max_turns = quick_start_max_turns
        self.quick_start_counts_unheard = quick_start_counts_unheard
        self.cover_start = cover_start
        self.pace_generation = pace_generation
        self.paused_s = 0.0
        """Time the turn's reader has waited so far."""
        self.paced_rate: float | None = None
        """The token rate before the reader first waited (afterwards tokens the engine generated during a
        wait arrive at once, and would overstate it)."""
        self.first_block = first_block
        self.hold_back_s = hold_back_s
        self.min_block_tokens = min_block_tokens
        self.player_lead_s = player_lead_s
        self.tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def token(self, now: float) -> None:
        self.tokens += 1
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    def rate(self) -> float | None:
        """Tokens per second of this answer so far (None: fewer than two tokens, or no time between)."""
        if self.first_token_at is None or self.last_token_at is None or self.tokens < 2:
            return None
        elapsed = self.last_token_at - self.first_token_at
        return (self.tokens - 1) / elapsed if elapsed > 0 else None

    @property
    def quick_start(self) -> bool:
        """The first block is shorter than its audio run by at least one decodable block."""
        return AUDIO_TOKENS_PER_SEGMENT - self.first_block >= self.min_block_tokens

    def hold_first_block(self, now: float) -> bool:
        if not self.quick_start:
            return False
        late_s = self._next_block_late_s(0)
        held = self._many_starting() or (late_s is not None and late_s > 0)
        self.held_at_tokens = self.tokens if held else None
        return held

    def held_start_in_s(self, now: float) -> float | None:
        """With ``start_held_early``: how long after ``now`` the next block, generated at the answer's
        measured rate from the tokens in so far, is expected to reach the listener in time (the first
        chunk's cover as in :meth:`hold_first_block`); None while more than ``quick_start_max_turns``
        turns are starting, or without a measured rate."""
        if not self.start_held_early or self.held_at_tokens is None or self._many_starting():
            return None
        return self._next_block_late_s(self.tokens - self.held_at_tokens)

    def _many_starting(self) -> bool:
        starting = self.load.unheard_turns if self.quick_start_counts_unheard else self.load.active_turns
        return starting > self.quick_start_max_turns

    def _next_block_late_s(self, generated: int) -> float | None:
        """How much later than a quick first chunk sent now covers (its audio less the decoder's
        ``hold_back_s``, plus the player's lead) the next block, with ``generated`` of its tokens in, is
        expected to be decoded: the rest of the first audio run at the measured token rate, one
        decoder call to wait for and one to run, and :data:`QUICK_START_MARGIN_S` (None: no rate)."""
        rate = self.rate()
        if rate is None:
            return None
        rest_s = max(0, AUDIO_TOKENS_PER_SEGMENT - self.first_block - generated) / rate
        chunk_s = self.first_block / SPEECH_TOKEN_RATE - self.hold_back_s
        decoder_s = self.load.decoder_wait_s() or 0.0
        return rest_s + 2 * decoder_s + QUICK_START_MARGIN_S - (chunk_s + self.player_lead_s)

    @property
    def paces_reading(self) -> bool:
        return self.pace_generation

    def decoder_s(self) -> float:
        """Time from handing a block to the decoder to its audio: one call to wait for and one to run,
        or a round of every running turn's next block, whichever is longer (under load each turn's
        blocks wait for the others')."""
        return max(2 * (self.load.decoder_wait_s() or 0.0), self.load.decoder_round_s() or 0.0)

    def read_delay_s(self, now: float, first_audio_at: float | None, audio_cut: int, pending: int, next_block: int) -> float:  # fmt: skip
        """With ``pace_generation``, once the listener has started: how long the listener's audio in hand
        (the audio cut, less the decoder's ``hold_back_s`` and what has played since the first audio
        and the player's lead) exceeds, by more than :data:`PACE_SLACK_S`, what the next block needs:
        its missing tokens at the answer's token rate before the reader first waited, and the decoder's
        time (:meth:`decoder_s`). Pauses shorter than :data:`MIN_PACE_PAUSE_S` are not taken."""
        if not self.pace_generation or first_audio_at is None:
            return 0.0
        rate = self.paced_rate or self.rate()
        if rate is None:
            return 0.0
        in_hand_s = self.in_hand_s(now, first_audio_at, audio_cut)
        missing_s = max(0, next_block - pending) * TOKENS_PER_AUDIO_TOKEN / rate
        delay = in_hand_s - missing_s - self.decoder_s() - PACE_SLACK_S
        return delay if delay >= MIN_PACE_PAUSE_S else 0.0

    def in_hand_s(self, now: float, first_audio_at: float, audio_cut: int) -> float:
        """Audio a listener that started at ``first_audio_at`` has left ``now``: the ``audio_cut`` audio
        tokens, less the decoder's ``hold_back_s`` and what has played since (after the player's lead)."""
        played_s = max(0.0, now - first_audio_at - self.player_lead_s)
        return audio_cut / SPEECH_TOKEN_RATE - self.hold_back_s - played_s

    def due_in_s(self, now: float, first_audio_at: float | None, audio_cut: int) -> float | None:
        """Once the listener has started: its audio in hand (:meth:`in_hand_s`)."""
        return None if first_audio_at is None else self.in_hand_s(now, first_audio_at, audio_cut)

    def urgent(self, now: float, first_audio_at: float | None, audio_cut: int) -> bool:
        """With ``urgent_in_hand_s`` (0: never), once the listener has started: whether it has less than
        that in hand (:meth:`in_hand_s`)."""
        due_in = self.due_in_s(now, first_audio_at, audio_cut)
        return bool(self.urgent_in_hand_s) and due_in is not None and due_in < self.urgent_in_hand_s

    def paused(self, seconds: float) -> None:
        if self.paced_rate is None:
            self.paced_rate = self.rate()
        self.paused_s += seconds

    def start_covered(self, now: float, cut: Sequence[int]) -> bool:
        """Whether a listener started now hears every block within :data:`START_HORIZON_S` of the answer
        without a gap: each later block of the schedule (sizes from ``len(cut)`` on; early cuts only make
        blocks smaller, so sooner) is generated at the answer's measured token rate and decoded before
        the audio ahead of it, less the decoder's ``hold_back_s`` and plus the player's lead, has
        played. Decoding takes one decoder call to wait for and one to run, or a round of every running
        turn's next block, whichever is longer (under load each turn's blocks wait for the others').
        Always true without ``cover_start`` or a measured rate."""
        rate = self.rate()
        if not self.cover_start or rate is None:
            return True
        audio_rate = rate / TOKENS_PER_AUDIO_TOKEN  # audio tokens per second
        decoder_s = self.decoder_s()
        have = before = sum(cut)  # audio tokens generated and cut; those ahead of the next block
        index = len(cut)
        while before / SPEECH_TOKEN_RATE < START_HORIZON_S:
            size = self.schedule.size(index)
            ready_s = (before + size - have) / audio_rate + decoder_s + QUICK_START_MARGIN_S
            if ready_s > before / SPEECH_TOKEN_RATE - self.hold_back_s + self.player_lead_s:
                return False
            before += size
            index += 1
        return True
