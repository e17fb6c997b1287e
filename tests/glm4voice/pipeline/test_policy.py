"""Cuts and pacing as units: a synthetic answer (real ids through the real demultiplexer) under
synthetic clocks, with a simulated decoder and listener (no model, no server, no real time)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from glm4voice.audio import SPEECH_TOKEN_RATE
from glm4voice.pipeline.policy import (
    MIN_PACE_PAUSE_S,
    MIN_TOKEN_RATE,
    PACE_SLACK_S,
    QUICK_START_MARGIN_S,
    QUICK_START_MAX_TURNS,
    REAL_TIME_TOKEN_RATE,
    TOKENS_PER_AUDIO_TOKEN,
    URGENT_IN_HAND_S,
    AdaptiveBlocks,
    BlockPacing,
    BlockPolicy,
    DemuxState,
    FixedBlocks,
    ListenerPacing,
    TokenKind,
    cut_and_demux,
)
from glm4voice.protocol import AUDIO_TOKENS_PER_SEGMENT, TEXT_TOKENS_PER_SEGMENT, AudioBlock, BlockSchedule, Demuxer

SCHEDULE = BlockSchedule((10, 20, 40, 80, 160))
HOLD_BACK_S = 35 * 256 / 22050
"""The published decoder's hold-back (34 overlap frames and the vocoder's carried frame)."""
MIN_BLOCK = 10
LEAD_S = 0.15
TEXT, AUDIO, STOP = TokenKind.TEXT, TokenKind.AUDIO, TokenKind.STOP


@dataclass
class Load:
    """A SharedLoad: what the pacing may know of the other turns."""

    active_turns: int = 1
    wait_s: float | None = None
    unheard_turns: int = 1

    round_s: float | None = None

    def decoder_wait_s(self) -> float | None:
        return self.wait_s

    def decoder_round_s(self) -> float | None:
        return self.round_s


def answer(special, text_tokenizer, audio_seconds: float) -> list[int]:
    """Ids of an answer in the 13 text / 26 audio interleave with ``audio_seconds`` of audio, then ``<|user|>``."""
    text = (text_tokenizer.encode("Sure, here is a short answer for you today my friend, and more") * 4)[:13]
    ids, audio = [], 0
    while audio < round(audio_seconds * SPEECH_TOKEN_RATE):
        run = min(AUDIO_TOKENS_PER_SEGMENT, round(audio_seconds * SPEECH_TOKEN_RATE) - audio)
        ids += text + [special.audio_id((7 * (audio + k)) % 1000) for k in range(run)]
        audio += run
    return ids + [special.user]


def adaptive(schedule: BlockSchedule = SCHEDULE, **options) -> AdaptiveBlocks:
    return AdaptiveBlocks(
        schedule, hold_back_s=HOLD_BACK_S, min_block_tokens=MIN_BLOCK, player_lead_s=LEAD_S, **options
    )


def pacing(load: Load, first_block: int = SCHEDULE.sizes[0], lead_s: float = LEAD_S, **options) -> ListenerPacing:
    """A listener's pacing; covered starts, paced generation, urgent blocks and early starts of held first
    blocks off unless ``options`` turn them on."""
    options = {
        "cover_start": False,
        "pace_generation": False,
        "quick_start_max_turns": QUICK_START_MAX_TURNS,
        "quick_start_counts_unheard": False,
        "urgent_in_hand_s": 0.0,
        "start_held_early": False,
        **options,
    }
    return ListenerPacing(load, first_block=first_block, hold_back_s=HOLD_BACK_S, min_block_tokens=MIN_BLOCK,
                          player_lead_s=lead_s, schedule=SCHEDULE, **options)  # fmt: skip


def cuts(policy: BlockPolicy, ids: list[int], special, text_tokenizer) -> list[int]:
    """The sizes of the blocks ``policy`` cuts ``ids`` into (no clock anywhere)."""
    demuxer = Demuxer(text_tokenizer, special, policy.demuxer_schedule)
    sizes = []
    for token_id in ids:
        for event in cut_and_demux(token_id, TokenKind.of(token_id, special), demuxer, policy):
            if isinstance(event, AudioBlock):
                sizes.append(len(event.codes))
        if demuxer.finished:
            break
    return sizes


@dataclass
class Run:
    """What a simulated turn did: the blocks as cut, as decoded, and what its listener heard."""

    cut: list[int]
    decoded: list[int] = field(default_factory=list)
    held_first: bool = False
    decode_started: list[float] = field(default_factory=list)
    first_audio: float | None = None
    underruns: int = 0


def simulate(policy, block_pacing, ids, special, text_tokenizer, token_times, decode_s) -> Run:
    """Drive a turn as :class:`VoiceChat` does, on a synthetic clock: token ``k`` arrives at
    ``token_times[k]``; the pacing may hold the first block until the next is cut; a decoder job
    takes every block cut by the time it starts and decodes them one after another, in order, each in
    ``decode_s(size)`` seconds; each block's PCM (less the decoder's hold-back, but for the last one)
    goes to a player that starts ``LEAD_S`` after the first PCM the pacing lets out (after a job, once
    :meth:`~ListenerPacing.start_covered` says so, or with the last block)."""
    demuxer = Demuxer(text_tokenizer, special, policy.demuxer_schedule)
    blocks: list[tuple[int, float]] = []  # (size, cut at)
    hold_first = False
    for token_id, now in zip(ids, token_times):
        block_pacing.token(now)
        for event in cut_and_demux(token_id, TokenKind.of(token_id, special), demuxer, policy):
            if isinstance(event, AudioBlock):
                blocks.append((len(event.codes), now))
                if len(blocks) == 1:
                    hold_first = block_pacing.hold_first_block(now)
        if demuxer.finished:
            end_at = now
            break
    run = Run([size for size, _ in blocks], held_first=hold_first)
    pcm: list[tuple[float, float]] = []  # (when, audio playable so far)
    free, k, total = 0.0, 0, 0
    while k < len(blocks):
        start = max(free, blocks[k][1])
        if k == 0 and hold_first:
            start = max(start, blocks[1][1] if len(blocks) > 1 else end_at)
        job_end = k + 1
        while job_end < len(blocks) and blocks[job_end][1] <= start:
            job_end += 1
        for size, _ in blocks[k:job_end]:
            free = max(free, start) + decode_s(size)
            total += size
            last = len(run.decoded) == len(blocks) - 1
            pcm.append((free, total / SPEECH_TOKEN_RATE - (0 if last else HOLD_BACK_S)))
            run.decoded.append(size)
            run.decode_started.append(start)
        k = job_end
        if run.first_audio is None and (k == len(blocks) or block_pacing.start_covered(free, run.decoded)):
            run.first_audio = free
    play_from, heard = run.first_audio + LEAD_S, 0.0
    for when, playable in pcm:
        when = max(when, run.first_audio)  # audio kept back goes out with the first audio
        if when > play_from + heard:  # the player ran dry; it restarts now
            run.underruns += 1
            play_from = when - heard
        heard = playable
    return run


def steady(rate: float):
    return [k / rate for k in range(10_000)]


def bursty(burst: int, pause_s: float):
    """Bursts of ``burst`` tokens at once, ``pause_s`` apart (a server stalled by others' prefills)."""
    return [(k // burst) * pause_s for k in range(10_000)]


# --- cuts ---------------------------------------------------------------------------------------------


def test_fixed_blocks_follow_the_schedule(special_tokens, text_tokenizer):
    ids = answer(special_tokens, text_tokenizer, 52 / SPEECH_TOKEN_RATE)
    policy = FixedBlocks(SCHEDULE)
    assert policy.demuxer_schedule == SCHEDULE and policy.first_block_sizes == (10,)
    assert cuts(policy, ids, special_tokens, text_tokenizer) == [10, 20, 22]


def test_young_answers_are_cut_at_every_audio_runs_end_then_blocks_grow(special_tokens, text_tokenizer):
    """A 60 s answer planned for a 37.5 tok/s listener: the quick first block (10), the rest of the
    first run (16), whole runs while the listener would otherwise run dry before the next run's end;
    then blocks of two and four runs as the audio in hand grows (each cut only when waiting for the
    next run's end would leave too little), then the schedule's 160-token blocks. Blocks never
    shrink but the last: every cut costs a decoder call over the block's prompt, so the fewest cuts
    that keep the listener supplied. At the default rate (three times real time) the blocks grow
    sooner."""
    ids = answer(special_tokens, text_tokenizer, 60)
    blocks = cuts(adaptive(min_token_rate=37.5), ids, special_tokens, text_tokenizer)
    assert blocks == [10, 16, 26, 26, 52, 104, 160, 160, 160, 36]
    assert blocks[1:-1] == sorted(blocks[1:-1])
    assert cuts(adaptive(), ids, special_tokens, text_tokenizer) == [10, 16, 26, 80, 160, 160, 160, 138]
    assert adaptive().first_block_sizes == (10,)
    # a lower planning rate cuts more, smaller blocks; a higher one fewer
    slower = cuts(adaptive(min_token_rate=25.0), ids, special_tokens, text_tokenizer)
    faster = cuts(adaptive(min_token_rate=120.0), ids, special_tokens, text_tokenizer)
    assert len(faster) < len(blocks) < len(slower) and sum(faster) == sum(slower) == sum(blocks) == 750


def test_the_first_block_is_never_cut_early(special_tokens, text_tokenizer):
    """A first size past the first audio run: the first block spans the text run (its size is what
    the decoder warmed up for); with its 3 s in hand the next waits for its scheduled size (here: the
    end of the answer)."""
    ids = answer(special_tokens, text_tokenizer, 8)
    policy = adaptive(BlockSchedule((40, 60)))
    assert policy.first_block_sizes == (40,)
    assert cuts(policy, ids, special_tokens, text_tokenizer) == [40, 60]


def test_early_cut_decisions():
    state = DemuxState  # (pending_audio, blocks_emitted)
    policy = adaptive()
    assert not policy.before_token(AUDIO, state(0, 0))
    assert not policy.before_token(TEXT, state(MIN_BLOCK, 0))  # a run ends before the first block: never
    policy.block_out(10)
    policy.before_token(AUDIO, state(MIN_BLOCK, 1))
    assert not policy.before_token(AUDIO, state(MIN_BLOCK, 1))  # inside an audio run: never
    assert policy.before_token(TEXT, state(MIN_BLOCK, 1))  # a run ends, little in hand: cut
    assert not policy.before_token(TEXT, state(MIN_BLOCK, 1))  # inside a text run: never
    policy.before_token(AUDIO, state(0, 2))
    assert not policy.before_token(TEXT, state(MIN_BLOCK - 1, 2))  # below the decoder's smallest block
    policy.before_token(AUDIO, state(MIN_BLOCK, 2))
    assert not policy.before_token(STOP, state(MIN_BLOCK, 2))  # the end of the turn flushes anyway
    # plenty in hand: no early cut; the same question later, when the planned buffer has played, cuts
    rich = adaptive()
    rich.block_out(200)
    assert rich.in_hand_s() == pytest.approx(200 / SPEECH_TOKEN_RATE - HOLD_BACK_S + LEAD_S)
    rich.before_token(AUDIO, state(MIN_BLOCK, 3))
    assert not rich.before_token(TEXT, state(MIN_BLOCK, 3))
    for _ in range(int(15 * MIN_TOKEN_RATE)):  # 15 s on the planning clock
        rich.before_token(TEXT, state(0, 3))
    rich.before_token(AUDIO, state(MIN_BLOCK, 3))
    assert rich.before_token(TEXT, state(MIN_BLOCK, 3))
    with pytest.raises(ValueError, match="min_token_rate"):
        adaptive(min_token_rate=0)


# --- cuts never depend on timing; the pacing does ----------------------------------------------------


TIMINGS = {
    # name: (token arrival times, decoder seconds per block of n tokens, turns running)
    "fast": (steady(1000.0), lambda n: 0.01, 1),
    "slow tokens": (steady(1.1 * REAL_TIME_TOKEN_RATE), lambda n: 0.05, 1),
    "bursty": (bursty(10, 0.5), lambda n: 0.05, 1),
    "decoder takes seconds": (steady(120.0), lambda n: 2.0 + 0.01 * n, 1),
    "crowded": (steady(50.0), lambda n: 0.2, QUICK_START_MAX_TURNS + 1),
}


@pytest.mark.parametrize("make_policy", [adaptive, lambda: FixedBlocks(SCHEDULE)], ids=["adaptive", "fixed"])
def test_the_same_tokens_are_cut_the_same_whatever_the_timing(special_tokens, text_tokenizer, make_policy):
    """Wildly different token and decoder timings: the same cuts, decoded in order as cut (held
    blocks are never merged); only when blocks are decoded changes."""
    ids = answer(special_tokens, text_tokenizer, 44)
    runs = {}
    for name, (times, decode_s, turns) in TIMINGS.items():
        load = Load(active_turns=turns, wait_s=decode_s(AUDIO_TOKENS_PER_SEGMENT))
        runs[name] = simulate(make_policy(), pacing(load), ids, special_tokens, text_tokenizer, times, decode_s)
    expected = cuts(make_policy(), ids, special_tokens, text_tokenizer)
    for name, run in runs.items():
        assert run.cut == run.decoded == expected, name
    assert sum(expected) == 44 * SPEECH_TOKEN_RATE
    # the pacing did differ: a quick first block goes at once only when its follow-up can keep up
    assert {name for name, run in runs.items() if run.held_first} == {
        "slow tokens",
        "bursty",
        "decoder takes seconds",
        "crowded",
    }
    held = runs["crowded"]
    assert held.decode_started[0] == held.decode_started[1]  # the first two blocks in one job, in order


@pytest.mark.parametrize("rate", [MIN_TOKEN_RATE, 75.0, 120.0, 1000.0])
@pytest.mark.parametrize("decoder_s", [0.02, 0.25])
def test_a_listener_never_runs_dry_at_the_planned_rate_or_faster(special_tokens, text_tokenizer, rate, decoder_s):
    """The design claim of the cuts: an answer streamed at ``min_token_rate`` or faster, with a decoder
    that answers within the margin, plays without a gap (60 s of audio); the pacing holds the quick
    first block where its follow-up would be late."""
    ids = answer(special_tokens, text_tokenizer, 60)
    load = Load(wait_s=decoder_s)
    run = simulate(adaptive(), pacing(load), ids, special_tokens, text_tokenizer, steady(rate), lambda n: decoder_s)
    assert run.underruns == 0, run


def test_the_schedule_alone_runs_dry_where_the_adaptive_cuts_do_not(special_tokens, text_tokenizer):
    """Why the early cuts: at 50 tok/s the schedule's 20-token second block waits through the text
    run, after the 0.4 s of the quick first block have played."""
    ids = answer(special_tokens, text_tokenizer, 60)
    fixed = simulate(
        FixedBlocks(SCHEDULE), BlockPacing(), ids, special_tokens, text_tokenizer, steady(50.0), lambda n: 0.05
    )
    assert fixed.underruns > 0


# --- pacing -------------------------------------------------------------------------------------------


def feed_tokens(block_pacing: ListenerPacing, rate: float, count: int = TEXT_TOKENS_PER_SEGMENT + 10) -> float:
    for k in range(count):
        block_pacing.token(k / rate)
    return (count - 1) / rate


def test_the_first_block_goes_at_once_when_its_follow_up_keeps_up():
    quick = pacing(Load(wait_s=0.0))
    now = feed_tokens(quick, 100.0)
    assert quick.rate() == pytest.approx(100.0)
    assert not quick.hold_first_block(now)
    assert not BlockPacing().hold_first_block(now)


@pytest.mark.parametrize(
    "load, rate",
    [
        (Load(wait_s=1.0), 100.0),
        (Load(active_turns=QUICK_START_MAX_TURNS + 1, wait_s=0.0), 100.0),
        (Load(wait_s=0.0), 20.0),
    ],
    ids=["slow decoder", "crowded", "slow tokens"],
)
def test_the_first_block_waits_for_the_next_when_it_could_not_follow(load, rate):
    held = pacing(load)
    assert held.hold_first_block(feed_tokens(held, rate))


def test_counting_the_unheard_turns_holds_a_first_block_only_among_turns_starting():
    """``quick_start_counts_unheard``: many turns running whose listeners all hear their answers do
    not hold a quick first block back; many turns starting (nothing heard yet) do, as without it."""
    playing = Load(active_turns=64, unheard_turns=1, wait_s=0.0)
    starting = Load(active_turns=64, unheard_turns=QUICK_START_MAX_TURNS + 1, wait_s=0.0)
    for load, counts_unheard, holds in ((playing, False, True), (playing, True, False), (starting, True, True)):
        quick = pacing(load, quick_start_counts_unheard=counts_unheard)
        assert quick.hold_first_block(feed_tokens(quick, 100.0)) is holds, (load, counts_unheard)


def test_no_hold_without_a_quick_start_or_a_measured_rate():
    # a first block that (nearly) fills its audio run: the next cut is a whole run away, holding only delays
    for first in (AUDIO_TOKENS_PER_SEGMENT - MIN_BLOCK + 1, 25, 40):
        late = pacing(Load(wait_s=5.0), first_block=first)
        assert not late.quick_start and not late.hold_first_block(feed_tokens(late, 10.0))
    unknown = pacing(Load(wait_s=0.0))
    unknown.token(0.0)
    assert unknown.rate() is None and not unknown.hold_first_block(0.0)


def test_the_decoders_hold_back_and_the_players_lead_enter_the_pacing():
    """At the margin: the same clock holds the first block only without the player's lead counted."""
    # rest of the run (16 tokens at rate r) + margin 0.1 must fit in 0.8 - 0.406 (+ lead 0.15)
    rate = 16 / 0.4  # the rest takes 0.4 s: fits with the lead (0.544 s), not without (0.394 s)
    with_lead, without = pacing(Load(wait_s=0.0)), pacing(Load(wait_s=0.0), lead_s=0.0)
    assert not with_lead.hold_first_block(feed_tokens(with_lead, rate))
    assert without.hold_first_block(feed_tokens(without, rate))


def test_a_held_first_block_starts_once_the_next_is_expected_in_time():
    """``start_held_early``: right after the hold, the wait is by how much the next block (16 tokens at
    20 tok/s, two decoder calls of 0.05 s, the margin) misses the first chunk's cover (its audio less
    the hold-back, plus the lead); each token of the next block in shortens it by one token's time, and
    once it is 0 a listener started then hears the next block's audio before the first chunk has
    played, with the margin to spare."""
    rate, wait = 20.0, 0.05
    held = pacing(Load(wait_s=wait), start_held_early=True)
    now = feed_tokens(held, rate)
    assert held.held_start_in_s(now) is None  # not held (yet)
    assert held.hold_first_block(now)
    cover_s = 10 / SPEECH_TOKEN_RATE - HOLD_BACK_S + LEAD_S
    expected = 16 / rate + 2 * wait + QUICK_START_MARGIN_S - cover_s
    assert expected > 0 and held.held_start_in_s(now) == pytest.approx(expected)
    waits = []
    for k in range(1, 17):
        held.token(now + k / rate)
        waits.append(held.held_start_in_s(now + k / rate))
    assert waits == pytest.approx([expected - k / rate for k in range(1, 17)])
    start_k = next(k for k, w in enumerate(waits, start=1) if w <= 0)
    started, next_decoded = now + start_k / rate, now + 16 / rate + 2 * wait
    assert next_decoded + QUICK_START_MARGIN_S <= started + cover_s + 1e-9
    assert next_decoded > started  # it did start before the next block was decoded


def test_a_held_first_block_waits_for_the_next_without_early_starts_or_among_many_starting():
    rate = 20.0
    off = pacing(Load(wait_s=0.05))
    assert off.hold_first_block(feed_tokens(off, rate)) and off.held_start_in_s(99.0) is None
    assert BlockPacing().held_start_in_s(99.0) is None
    crowd = Load(wait_s=0.0, unheard_turns=QUICK_START_MAX_TURNS + 1)
    crowded = pacing(crowd, quick_start_counts_unheard=True, start_held_early=True)
    now = feed_tokens(crowded, 100.0)
    assert crowded.hold_first_block(now) and crowded.held_start_in_s(now) is None
    crowd.unheard_turns = QUICK_START_MAX_TURNS  # the others have started hearing: the estimate counts
    assert crowded.held_start_in_s(now) == pytest.approx(
        16 / 100.0 + QUICK_START_MARGIN_S - (10 / SPEECH_TOKEN_RATE - HOLD_BACK_S + LEAD_S)
    )


# --- covered starts -----------------------------------------------------------------------------------


def test_a_covered_start_waits_until_every_block_in_the_horizon_can_follow():
    """44 tok/s (2.3 times real time) with a decoder round of 1.6 s (64 turns at 25 ms a block): a
    listener started on the first two blocks (2.4 s of audio) would wait for the 40-token block; the
    start is covered once that block is decoded (the 80- and 160-token blocks after it are generated and
    decoded before the audio ahead of them has played; past START_HORIZON_S nothing is checked)."""
    crowded = pacing(Load(active_turns=64, wait_s=0.3, round_s=1.6), cover_start=True)
    now = feed_tokens(crowded, 44.0, count=60)
    assert [crowded.start_covered(now, cut) for cut in ([10], [10, 20])] == [False, False]
    assert crowded.start_covered(now, [10, 20, 40])
    slower_decoder = pacing(Load(active_turns=64, wait_s=0.3, round_s=3.0), cover_start=True)
    assert not slower_decoder.start_covered(feed_tokens(slower_decoder, 44.0, count=60), [10, 20, 40])
    # an answer alone, at a single stream's rate: one decoder call of 50 ms to wait for, one to run
    alone = pacing(Load(wait_s=0.05, round_s=0.05), cover_start=True)
    assert alone.start_covered(feed_tokens(alone, 120.0, count=60), [10])
    # off (the default), no rate yet, or no pacing: the first audio goes out at once
    assert not pacing(Load()).cover_start
    off = pacing(Load(active_turns=64, wait_s=0.3, round_s=1.6))
    assert off.start_covered(feed_tokens(off, 44.0, count=60), [10])
    unknown = pacing(Load(wait_s=0.3, round_s=1.6), cover_start=True)
    assert unknown.rate() is None and unknown.start_covered(0.0, [10])
    assert BlockPacing().start_covered(0.0, [10])


def test_a_covered_start_bounds_its_wait_for_an_answer_slower_than_real_time():
    """At 0.8 times real time no start keeps every later block in time; the check looks
    START_HORIZON_S into the audio, so enough audio in hand still starts the listener."""
    slow = pacing(Load(wait_s=0.05, round_s=0.05), cover_start=True)
    now = feed_tokens(slow, 0.8 * REAL_TIME_TOKEN_RATE, count=60)
    assert not slow.start_covered(now, [10, 20, 40])
    assert slow.start_covered(now, [10, 20, 40, 80, 160])  # 24.8 s in hand: past the horizon


@pytest.mark.parametrize("rate", [40.0, 56.25])
def test_a_covered_start_trades_time_to_first_audio_for_no_gap(special_tokens, text_tokenizer, rate):
    """A turn among many: tokens at two to three times real time, each block waiting 2 s for the
    decoder (a round of the other turns' blocks). Started on its first block the listener runs dry;
    covered, it starts later and hears the 60 s answer without a gap. The cuts and the decoding are
    the same either way: only the audio is kept back."""
    ids = answer(special_tokens, text_tokenizer, 60)
    load = Load(active_turns=QUICK_START_MAX_TURNS, wait_s=1.0, round_s=2.0)

    def run(cover: bool) -> Run:
        block_pacing = pacing(load, cover_start=cover)
        return simulate(adaptive(), block_pacing, ids, special_tokens, text_tokenizer, steady(rate), lambda n: 2.0)

    runs = {cover: run(cover) for cover in (False, True)}
    assert runs[False].underruns > 0 and runs[True].underruns == 0
    assert runs[True].first_audio > runs[False].first_audio
    assert runs[True].cut == runs[False].cut and runs[True].decode_started == runs[False].decode_started


# --- paced generation ---------------------------------------------------------------------------------


def test_a_paced_reader_waits_only_while_its_listener_is_far_ahead():
    """100 tok/s, 160 tokens cut (12.8 s), the next 160-token block just begun: 1 s after the first
    audio the listener has 12.8 - hold-back - 0.85 s in hand, the next block needs 2.4 s of tokens and
    0.2 s of decoder: the reader may wait for what is left beyond PACE_SLACK_S. Less in hand (later,
    or a block nearly complete that still misses tokens), it reads on."""
    paced = pacing(Load(wait_s=0.1, round_s=0.05), pace_generation=True)
    feed_tokens(paced, 100.0, count=50)
    in_hand = 160 / SPEECH_TOKEN_RATE - HOLD_BACK_S - (1.0 - LEAD_S)
    missing = 160 * TOKENS_PER_AUDIO_TOKEN / 100.0
    expected = in_hand - missing - 0.2 - PACE_SLACK_S
    assert expected > MIN_PACE_PAUSE_S
    assert paced.read_delay_s(11.0, 10.0, 160, 0, 160) == pytest.approx(expected)
    # the same state later: the wait shrinks as the audio plays, down to below the shortest pause worth taking
    assert paced.read_delay_s(13.5, 10.0, 160, 0, 160) == pytest.approx(expected - 2.5)
    assert paced.read_delay_s(11.0 + expected - MIN_PACE_PAUSE_S + 0.1, 10.0, 160, 0, 160) == 0.0
    # the next block complete but for 20 tokens: it needs less, so the wait is longer
    assert paced.read_delay_s(11.0, 10.0, 160, 140, 160) > expected
    # before the first audio, without pacing, or without a rate: no wait
    assert paced.read_delay_s(11.0, None, 160, 0, 160) == 0.0
    plain = pacing(Load(wait_s=0.1, round_s=0.05))
    feed_tokens(plain, 100.0, count=50)
    assert plain.read_delay_s(11.0, 10.0, 160, 0, 160) == 0.0
    assert pacing(Load(), pace_generation=True).read_delay_s(11.0, 10.0, 160, 0, 160) == 0.0
    assert BlockPacing().read_delay_s(11.0, 10.0, 160, 0, 160) == 0.0
    assert paced.paces_reading and not plain.paces_reading and not BlockPacing().paces_reading


def test_a_later_block_is_urgent_once_its_listener_has_little_left():
    """26 audio tokens cut (2.08 s), the listener started at 10.0 s: what it has left is that less the
    decoder's hold-back and what played after the player's lead; the next block is urgent once that is
    below ``urgent_in_hand_s``, never before the listener starts, and never with 0."""
    urgent = pacing(Load(), urgent_in_hand_s=URGENT_IN_HAND_S)
    in_hand = 26 / SPEECH_TOKEN_RATE - HOLD_BACK_S  # until the player's lead has passed
    assert urgent.in_hand_s(10.0, 10.0, 26) == pytest.approx(in_hand)
    assert urgent.in_hand_s(10.0 + LEAD_S, 10.0, 26) == pytest.approx(in_hand)
    assert urgent.in_hand_s(10.5 + LEAD_S, 10.0, 26) == pytest.approx(in_hand - 0.5)
    edge = 10.0 + LEAD_S + in_hand - URGENT_IN_HAND_S  # the moment it has URGENT_IN_HAND_S left
    assert [urgent.urgent(edge + dt, 10.0, 26) for dt in (-0.01, 0.01)] == [False, True]
    assert not urgent.urgent(edge + 0.01, 10.0, 26 + 13)  # a second more audio cut: not yet
    assert not urgent.urgent(99.0, None, 26)  # the listener has not started (nothing to run out of)
    assert not pacing(Load()).urgent(99.0, 10.0, 26) and not BlockPacing().urgent(99.0, 10.0, 26)
    # when the listener runs out of the audio handed out (a queued finish's ``due``): that audio in hand
    assert urgent.due_in_s(10.5 + LEAD_S, 10.0, 26) == pytest.approx(in_hand - 0.5)
    assert urgent.due_in_s(99.0, None, 26) is None and BlockPacing().due_in_s(11.0, 10.0, 26) is None


def test_a_paced_reader_keeps_the_rate_it_measured_before_its_first_wait():
    """Tokens the engine generated while the reader waited arrive at once; the rate used afterwards is
    the one measured before the first wait."""
    paced = pacing(Load(wait_s=0.1, round_s=0.05), pace_generation=True)
    now = feed_tokens(paced, 100.0, count=50)
    before = paced.read_delay_s(now + 1.0, now, 160, 0, 160)
    paced.paused(2.0)
    for _ in range(40):  # a burst read after the wait
        paced.token(now + 3.0)
    assert paced.paused_s == 2.0 and paced.paced_rate == pytest.approx(100.0)
    assert paced.read_delay_s(now + 1.0, now, 160, 0, 160) == pytest.approx(before)
