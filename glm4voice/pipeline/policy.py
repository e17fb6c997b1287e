"""Block policies: when the audio a turn has received becomes a block for the speech decoder.

The demultiplexing loop of a turn (:class:`glm4voice.pipeline.VoiceChat`) cuts audio tokens into
blocks by a :class:`glm4voice.protocol.BlockSchedule` and consults a :class:`BlockPolicy` at every
token: before the token is demultiplexed ("flush the pending audio first?") and after it ("flush
now?"). The policy is told what it needs and nothing more: the token's kind and arrival time, what
the demultiplexer holds (:class:`DemuxState`), the blocks handed to the decoder, when the first
audio came out of the decoder, and, through the narrow :class:`SharedLoad`, how many turns run
and how long a decoder call takes. A policy never drives the demultiplexer or the pipeline itself.

- :class:`FixedBlocks`: never flushes early: blocks are exactly the schedule, as the original.
- :class:`AdaptiveBlocks`: follows the listener's buffer (a quick first block when sustainable,
  early flushes when the buffer runs low at the end of an audio run).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from glm4voice.audio import SPEECH_TOKEN_RATE
from glm4voice.protocol import AUDIO_TOKENS_PER_SEGMENT, TEXT_TOKENS_PER_SEGMENT, BlockSchedule

EARLY_FLUSH_MARGIN_S = 0.5
"""Time kept in hand for decoding a block under load when deciding on an early flush."""
QUICK_START_MARGIN_S = 0.1
"""Slack required on top of the estimated time until the second block plays."""
QUICK_START_MAX_TURNS = 8
"""A quick first block only while at most this many turns run: many turns starting together share
the decoder's calls, and a short first chunk then runs dry before the next block arrives
(bench/e2e.py's concurrency section; docs/PERFORMANCE.md, "Adaptive blocks")."""


class TokenKind(enum.Enum):
    TEXT = "text"
    AUDIO = "audio"
    STOP = "stop"
    """A token that ends the turn (``<|user|>`` and the other eos ids)."""


@dataclass(frozen=True)
class DemuxState:
    """What the demultiplexer holds when a policy is consulted."""

    pending_audio: int
    """Audio tokens received but not yet in a block."""
    blocks_emitted: int
    """Blocks handed out so far (the next block's index in the schedule)."""


class SharedLoad(Protocol):
    """What a turn's policy may know about everything else the pipeline runs."""

    @property
    def active_turns(self) -> int:
        """Turns running now, this one included."""
        ...

    def decoder_wait_s(self) -> float | None:
        """Expected duration of the decoder call a new block joins (None: not measured yet)."""
        ...


class BlockPolicy:
    """Decides when pending audio becomes a block ahead of the schedule. One instance per turn.

    The defaults flush nothing early: the demultiplexer cuts blocks by ``demuxer_schedule``."""

    def __init__(self, schedule: BlockSchedule):
        self.schedule = schedule
        """The block sizes the turn asked for."""

    @property
    def demuxer_schedule(self) -> BlockSchedule:
        """The schedule the demultiplexer cuts by on its own (blocks flushed early come on top)."""
        return self.schedule

    @property
    def first_block_sizes(self) -> tuple[int, ...]:
        """Every size a turn's first block can have (the decoder captures a graph for each ahead)."""
        return tuple(sorted({self.schedule.sizes[0], self.demuxer_schedule.sizes[0]}))

    def before_token(self, now: float, kind: TokenKind, demux: DemuxState) -> bool:
        """A token arrived at ``now`` (s since the turn began; called once per token, before the
        token is demultiplexed). True: hand out the pending audio as a block first."""
        return False

    def after_token(self, now: float, kind: TokenKind, demux: DemuxState) -> bool:
        """The token was demultiplexed. True: hand out the pending audio as a block now."""
        return False

    def block_out(self, codes: int) -> None:
        """A block of ``codes`` audio tokens went to the decoder."""

    def audio_started(self, now: float) -> None:
        """The turn's first PCM came out of the decoder at ``now`` (the listener starts hearing it)."""


class FixedBlocks(BlockPolicy):
    """The original's policy: blocks of the schedule's sizes, whatever the load."""


class AdaptiveBlocks(BlockPolicy):
    """Block sizes that follow the listener's buffer.

    Audio in hand = the tokens handed to the decoder, less what the decoder holds back
    (``hold_back_s``), less what has played since the first PCM. Waiting for a block costs its
    missing audio tokens plus the text tokens of the interleave (13 per 26 audio) at the answer's
    measured token rate.

    - Quick start: the first block is ``schedule.sizes[0]`` tokens only if the rest of the first
      audio run can be generated and decoded before that short chunk and the player's lead
      (``player_lead_s``) have played, and at most :data:`QUICK_START_MAX_TURNS` turns run;
      otherwise it is the whole first audio run, which keeps many simultaneous listeners gapless.
    - Early flush: when an audio run ends (a text token follows audio) and the audio in hand would
      not last until the next block at its scheduled size, the pending audio (at least
      ``min_block_tokens``) is decoded at once instead of waiting through the text run.
    """

    def __init__(
        self,
        schedule: BlockSchedule,
        load: SharedLoad,
        *,
        hold_back_s: float,
        min_block_tokens: int,
        player_lead_s: float,
    ):
        super().__init__(schedule)
        self.load = load
        self.hold_back_s = hold_back_s
        self.min_block_tokens = min_block_tokens
        self.player_lead_s = player_lead_s
        self.quick = schedule.sizes[0]
        self.tokens = 0
        self.first_token_at: float | None = None
        self.first_audio_at: float | None = None
        self.audio_tokens_out = 0
        self.after_audio = False

    @property
    def demuxer_schedule(self) -> BlockSchedule:
        """A first block of a whole audio run (a quick one is cut by :meth:`after_token`)."""
        sizes = self.schedule.sizes
        return BlockSchedule((max(sizes[0], AUDIO_TOKENS_PER_SEGMENT),) + tuple(sizes[1:]))

    def before_token(self, now: float, kind: TokenKind, demux: DemuxState) -> bool:
        self.tokens += 1
        if self.first_token_at is None:
            self.first_token_at = now
        flush = False
        if kind is TokenKind.TEXT and self.after_audio:  # an audio run ends
            flush = self._should_flush(now, demux.pending_audio, self.schedule.size(demux.blocks_emitted))
        self.after_audio = kind is TokenKind.AUDIO
        return flush

    def after_token(self, now: float, kind: TokenKind, demux: DemuxState) -> bool:
        first_block_due = kind is TokenKind.AUDIO and demux.blocks_emitted == 0 and demux.pending_audio == self.quick
        return first_block_due and self._quick_start(now)

    def block_out(self, codes: int) -> None:
        self.audio_tokens_out += codes

    def audio_started(self, now: float) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = now

    # --- estimates ------------------------------------------------------------------------------------
    def rate(self, now: float) -> float | None:
        """Tokens per second of this answer so far (None: fewer than two tokens)."""
        elapsed = 0.0 if self.first_token_at is None else now - self.first_token_at
        return (self.tokens - 1) / elapsed if self.tokens >= 2 and elapsed > 0 else None

    def in_hand_s(self, now: float) -> float:
        """Seconds of audio the listener has left before playback runs dry."""
        played = 0.0 if self.first_audio_at is None else now - self.first_audio_at
        return self.audio_tokens_out / SPEECH_TOKEN_RATE - self.hold_back_s - played

    def _should_flush(self, now: float, pending: int, scheduled: int) -> bool:
        if pending < self.min_block_tokens:
            return False
        rate = self.rate(now)
        if rate is None:
            return True
        per_audio = (TEXT_TOKENS_PER_SEGMENT + AUDIO_TOKENS_PER_SEGMENT) / AUDIO_TOKENS_PER_SEGMENT
        wait_s = (TEXT_TOKENS_PER_SEGMENT + (scheduled - pending) * per_audio) / rate
        return self.in_hand_s(now) < wait_s + EARLY_FLUSH_MARGIN_S

    def _quick_start(self, now: float) -> bool:
        if self.load.active_turns > QUICK_START_MAX_TURNS:
            return False
        rate = self.rate(now)
        if rate is None:
            return True
        rest_s = (AUDIO_TOKENS_PER_SEGMENT - self.quick) / rate
        chunk_s = self.quick / SPEECH_TOKEN_RATE - self.hold_back_s
        decoder_s = self.load.decoder_wait_s() or 0.0  # one call to wait for, one to run
        return rest_s + 2 * decoder_s + QUICK_START_MARGIN_S <= chunk_s + self.player_lead_s
