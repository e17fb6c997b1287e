"""Block policies as units: fed a synthetic token sequence with a synthetic clock (no model, no server)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from glm4voice.audio import SPEECH_TOKEN_RATE
from glm4voice.pipeline.policy import (
    QUICK_START_MAX_TURNS,
    AdaptiveBlocks,
    BlockPolicy,
    DemuxState,
    FixedBlocks,
    TokenKind,
)
from glm4voice.protocol import AUDIO_TOKENS_PER_SEGMENT, TEXT_TOKENS_PER_SEGMENT, BlockSchedule

SCHEDULE = BlockSchedule((10, 20, 40, 80, 160))
HOLD_BACK_S = 0.4
MIN_BLOCK = 10
LEAD_S = 0.15
TEXT, AUDIO, STOP = TokenKind.TEXT, TokenKind.AUDIO, TokenKind.STOP
TWO_SEGMENTS = ([TEXT] * TEXT_TOKENS_PER_SEGMENT + [AUDIO] * AUDIO_TOKENS_PER_SEGMENT) * 2 + [STOP]
"""An answer of two interleave segments (13 text, 26 audio each), then the end of the turn."""


@dataclass
class Load:
    """A SharedLoad: what the policy may know of the other turns."""

    active_turns: int = 1
    wait_s: float | None = None

    def decoder_wait_s(self) -> float | None:
        return self.wait_s


class CountingDemux:
    """The demultiplexer's audio bookkeeping: audio tokens cut into blocks by a schedule."""

    def __init__(self, schedule: BlockSchedule):
        self.schedule = schedule
        self.pending = 0
        self.blocks: list[int] = []

    def state(self) -> DemuxState:
        return DemuxState(self.pending, len(self.blocks))

    def flush(self) -> None:
        if self.pending:
            self.blocks.append(self.pending)
            self.pending = 0

    def feed(self, kind: TokenKind) -> None:
        if kind is AUDIO:
            self.pending += 1
            if self.pending >= self.schedule.size(len(self.blocks)):
                self.flush()
        elif kind is STOP:
            self.flush()


def run(policy: BlockPolicy, kinds: list[TokenKind], token_s: float) -> list[int]:
    """Drive ``policy`` as the demultiplexing loop does: one token every ``token_s`` seconds; the
    decoder is instant (the first PCM comes out when the first block is handed out)."""
    demux = CountingDemux(policy.demuxer_schedule)
    for k, kind in enumerate(kinds):
        now = k * token_s
        out = len(demux.blocks)
        if policy.before_token(now, kind, demux.state()):
            demux.flush()
        demux.feed(kind)
        if policy.after_token(now, kind, demux.state()):
            demux.flush()
        for codes in demux.blocks[out:]:
            policy.block_out(codes)
            policy.audio_started(now)
    demux.flush()
    return demux.blocks


def adaptive(load: Load, schedule: BlockSchedule = SCHEDULE) -> AdaptiveBlocks:
    return AdaptiveBlocks(schedule, load, hold_back_s=HOLD_BACK_S, min_block_tokens=MIN_BLOCK, player_lead_s=LEAD_S)


def test_fixed_blocks_follow_the_schedule_whatever_the_clock():
    for token_s in (0.001, 1.0):
        policy = FixedBlocks(SCHEDULE)
        assert policy.demuxer_schedule == SCHEDULE
        assert run(policy, TWO_SEGMENTS, token_s) == [10, 20, 22]


def test_quick_first_block_then_an_early_flush_when_the_audio_run_ends():
    """100 tokens/s and a quick decoder: a 10-token first block; when the first audio run ends the
    listener has ~0.2 s in hand, less than the wait for the 20-token block, so the 16 pending
    tokens go at once."""
    assert run(adaptive(Load(wait_s=0.0)), TWO_SEGMENTS, 0.01) == [10, 16, 26]


@pytest.mark.parametrize(
    "load", [Load(wait_s=1.0), Load(active_turns=QUICK_START_MAX_TURNS + 1, wait_s=0.0)], ids=["slow", "crowded"]
)
def test_no_quick_start_when_the_next_block_could_not_follow_in_time(load):
    """A slow decoder, or many turns sharing it: the first block is the whole first audio run."""
    policy = adaptive(load)
    assert policy.demuxer_schedule.sizes[0] == AUDIO_TOKENS_PER_SEGMENT
    assert run(policy, TWO_SEGMENTS, 0.01) == [26, 20, 6]


def test_slow_tokens_refuse_the_quick_start():
    """At 20 tokens/s the rest of the first audio run takes 0.8 s: longer than the quick chunk plays."""
    assert run(adaptive(Load(wait_s=0.0)), TWO_SEGMENTS, 0.05)[0] == AUDIO_TOKENS_PER_SEGMENT


def test_early_flush_decisions():
    policy = adaptive(Load())
    assert not policy.before_token(0.0, TEXT, DemuxState(pending_audio=0, blocks_emitted=0))
    assert not policy.before_token(0.0, AUDIO, DemuxState(pending_audio=MIN_BLOCK, blocks_emitted=0))
    # an audio run ends, only one token's rate known: flush what can be decoded
    policy = adaptive(Load())
    policy.before_token(0.0, AUDIO, DemuxState(0, 0))
    assert policy.rate(0.0) is None
    assert policy.before_token(0.0, TEXT, DemuxState(pending_audio=MIN_BLOCK, blocks_emitted=1))
    # never below the decoder's smallest block, never at the end of the turn
    policy = adaptive(Load())
    policy.before_token(0.0, AUDIO, DemuxState(0, 1))
    assert not policy.before_token(0.01, TEXT, DemuxState(pending_audio=MIN_BLOCK - 1, blocks_emitted=1))
    policy.before_token(0.02, AUDIO, DemuxState(0, 1))
    assert not policy.before_token(0.03, STOP, DemuxState(pending_audio=MIN_BLOCK, blocks_emitted=1))


def test_no_early_flush_with_enough_audio_in_hand():
    policy = adaptive(Load())
    policy.before_token(0.0, AUDIO, DemuxState(0, 0))
    policy.block_out(200)  # 16 s handed to the decoder, playback started now
    policy.audio_started(0.01)
    assert policy.in_hand_s(0.01) == pytest.approx(200 / SPEECH_TOKEN_RATE - HOLD_BACK_S)
    assert not policy.before_token(0.01, TEXT, DemuxState(pending_audio=MIN_BLOCK, blocks_emitted=3))
    # 15 s later the buffer has run low: the same question is answered the other way
    policy.before_token(15.0, AUDIO, DemuxState(0, 3))
    assert policy.before_token(15.01, TEXT, DemuxState(pending_audio=MIN_BLOCK, blocks_emitted=3))


def test_the_decoders_hold_back_and_the_players_lead_enter_the_quick_start():
    """At the margin: the same clock gives a quick start only with the player's lead counted."""
    kinds = [AUDIO] * AUDIO_TOKENS_PER_SEGMENT
    # rest of the run (16 tokens at rate r) + margin 0.1 must fit in 0.8 - 0.4 (+ lead 0.15)
    token_s = 0.34 / 16  # the rest takes 0.34 s: fits with the lead (0.55), not without (0.4)
    with_lead = AdaptiveBlocks(SCHEDULE, Load(wait_s=0.0), hold_back_s=HOLD_BACK_S, min_block_tokens=MIN_BLOCK,
                               player_lead_s=LEAD_S)  # fmt: skip
    without = AdaptiveBlocks(SCHEDULE, Load(wait_s=0.0), hold_back_s=HOLD_BACK_S, min_block_tokens=MIN_BLOCK,
                             player_lead_s=0.0)  # fmt: skip
    assert run(with_lead, kinds, token_s)[0] == 10
    assert run(without, kinds, token_s)[0] == AUDIO_TOKENS_PER_SEGMENT
