"""The turn pipeline against a real token server process (tiny checkpoint, CPU), with the real
tiny speech tokenizer and decoder.

The server is ``tests/server/fault_server.py`` (``model_server.py`` with fault injection chosen by
seed) with two streams and no queue, so that holding two streams open makes it answer 503; a second
one with more streams runs several turns at once.
"""

from __future__ import annotations

import asyncio
import math
import threading
from contextlib import aclosing
from dataclasses import dataclass, replace

import httpx
import numpy as np
import pytest

from glm4voice.audio import (
    INPUT_SAMPLE_RATE,
    MEL_HOP_LENGTH,
    OUTPUT_SAMPLE_RATE,
    SPEECH_TOKEN_RATE,
    encode_wav,
    load_audio,
)
from glm4voice.client import AsyncTokenClient, ProtocolError, ServerBusyError, ServerUnavailableError, TokenClient
from glm4voice.pipeline import (
    AssistantAudio,
    AssistantText,
    ChatSession,
    FailureKind,
    GenerationOptions,
    InputAccepted,
    PipelineConfig,
    TokenKind,
    TurnFailed,
    TurnFinished,
    UserSpeech,
    UserText,
    VoiceChat,
    cut_and_demux,
)
from glm4voice.pipeline.policy import (
    QUICK_START_MAX_TURNS,
    SPARE_MAX_TURNS,
    SPARE_STARTING_TOKENS,
    URGENT_IN_HAND_S,
    BlockPacing,
)
from glm4voice.protocol import (
    TEXT_TOKENS_PER_SEGMENT,
    AudioBlock,
    Demuxer,
    EndReason,
    InputMode,
)

from server.fault_server import FAIL_AFTER_SEED, FAIL_AFTER_TOKENS
from support import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow

SAMPLE_EN = ROOT / "resources" / "sample_en.wav"
SLOTS = 2
WIDE_SLOTS = 8
FAST = GenerationOptions(temperature=0.8, top_p=0.9, max_new_tokens=40, seed=11)
"""Short answers: every test turn costs a second or two on a 2-core CPU."""
WAIT_S = 60.0


@dataclass
class Models:
    text_tokenizer: object
    speech_tokenizer: object
    decoder: object


@pytest.fixture(scope="module")
def models(tiny_checkpoints) -> Models:
    from flow_inference import AudioDecoder
    from glm4voice.text_tokenizer import GLMTokenizer
    from speech_tokenizer import SpeechTokenizer

    return Models(
        GLMTokenizer.from_pretrained(tiny_checkpoints.llm),
        SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device="cpu"),
        AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu"),
    )


def _token_server(checkpoints, slots: int):
    port = free_port()
    args = [str(ROOT / "tests/server/fault_server.py"), "--host", "127.0.0.1", "--port", str(port),
            "--model-path", str(checkpoints.llm), "--device", "cpu", "--dtype", "float32",
            "--max-concurrent-streams", str(slots), "--max-queue", "0", "--max-seq-len", "4096"]  # fmt: skip
    return ServerProcess(args, f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server_url(tiny_checkpoints):
    server, url = _token_server(tiny_checkpoints, SLOTS)
    with server:
        yield url


@pytest.fixture(scope="module")
def wide_server_url(tiny_checkpoints):
    """A token server with enough streams for several turns at once."""
    server, url = _token_server(tiny_checkpoints, WIDE_SLOTS)
    with server:
        yield url


def run(models: Models, url: str, scenario, config: PipelineConfig = PipelineConfig(), decoder=None):
    """Run ``scenario(chat)`` in a fresh event loop with a VoiceChat talking to ``url``."""

    async def main():
        async with AsyncTokenClient(url) as client:
            chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, decoder or models.decoder, client, config)
            try:
                return await scenario(chat)
            finally:
                chat.close()

    return asyncio.run(main())


async def collect(chat: VoiceChat, session: ChatSession, request, options: GenerationOptions = FAST) -> list:
    return [event async for event in chat.run_turn(session, request, options)]


def one_turn(models, url, request, options=FAST, config=PipelineConfig()):
    async def scenario(chat):
        session = chat.new_session()
        return session, await collect(chat, session, request, options)

    return run(models, url, scenario, config)


def block_sizes(finished: TurnFinished) -> list[int]:
    """The sizes of the blocks the turn cut and decoded (the decoder's final flush left out)."""
    return [b.codes for b in finished.timings.blocks if b.index is not None]


def replayed_cuts(chat: VoiceChat, reply_ids) -> list[int]:
    """The block sizes a new turn's policy cuts ``reply_ids`` into, replayed without a clock."""
    policy = chat.block_policy()
    demuxer = Demuxer(chat.text_tokenizer, chat.special, policy.demuxer_schedule)
    events = []
    for token_id in reply_ids:
        events += cut_and_demux(token_id, TokenKind.of(token_id, chat.special), demuxer, policy)
    events += demuxer.close()
    return [len(e.codes) for e in events if isinstance(e, AudioBlock)]


def assert_well_formed(events: list) -> TurnFinished:
    """InputAccepted first, TurnFinished last, contiguous audio equal to the final audio."""
    assert isinstance(events[0], InputAccepted), events[:2]
    assert isinstance(events[-1], TurnFinished), events[-1]
    assert not any(isinstance(e, (InputAccepted, TurnFinished, TurnFailed)) for e in events[1:-1])
    finished = events[-1]
    chunks = [e for e in events if isinstance(e, AssistantAudio)]
    position = 0
    for chunk in chunks:
        assert chunk.start_sample == position and len(chunk.samples) > 0
        assert chunk.sample_rate == OUTPUT_SAMPLE_RATE and chunk.samples.dtype == np.float32
        position += len(chunk.samples)
    assert len(finished.audio) == position
    if chunks:
        np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), finished.audio)
    text = "".join(e.text for e in events if isinstance(e, AssistantText))
    assert text == finished.text
    elapsed = [e.elapsed for e in events]
    assert elapsed == sorted(elapsed)
    return finished


def test_text_turn_streams_text_and_audio_and_records_history(models, server_url):
    session, events = one_turn(models, server_url, UserText("Tell me a story."))
    finished = assert_well_formed(events)
    accepted = events[0]
    assert accepted.mode is InputMode.TEXT and accepted.speech_tokens == 0 and accepted.input_seconds is None
    assert finished.audio_tokens > 0 and len(finished.audio) > 0
    assert finished.text_tokens + finished.audio_tokens == len(finished.reply_ids)
    # every audio token became speech: the decoder's length for that many tokens, nothing dropped
    assert len(finished.audio) == models.decoder.mel_frames(finished.audio_tokens) * MEL_HOP_LENGTH
    # the history is the prompt that was sent plus the reply
    assert session.turns == 1
    assert len(session.history_ids) == accepted.prompt_tokens + len(finished.reply_ids)
    assert session.history_ids[accepted.prompt_tokens :] == list(finished.reply_ids)
    t = finished.timings
    assert t.input_ready <= t.request_sent <= t.first_token <= t.last_token <= t.finished
    assert t.first_block_ready <= t.first_audio <= t.finished
    stop_token = finished.reason is not EndReason.STREAM_END
    assert t.tokens == len(finished.reply_ids) + finished.ignored_tokens + stop_token
    assert [b.index for b in t.blocks][-1] is None  # the decoder's final flush
    assert sum(b.samples for b in t.blocks) == len(finished.audio)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_first_block_size_is_configurable(models, server_url, adaptive):
    """The first block is exactly ``block_sizes[0]`` tokens (all of the audio if the answer has fewer),
    later blocks at most the next size, and the cuts are those of the reply's ids alone."""
    config = PipelineConfig(block_sizes=(12, 30), adaptive_blocks=adaptive)

    async def scenario(chat):
        events = await collect(chat, chat.new_session(), UserText("Hello"), FAST)
        finished = assert_well_formed(events)
        return chat.first_block_sizes, finished, replayed_cuts(chat, finished.reply_ids)

    first_sizes, finished, replayed = run(models, server_url, scenario, config)
    codes = block_sizes(finished)
    assert first_sizes == (12,)
    assert codes and codes[0] == min(12, finished.audio_tokens) and all(c <= 30 for c in codes[1:]), codes
    assert sum(codes) == finished.audio_tokens
    assert codes == replayed


def test_voice_turn_tokenizes_speech_into_the_prompt(models, server_url, special_tokens):
    session, events = one_turn(models, server_url, UserSpeech(str(SAMPLE_EN)))
    assert_well_formed(events)
    accepted = events[0]
    duration = load_audio(SAMPLE_EN).duration
    expected_codes = models.speech_tokenizer.tokenize(str(SAMPLE_EN))
    assert accepted.mode is InputMode.AUDIO
    assert accepted.speech_tokens == len(expected_codes) == math.ceil(duration * SPEECH_TOKEN_RATE)
    assert accepted.input_seconds == pytest.approx(duration)
    prompt = session.history_ids[: accepted.prompt_tokens]
    begin = prompt.index(special_tokens.begin_of_audio)
    assert prompt[begin + 1 : begin + 1 + len(expected_codes)] == [special_tokens.audio_id(c) for c in expected_codes]
    assert prompt[begin + 1 + len(expected_codes)] == special_tokens.end_of_audio
    t = events[-1].timings
    assert t.input_loaded <= t.speech_tokenized <= t.input_ready <= t.request_sent


def test_speech_arrays_and_bytes_are_accepted(models, server_url):
    audio = load_audio(SAMPLE_EN, sample_rate=None)
    for source in ((audio.samples, audio.sample_rate), SAMPLE_EN.read_bytes()):
        _, events = one_turn(models, server_url, UserSpeech(source), GenerationOptions(max_new_tokens=8, seed=3))
        assert isinstance(events[0], InputAccepted) and events[0].speech_tokens > 0
        assert isinstance(events[-1], TurnFinished)


def test_second_turn_prompt_extends_the_history(models, server_url):
    async def scenario(chat):
        session = chat.new_session()
        first = await collect(chat, session, UserText("Hi"))
        history = session.history_ids
        second = await collect(chat, session, UserSpeech(str(SAMPLE_EN)))
        return session, history, first, second

    session, history, first, second = run(models, server_url, scenario)
    assert_well_formed(first)
    assert_well_formed(second)
    assert session.turns == 2
    assert second[0].prompt_tokens > len(history)
    assert session.history_ids[: len(history)] == history


def test_sessions_do_not_share_history(models, server_url):
    async def scenario(chat):
        a, b = chat.new_session(), chat.new_session()
        await collect(chat, a, UserText("Remember the word apple."))
        events_b = await collect(chat, b, UserText("Hi"))
        return a, b, events_b

    a, b, events_b = run(models, server_url, scenario)
    assert a.turns == 1 and b.turns == 1
    fresh = b.history_ids[: events_b[0].prompt_tokens]
    assert fresh == chat_prompt(models, "Hi")


def chat_prompt(models, text: str) -> list[int]:
    from glm4voice.protocol import Conversation, SpecialTokens, TextInput

    special = SpecialTokens.from_tokenizer(models.text_tokenizer)
    return Conversation(models.text_tokenizer, special).prompt_for(TextInput(text))


SEEDED = GenerationOptions(temperature=1.0, top_p=1.0, max_new_tokens=40, seed=1234)


def test_same_seed_repeats_the_turn(models, server_url):
    _, first = one_turn(models, server_url, UserText("Hello"), SEEDED)
    _, again = one_turn(models, server_url, UserText("Hello"), SEEDED)
    a, b = assert_well_formed(first), assert_well_formed(again)
    assert a.audio_tokens > 12  # more than one block
    assert a.reply_ids == b.reply_ids
    assert block_sizes(a) == block_sizes(b)
    np.testing.assert_array_equal(a.audio, b.audio)


@pytest.mark.parametrize(
    "config",
    [
        PipelineConfig(decode_batch=1),
        PipelineConfig(),
        PipelineConfig(first_blocks_cut_in=True),
        PipelineConfig(later_calls_yield=False),
        PipelineConfig(queue_finishes=True),
    ],
    ids=["one-block-per-batch", "batched", "first-blocks-cut-in", "later-calls-run-to-the-end", "finishes-queued"],
)
def test_seeded_turns_keep_their_audio_while_other_turns_run(models, wide_server_url, config):
    """Three seeded turns at once with three unseeded ones (other prompts, longer answers): each
    seeded turn's audio is that of its ids and seed decoded alone (the same ids replayed with no
    other turn, no server and other token timings), and every turn's cuts are those of its ids
    alone. Decoded one block per batch, the audio is identical; batched with other sessions'
    blocks, it equals within float rounding (the decoder's batched kernels sum in another order
    than a batch of one: ~1e-6 on this CPU). Whether the token server gives a seeded request the
    same ids beside other streams is the engine's business, not checked here. With first blocks cutting
    into running decoder calls, or calls of later blocks ending early for them, or the answers' last
    decodes queued in the block batcher (each turn's finish then runs there), the same holds."""
    others = [("Tell me a story.", 70), ("What is the weather?", 55), ("Hi there", 60)]
    seeded = [replace(SEEDED, seed=1234 + k) for k in range(len(others))]

    async def scenario(chat):
        turns = []
        for options, (text, length) in zip(seeded, others):
            turns.append(collect(chat, chat.new_session(), UserText("Hello"), options))
            unseeded = GenerationOptions(temperature=1.0, top_p=1.0, max_new_tokens=length, seed=None)
            turns.append(collect(chat, chat.new_session(), UserText(text), unseeded))
        finished = [assert_well_formed(events) for events in await asyncio.gather(*turns)]
        return finished, [replayed_cuts(chat, f.reply_ids) for f in finished], chat.blocks.finishes

    together, replayed, finishes = run(models, wide_server_url, scenario, config)
    assert finishes == (len(together) if config.queue_finishes else 0)
    for finished, cuts in zip(together, replayed):
        assert block_sizes(finished) == cuts
    for options, finished in zip(seeded, together[0::2]):
        assert finished.audio_tokens > 12  # more than one block
        alone = replay_alone(models, finished.reply_ids, options, config)
        assert block_sizes(alone) == block_sizes(finished)
        if config.decode_batch == 1:
            np.testing.assert_array_equal(finished.audio, alone.audio)
        else:
            np.testing.assert_allclose(finished.audio, alone.audio, rtol=0, atol=1e-5)


def replay_alone(models, reply_ids, options: GenerationOptions, config: PipelineConfig) -> TurnFinished:
    """A turn whose server answers ``reply_ids`` (then ``<|user|>``), with nothing else running."""
    from glm4voice.protocol import SpecialTokens

    ids = list(reply_ids) + [SpecialTokens.from_tokenizer(models.text_tokenizer).user]

    async def main():
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, PacedClient(ids), config)
        try:
            return await collect(chat, chat.new_session(), UserText("Hi"), options)
        finally:
            chat.close()

    return assert_well_formed(asyncio.run(main()))


class GatedDecoder:
    """The real decoder, but its first block waits until the token reader has seen the end of
    the stream. If decoding blocked reading, this deadlocks (and the gate times out)."""

    def __init__(self, decoder, reader_done: threading.Event):
        self.decoder = decoder
        self.reader_done = reader_done
        self.gate_open_at_first_block: bool | None = None

    @property
    def hold_back_s(self) -> float:
        return self.decoder.hold_back_s

    @property
    def min_block_tokens(self) -> int:
        return self.decoder.min_block_tokens

    def stream(self, seed=None):
        inner = self.decoder.stream(seed=seed)
        gated = self

        class Stream:
            def feed(self, codes):
                if gated.gate_open_at_first_block is None:
                    gated.gate_open_at_first_block = gated.reader_done.wait(WAIT_S)
                return inner.feed(codes)

            def finish(self):
                return inner.finish()

            def close(self):
                inner.close()

        return Stream()


class WatchedClient:
    """The real async client; sets an event when the server's stream has ended."""

    def __init__(self, client: AsyncTokenClient, done: threading.Event):
        self.client = client
        self.done = done
        self.base_url = client.base_url

    async def stream(self, prompt=None, **params):
        async with aclosing(self.client.stream(prompt, **params)) as tokens:
            async for token in tokens:
                yield token
        self.done.set()


def test_decoding_never_blocks_reading_the_token_stream(models, server_url):
    reader_done = threading.Event()
    decoder = GatedDecoder(models.decoder, reader_done)
    options = GenerationOptions(temperature=0.8, top_p=0.9, max_new_tokens=60, seed=11)

    async def main():
        async with AsyncTokenClient(server_url) as client:
            chat = VoiceChat(
                models.text_tokenizer, models.speech_tokenizer, decoder, WatchedClient(client, reader_done)
            )
            try:
                session = chat.new_session()
                return await collect(chat, session, UserText("Tell me a story."), options)
            finally:
                chat.close()

    events = asyncio.run(main())
    finished = assert_well_formed(events)
    assert decoder.gate_open_at_first_block is True
    assert finished.audio_tokens > 10  # more than one block was waiting behind the first
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AssistantAudio))
    assert finished.timings.last_token < events[first_audio].elapsed


class PacedClient:
    """Answers every request with the same ids (no server), ``delay(k)`` seconds before the k-th: the
    token timings of a fast, slow or stalling server (load to be independent of, not synchronisation)."""

    base_url = "scripted"

    def __init__(self, ids: list[int], delay=lambda k: 0.0):
        self.ids = ids
        self.delay = delay

    async def stream(self, prompt=None, **params):
        for k, token_id in enumerate(self.ids):
            if self.delay(k):
                await asyncio.sleep(self.delay(k))
            yield token_id


class SlowDecoder:
    """The real decoder, each decoder job ``seconds`` late (a GPU shared with many listeners)."""

    def __init__(self, decoder, seconds: float):
        self.decoder = decoder
        self.seconds = seconds

    hold_back_s = property(lambda self: self.decoder.hold_back_s)
    min_block_tokens = property(lambda self: self.decoder.min_block_tokens)

    def stream(self, seed=None):
        return self.decoder.stream(seed=seed)

    def feed_many(self, jobs, **kwargs):
        threading.Event().wait(self.seconds)
        return self.decoder.feed_many(jobs, **kwargs)


def scripted_answer(models, special_tokens, segments: int = 3) -> list[int]:
    """An interleaved answer: ``segments`` x (13 text, 26 audio), then ``<|user|>``."""
    text = (models.text_tokenizer.encode("Sure, here is a short answer for you today my friend") * 2)[:13]
    ids = []
    for s in range(segments):
        ids += text + [special_tokens.audio_offset + (5 * k + 3 * s) % 997 for k in range(26)]
    return ids + [special_tokens.user]


TIMINGS = {
    # name: (delay before token k, decoder job late by (s), turns already running)
    "instant": (lambda k: 0.0, 0.0, 0),
    "slow tokens": (lambda k: 0.03, 0.0, 0),
    "bursty": (lambda k: 0.4 if k % 10 == 0 else 0.0, 0.0, 0),
    "decoder takes seconds": (lambda k: 0.005, 1.5, 0),
    "crowded": (lambda k: 0.005, 0.0, QUICK_START_MAX_TURNS),
}


@pytest.mark.parametrize(
    "adaptive, expected", [(True, [10, 16, 26, 26]), (False, [10, 20, 40, 8])], ids=["adaptive", "fixed"]
)
def test_timing_never_moves_the_cuts_nor_changes_the_audio(models, special_tokens, adaptive, expected):
    """The same ids and seed under very different token and decoder timings: the same cuts, decoded
    in that order, and the same audio. Adaptive cuts: the quick first block, then the end of every
    audio run (a young answer); fixed: the schedule. The pacing does change: with many turns starting
    the quick first block is decoded at once but heard only with the next one."""
    ids = scripted_answer(models, special_tokens)

    async def turn(delay, decoder_s, busy):
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, SlowDecoder(models.decoder, decoder_s),
                         PacedClient(ids, delay), PipelineConfig(adaptive_blocks=adaptive))  # fmt: skip
        chat.load.active_turns = chat.load.unheard_turns = busy  # what the other turns would add
        try:
            return await collect(chat, chat.new_session(), UserText("Hi"), SEEDED)
        finally:
            chat.close()

    results = {name: assert_well_formed(asyncio.run(turn(*timing))) for name, timing in TIMINGS.items()}
    reference = results["instant"]
    assert block_sizes(reference) == expected and reference.audio_tokens == 78
    for name, finished in results.items():
        assert block_sizes(finished) == expected, name
        assert [b.index for b in finished.timings.blocks] == [0, 1, 2, 3, None], name
        np.testing.assert_array_equal(finished.audio, reference.audio, err_msg=name)
    first, second = results["crowded"].timings.blocks[:2]
    assert first.decode_started < second.ready  # decoded at once in both
    if adaptive:  # held back: heard once the next block was decoded
        assert first.sent == second.sent >= second.decoded
    else:  # fixed: every block heard once decoded, before the next goes to the decoder
        assert first.decoded <= first.sent <= second.decode_started


def test_a_held_first_block_decoded_at_once_is_heard_with_the_next_and_sounds_the_same(models, special_tokens):
    """``decode_held_first_block``: a quick first block held back under load (here: turns starting, as
    ``quick_start_counts_unheard`` counts them) goes to the decoder as soon as it is cut; its audio waits
    for the next block's, and both reach the listener at once. The cuts, their order and the audio are
    those of a turn decoded without any holding."""
    ids = scripted_answer(models, special_tokens)

    async def turn(config, starting):
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder,
                         PacedClient(ids, lambda k: 0.005), config)  # fmt: skip
        chat.load.active_turns = chat.load.unheard_turns = starting  # what the other turns would add
        try:
            events = await collect(chat, chat.new_session(), UserText("Hi"), SEEDED)
            return events, chat.load.unheard_turns
        finally:
            chat.close()

    reference, _ = asyncio.run(turn(PipelineConfig(), 0))
    config = PipelineConfig(decode_held_first_block=True, quick_start_counts_unheard=True)
    events, unheard_after = asyncio.run(turn(config, QUICK_START_MAX_TURNS))
    finished, expected = assert_well_formed(events), assert_well_formed(reference)
    assert block_sizes(finished) == block_sizes(expected) == [10, 16, 26, 26]
    np.testing.assert_array_equal(finished.audio, expected.audio)
    first, second = finished.timings.blocks[:2]
    assert first.decode_started < second.ready  # decoded at once, not held until the next block was cut
    assert first.sent == second.sent and first.sent >= second.decoded  # heard with the next block
    first_audio = next(e for e in events if isinstance(e, AssistantAudio))
    assert first_audio.block_index == 0 and first_audio.elapsed == first.sent
    assert unheard_after == QUICK_START_MAX_TURNS  # this turn's count is gone again


class GatedClient(PacedClient):
    """Answers with ``ids``, the first ``before`` of them at once and the rest once ``gate`` is set."""

    def __init__(self, ids: list[int], before: int, gate: asyncio.Event):
        super().__init__(ids)
        self.before, self.gate = before, gate

    async def stream(self, prompt=None, **params):
        for k, token_id in enumerate(self.ids):
            if k == self.before:
                await self.gate.wait()
            yield token_id


class HeldPacing(BlockPacing):
    """Holds every first block back; :meth:`held_start_in_s` answers ``waits`` in turn (the last one
    from then on)."""

    def __init__(self, waits: list[float | None]):
        self.waits = waits
        self.asked = 0

    def hold_first_block(self, now: float) -> bool:
        return True

    def held_start_in_s(self, now: float) -> float | None:
        self.asked += 1
        return self.waits[min(self.asked, len(self.waits)) - 1]


def test_a_held_first_block_is_heard_before_the_next_once_the_pacing_expects_it_in_time(models, special_tokens):
    """``start_held_early``: a held first block's audio goes out, ahead of the next block, as soon as the
    pacing's estimate says so. Here the server sends the answer's first 23 tokens (13 text, the 10 audio
    tokens of the first block) and the rest only once the listener has heard something: the turn
    finishes only if the held block went out on its own. The pacing first asks for 0.05 s more, is asked
    again then (nothing else happened), and says now. The cuts and the audio do not change."""
    ids = scripted_answer(models, special_tokens)

    async def turn(pacing: BlockPacing | None):
        gate = asyncio.Event()
        client = GatedClient(ids, TEXT_TOKENS_PER_SEGMENT + 10, gate) if pacing else PacedClient(ids)
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, client, PipelineConfig())
        if pacing is not None:
            chat.block_pacing = lambda paced=True: pacing
        events = []
        try:
            async for event in chat.run_turn(chat.new_session(), UserText("Hi"), SEEDED):
                events.append(event)
                if isinstance(event, AssistantAudio):
                    gate.set()
            return events
        finally:
            chat.close()

    reference = assert_well_formed(asyncio.run(turn(None)))
    pacing = HeldPacing([0.05, 0.0])
    events = asyncio.run(asyncio.wait_for(turn(pacing), WAIT_S * 5))  # waits forever if the block stays held
    finished = assert_well_formed(events)
    assert block_sizes(finished) == block_sizes(reference) == [10, 16, 26, 26]
    np.testing.assert_array_equal(finished.audio, reference.audio)
    first, second = finished.timings.blocks[:2]
    assert first.decoded <= first.sent < second.ready  # heard before the next block was even cut
    assert pacing.asked == 2
    first_audio = next(e for e in events if isinstance(e, AssistantAudio))
    assert first_audio.block_index == 0 and first_audio.elapsed == first.sent


@pytest.mark.parametrize("urgent_in_hand_s", [0.0, 1e6])
def test_a_later_block_goes_with_the_first_blocks_when_its_listener_is_short(models, special_tokens, urgent_in_hand_s):  # fmt: skip
    """The block after the first always goes with the first blocks (``submit(first=True)``); a later one
    only when its listener, already playing, has less than ``urgent_in_hand_s`` in hand: with 1e6 s every
    hand-over after the first one (the listener has started by then), with 0 only the one right after
    it. Blocks waiting together go in one hand-over, so the rule is checked per hand-over, by the blocks
    handed over before it. The cuts and the audio do not change."""
    ids = scripted_answer(models, special_tokens)

    async def turn():
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder,
                         PacedClient(ids, lambda k: 0.005 if k < 39 else 0.02),
                         PipelineConfig(urgent_in_hand_s=urgent_in_hand_s))  # fmt: skip
        calls: list[tuple[int, int, bool | None]] = []  # (blocks handed over before, blocks, first)
        submit = chat.blocks.submit

        def recording(stream, blocks, first=None):
            calls.append((handed[0], len(blocks), first))
            handed[0] += len(blocks)
            return submit(stream, blocks, first)

        handed = [0]

        chat.blocks.submit = recording
        try:
            return await collect(chat, chat.new_session(), UserText("Hi"), SEEDED), calls
        finally:
            chat.close()

    events, calls = asyncio.run(turn())
    finished = assert_well_formed(events)
    assert block_sizes(finished) == [10, 16, 26, 26]
    assert sum(1 for before, _, _ in calls if before >= 2), "no block was handed over after the first two"
    for before, _, first in calls:
        urgent = before == 1 or (before >= 1 and urgent_in_hand_s > 0)
        assert first is (True if urgent else None), calls
    # the turn's timings name the urgent ones: later blocks sent with the first blocks, not the one after the first
    urgent_blocks = [before >= 2 and first is True for before, count, first in calls for _ in range(count)]
    assert [b.urgent for b in finished.timings.blocks if b.index is not None] == urgent_blocks
    assert any(urgent_blocks) is (urgent_in_hand_s > 0)


def test_a_turn_counts_as_unheard_until_its_first_audio(models, special_tokens):
    """``TurnLoad.unheard_turns`` counts a spoken turn from its input to its first audio; a text-only
    answer and a turn that fails before any audio leave the count as it was."""
    ids = scripted_answer(models, special_tokens)

    async def scenario():
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, PacedClient(ids),
                         PipelineConfig())  # fmt: skip
        seen = []
        try:
            async for event in chat.run_turn(chat.new_session(), UserText("Hi"), SEEDED):
                if isinstance(event, (InputAccepted, AssistantAudio, TurnFinished)):
                    seen.append((type(event).__name__, chat.load.unheard_turns))
            failed = await collect(chat, chat.new_session(), UserText("   "), SEEDED)
            async for _ in chat.generate(ids[:5], SEEDED, decode_audio=False):
                seen.append(("text only", chat.load.unheard_turns))
            return seen, failed[-1], chat.load.unheard_turns, chat.load.active_turns
        finally:
            chat.close()

    seen, failed, unheard, active = asyncio.run(scenario())
    assert seen[0] == ("InputAccepted", 1) and seen[1] == ("AssistantAudio", 0)
    assert {count for name, count in seen[1:]} == {0} and seen[-1][0] == "text only"
    assert isinstance(failed, TurnFailed) and (unheard, active) == (0, 0)


def test_a_paced_reader_waits_where_its_pacing_says_and_the_answer_is_unchanged(models, special_tokens, monkeypatch):
    """``pace_generation`` (the default): the reader asks the pacing after every token whether to wait
    (with the audio cut so far, the pending audio and the next block's size) and waits as told; the cuts
    and the audio are those of a turn read straight through. A turn whose options say its audio is not
    played as it arrives (``paced=False``), or a pipeline with the option off, is never paced."""
    from glm4voice.pipeline.policy import ListenerPacing

    ids = scripted_answer(models, special_tokens)
    asked: dict[ListenerPacing, list[tuple]] = {}

    def read_delay_s(self, now, first_audio_at, audio_cut, pending, next_block):
        asked.setdefault(self, []).append((audio_cut, pending, next_block))
        return 0.05 if len(asked[self]) == 30 else 0.0  # one wait, mid-answer

    async def turn(config: PipelineConfig, options: GenerationOptions = SEEDED):
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, PacedClient(ids), config)
        pacings = []
        make = chat.block_pacing
        chat.block_pacing = lambda paced: pacings.append(make(paced)) or pacings[-1]  # type: ignore[method-assign]
        try:
            return await collect(chat, chat.new_session(), UserText("Hi"), options), pacings[0]
        finally:
            chat.close()

    monkeypatch.setattr(ListenerPacing, "read_delay_s", read_delay_s)
    paced, pacing = asyncio.run(turn(PipelineConfig()))
    straight, off = asyncio.run(turn(PipelineConfig(pace_generation=False)))
    unplayed, not_played = asyncio.run(turn(PipelineConfig(), replace(SEEDED, paced=False)))
    assert pacing.pace_generation and pacing.paused_s == pytest.approx(0.05)
    assert not off.pace_generation and not not_played.pace_generation and off.paused_s == not_played.paused_s == 0
    assert off not in asked and not_played not in asked  # the reader never asks a pacing that does not pace
    a, b = assert_well_formed(paced), assert_well_formed(straight)
    assert block_sizes(a) == block_sizes(b) and a.reply_ids == b.reply_ids
    np.testing.assert_array_equal(a.audio, b.audio)
    np.testing.assert_array_equal(assert_well_formed(unplayed).audio, b.audio)
    # what the reader reported: every block's audio once it was cut, the pending rest, the schedule's next size
    cut_then_pending = [cut + pending for cut, pending, _ in asked[pacing]]
    assert cut_then_pending == sorted(cut_then_pending) and cut_then_pending[-1] == a.audio_tokens
    assert {size for _, _, size in asked[pacing]} <= set(PipelineConfig().block_sizes)


def test_the_turn_load_reads_the_decoders_measured_times():
    """What a turn's pacing learns of the others: alone, the quickest job; among others, the average
    job; a round of every running turn's next block, the time per block times the turns."""
    from types import SimpleNamespace

    from glm4voice.pipeline.chat import TurnLoad

    blocks = SimpleNamespace(fastest_s=0.05, latency_s=0.3, block_s=None)
    load = TurnLoad(blocks)  # type: ignore[arg-type]
    assert load.decoder_round_s() is None  # nothing decoded yet
    blocks.block_s = 0.02
    load.active_turns = 1
    assert (load.decoder_wait_s(), load.decoder_round_s()) == (0.05, 0.02)
    load.active_turns = 64
    assert load.decoder_wait_s() == 0.3 and load.decoder_round_s() == pytest.approx(1.28)


def test_a_covered_start_keeps_the_audio_back_not_the_blocks(models, special_tokens):
    """``cover_start`` with a decoder that could never keep up (a round of every turn's blocks takes
    1000 s): the blocks are cut and decoded as without it (tokens arrive over about a second, so the
    first blocks are decoded long before the last is cut), but their audio goes out only once the
    answer has ended, all of it, equal to the audio of a turn without it. Off (the default), the
    pacing never keeps audio back."""
    ids = scripted_answer(models, special_tokens)

    async def turn(cover):
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder,
                         PacedClient(ids, lambda k: 0.01), PipelineConfig(cover_start=cover))  # fmt: skip
        chat.load.decoder_round_s = lambda: 1000.0
        try:
            return await collect(chat, chat.new_session(), UserText("Hi"), SEEDED), chat.block_pacing()
        finally:
            chat.close()

    (covered, pacing), (plain, default_pacing) = asyncio.run(turn(True)), asyncio.run(turn(False))
    assert pacing.cover_start and not default_pacing.cover_start
    kept, sent = assert_well_formed(covered), assert_well_formed(plain)
    assert block_sizes(kept) == block_sizes(sent) == [10, 16, 26, 26]
    np.testing.assert_array_equal(kept.audio, sent.audio)
    last_block = [b for b in kept.timings.blocks if b.index is not None][-1]
    audio_out = [e.elapsed for e in covered if isinstance(e, AssistantAudio)]
    assert len(audio_out) == 5 and min(audio_out) >= last_block.decode_started


# --- failures: a readable message, the session unchanged, the next turn works ------------------------


def test_empty_text_is_rejected_without_a_request(models, server_url):
    for text in ("", "   \n"):
        session, events = one_turn(models, server_url, UserText(text))
        assert len(events) == 1 and events[0].kind is FailureKind.EMPTY_INPUT
        assert "type a message" in events[0].message
        assert session.turns == 0 and session.history_ids == []
        assert events[0].timings.request_sent is None


def test_missing_recording_is_rejected(models, server_url):
    _, events = one_turn(models, server_url, UserSpeech(None))
    assert events[0].kind is FailureKind.EMPTY_INPUT and "record or upload" in events[0].message


@pytest.mark.parametrize(
    "make, kind, words",
    [
        (
            lambda d: encode_wav(np.zeros(INPUT_SAMPLE_RATE * 2, np.float32), INPUT_SAMPLE_RATE),
            FailureKind.NO_SPEECH,
            "No speech",
        ),
        (
            lambda d: b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4,
            FailureKind.INVALID_INPUT,
            "Unsupported or corrupt",
        ),
        (lambda d: b"", FailureKind.EMPTY_INPUT, "empty"),
        (
            lambda d: encode_wav(0.1 * d.standard_normal(8000 * 7).astype(np.float32), 8000),
            FailureKind.INPUT_TOO_LONG,
            "too long",
        ),
    ],
    ids=["silence", "corrupt", "empty-file", "too-long"],
)
def test_bad_speech_input_gets_a_readable_message(models, server_url, tmp_path, make, kind, words):
    path = tmp_path / "input.wav"
    path.write_bytes(make(np.random.default_rng(0)))
    config = PipelineConfig(max_input_seconds=6.0)
    session, events = one_turn(models, server_url, UserSpeech(str(path)), FAST, config)
    assert len(events) == 1 and isinstance(events[0], TurnFailed), events
    assert events[0].kind is kind and words in events[0].message, events[0].message
    assert session.turns == 0


def test_invalid_settings_are_explained(models, server_url):
    _, events = one_turn(
        models, server_url, UserText("Hi"), GenerationOptions(temperature=-1, top_p=0, max_new_tokens=0)
    )
    failed = events[0]
    assert failed.kind is FailureKind.INVALID_INPUT
    for word in ("temperature", "top-p", "max new tokens"):
        assert word in failed.message


def test_unreachable_server_then_recovery(models, server_url):
    dead_url = f"http://127.0.0.1:{free_port()}"

    async def scenario(chat_up):
        session = chat_up.new_session()
        async with AsyncTokenClient(dead_url) as dead_client:
            chat_down = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, dead_client)
            try:
                down = await collect(chat_down, session, UserText("Hi"))
            finally:
                chat_down.close()
        up = await collect(chat_up, session, UserText("Hi"))
        return session, down, up

    session, down, up = run(models, server_url, scenario)
    failed = down[-1]
    assert isinstance(down[0], InputAccepted)
    assert failed.kind is FailureKind.SERVER_UNAVAILABLE and dead_url in failed.message
    assert "model_server.py" in failed.message
    assert_well_formed(up)
    assert session.turns == 1


def test_busy_server_says_so_and_the_next_turn_works(models, server_url, tiny_checkpoints):
    ids = chat_prompt(models, "Keep talking.")
    holders = [TokenClient(server_url) for _ in range(SLOTS)]
    streams = [h.stream(prompt_token_ids=ids, max_new_tokens=3000, temperature=1.0, top_p=1.0, seed=5) for h in holders]
    try:
        for stream in streams:
            next(stream)  # each holds one of the server's streams
        session, events = one_turn(models, server_url, UserText("Hi"))
    finally:
        for stream, holder in zip(streams, holders):
            stream.close()
            holder.close()
    failed = events[-1]
    assert failed.kind is FailureKind.SERVER_BUSY and "busy" in failed.message and "try again" in failed.message
    assert session.turns == 0
    wait_for_idle(server_url)
    _, events = one_turn(models, server_url, UserText("Hi"))
    assert_well_formed(events)


class RefusingClient:
    """Answers every stream with 503, and ``/health`` with ``health()`` (a server that is busy, or one
    that is not serving: stopping, restarting, its engine stopped)."""

    base_url = "http://refusing"

    def __init__(self, health):
        self._health = health

    async def stream(self, prompt=None, **params):
        raise ServerBusyError("the engine is not running: worker died; retry later", 2.0)
        yield  # an async generator, like the real client's stream

    async def health(self):
        return self._health()


def _raise(error):
    raise error


@pytest.mark.parametrize(
    "health, kind, words",
    [
        (lambda: {"status": "ready"}, FailureKind.SERVER_BUSY, "The model server is busy"),
        (lambda: _raise(ServerBusyError("{...}", 2.0)), FailureKind.SERVER_UNAVAILABLE, "not running or is restarting"),
        (lambda: {"status": "stopping"}, FailureKind.SERVER_UNAVAILABLE, "not running or is restarting"),
        (
            lambda: _raise(ServerUnavailableError("gone")),
            FailureKind.SERVER_UNAVAILABLE,
            "not running or is restarting",
        ),
        (  # e.g. a proxy's 200 page that is not JSON
            lambda: _raise(ProtocolError("the /health answer is not the server's JSON: '<html>'")),
            FailureKind.SERVER_UNAVAILABLE,
            "not running or is restarting",
        ),
    ],
    ids=["busy", "engine-stopped", "stopping", "gone", "unreadable"],
)
def test_a_503_is_busy_only_if_the_server_says_it_is_ready(models, health, kind, words):
    async def main():
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, RefusingClient(health))
        try:
            return await collect(chat, chat.new_session(), UserText("Hi"))
        finally:
            chat.close()

    failed = asyncio.run(main())[-1]
    assert isinstance(failed, TurnFailed) and failed.kind is kind and words in failed.message, failed
    if kind is FailureKind.SERVER_BUSY:
        assert "try again in 2 s" in failed.message
    else:
        assert "busy" not in failed.message and "http://refusing" in failed.message


class SilentClient:
    """A token server whose streams end at once, without a token."""

    base_url = "http://silent"

    async def stream(self, prompt=None, **params):
        return
        yield  # an async generator, like the real client's stream


class StuckDecoder:
    """A decoder whose streams' finish() waits for the test's gate (so a second turn's finish queues
    behind it in the decode worker)."""

    hold_back_s = 0.0
    min_block_tokens = 1

    def __init__(self, decoder):
        self.decoder, self.entered, self.gate = decoder, threading.Event(), threading.Event()

    def stream(self, seed=None):
        inner, stuck = self.decoder.stream(seed=seed), self

        class Stream:
            def feed(self, codes):
                return inner.feed(codes)

            def finish(self):
                stuck.entered.set()
                assert stuck.gate.wait(WAIT_S)
                return inner.finish()

        return Stream()


def test_a_turns_decoder_stream_does_not_wait_for_the_decoders_calls(models, special_tokens):
    """The decoder stream of a new turn is made on the event loop, not queued on the decode worker
    behind the running (possibly long) decoder call: with the worker stuck, a new turn still gets its
    stream."""
    made = threading.Event()

    class Recording(StuckDecoder):
        def stream(self, seed=None):
            made.set()
            return super().stream(seed)

    async def main():
        decoder = Recording(models.decoder)
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, decoder, SilentClient())
        try:
            first = asyncio.create_task(collect(chat, chat.new_session(), UserText("Hi")))
            await asyncio.to_thread(decoder.entered.wait, WAIT_S)  # the worker is stuck in its finish()
            made.clear()
            second = asyncio.create_task(collect(chat, chat.new_session(), UserText("Hi")))
            stream_made = await asyncio.to_thread(made.wait, WAIT_S)
            decoder.gate.set()
            await asyncio.gather(first, second)
            return stream_made
        finally:
            chat.close()

    assert asyncio.run(main())


def test_closing_the_pipeline_ends_the_turns_it_was_running(models):
    """close() shuts the workers down under two turns (one in the decode worker, one queued behind it):
    neither waits forever. The queued one ends with TurnFailed; the one in the worker ends with exactly
    one TurnFinished or TurnFailed (its last call returns after the close)."""

    async def main():
        decoder = StuckDecoder(models.decoder)
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, decoder, SilentClient())
        first = asyncio.create_task(collect(chat, chat.new_session(), UserText("Hi")))
        await asyncio.to_thread(decoder.entered.wait, WAIT_S)
        second = asyncio.create_task(collect(chat, chat.new_session(), UserText("Hi")))
        while not chat._decode_worker._work_queue.qsize() and not second.done():  # its finish() is queued
            await asyncio.sleep(0.01)
        chat.close()
        decoder.gate.set()
        return await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)

    running, queued = asyncio.run(main())
    assert isinstance(queued[-1], TurnFailed), queued
    for events in (running, queued):
        assert sum(isinstance(e, (TurnFailed, TurnFinished)) for e in events) == 1, events


def test_stream_failing_midway_keeps_the_partial_answer_out_of_the_history(models, server_url):
    options = GenerationOptions(temperature=0.8, top_p=0.9, max_new_tokens=40, seed=FAIL_AFTER_SEED)

    async def scenario(chat):
        session = chat.new_session()
        broken = await collect(chat, session, UserText("Hi"), options)
        after = await collect(chat, session, UserText("Hi"))
        return session, broken, after

    session, broken, after = run(models, server_url, scenario)
    failed = broken[-1]
    assert isinstance(failed, TurnFailed) and failed.kind is FailureKind.STREAM_FAILED
    assert "cut off" in failed.message and f"after {FAIL_AFTER_TOKENS} tokens" in failed.message
    assert failed.timings.tokens == FAIL_AFTER_TOKENS
    assert_well_formed(after)
    assert session.turns == 1 and after[0].prompt_tokens == len(chat_prompt(models, "Hi"))


def test_a_second_turn_while_one_runs_is_refused(models, server_url):
    async def scenario(chat):
        session = chat.new_session()
        first = chat.run_turn(session, UserText("Hi"), FAST)
        accepted = await anext(first)  # the first turn is now running
        second = await collect(chat, session, UserText("Hello"))
        rest = [event async for event in first]
        return session, accepted, second, rest

    session, accepted, second, rest = run(models, server_url, scenario)
    assert isinstance(accepted, InputAccepted)
    assert len(second) == 1 and second[0].kind is FailureKind.SESSION_BUSY
    assert isinstance(rest[-1], TurnFinished) and session.turns == 1


def test_stopping_early_closes_the_server_stream(models, server_url):
    options = GenerationOptions(temperature=1.0, top_p=1.0, max_new_tokens=3000, seed=5)

    async def scenario(chat):
        session = chat.new_session()
        async with aclosing(chat.run_turn(session, UserText("Keep talking."), options)) as events:
            async for event in events:
                if isinstance(event, AssistantText):
                    break
        return session

    session = run(models, server_url, scenario)
    assert session.turns == 0 and not session.busy
    wait_for_idle(server_url)


def test_clear_during_a_turn_keeps_the_new_history_empty(models, server_url):
    async def scenario(chat):
        session = chat.new_session()
        events = []
        async for event in chat.run_turn(session, UserText("Hi"), FAST):
            events.append(event)
            if isinstance(event, InputAccepted):
                session.clear()
        return session, events

    session, events = run(models, server_url, scenario)
    assert isinstance(events[-1], TurnFinished)
    assert session.turns == 0 and session.history_ids == []


def wait_for_idle(url: str) -> None:
    """The server frees a closed stream's slot at its next step: wait for it (never a speed check)."""
    import time

    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if httpx.get(url + "/health", timeout=10).json()["active_streams"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} still has active streams after {WAIT_S} s")


def test_the_block_policy_gets_the_decoders_own_facts_and_the_players_lead(models):
    """The pipeline copies none of the decoder's facts: the adaptive cuts and pacing get the hold-back
    and the smallest block that the decoder publishes, the player's lead and the planning rate from
    the config; fixed blocks are decoded at once."""
    from glm4voice.defaults import PLAYER_LEAD_S
    from glm4voice.pipeline import MIN_TOKEN_RATE, AdaptiveBlocks, FixedBlocks, ListenerPacing

    decoder = models.decoder
    chats = [
        VoiceChat(models.text_tokenizer, models.speech_tokenizer, decoder, PacedClient([]), config)
        for config in (
            PipelineConfig(
                player_lead_s=0.3,
                min_token_rate=30.0,
                block_sizes=(12, 30),
                quick_start_max_turns=3,
                urgent_in_hand_s=0.7,
            ),
            PipelineConfig(adaptive_blocks=False, first_blocks_cut_in=True, later_calls_yield=False),
        )
    ]
    try:
        adaptive, fixed = (chat.block_policy() for chat in chats)
        paced, eager = (chat.block_pacing() for chat in chats)
    finally:
        for chat in chats:
            chat.close()
    assert isinstance(adaptive, AdaptiveBlocks) and type(fixed) is FixedBlocks
    assert isinstance(paced, ListenerPacing) and type(eager) is BlockPacing
    assert adaptive.hold_back_s == paced.hold_back_s == decoder.hold_back_s
    assert decoder.hold_back_s >= decoder.mel_overlap_len * MEL_HOP_LENGTH / OUTPUT_SAMPLE_RATE  # at least the overlap
    assert adaptive.min_block_tokens == paced.min_block_tokens == decoder.min_block_tokens
    assert adaptive.player_lead_s == paced.player_lead_s == 0.3 and PipelineConfig().player_lead_s == PLAYER_LEAD_S
    assert adaptive.min_token_rate == 30.0 and PipelineConfig().min_token_rate == MIN_TOKEN_RATE
    assert paced.first_block == 12 and paced.load is chats[0].load and paced.quick_start_max_turns == 3
    assert PipelineConfig().quick_start_max_turns == QUICK_START_MAX_TURNS
    assert paced.urgent_in_hand_s == 0.7 and PipelineConfig().urgent_in_hand_s == URGENT_IN_HAND_S
    assert paced.start_held_early is PipelineConfig().start_held_early is True
    for config, early in (
        (PipelineConfig(start_held_early=False), False),
        (PipelineConfig(start_held_early=True), True),
        (PipelineConfig(start_held_early=True, decode_held_first_block=False), False),  # needs the block decoded
    ):
        chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, decoder, PacedClient([]), config)
        try:
            assert chat.block_pacing().start_held_early is early, config
        finally:
            chat.close()
    assert (PipelineConfig().spare_starting_tokens, PipelineConfig().spare_max_turns) == (
        SPARE_STARTING_TOKENS,
        SPARE_MAX_TURNS,
    )
    assert (chats[0].blocks.cut_in, chats[1].blocks.cut_in) == (False, True)
    assert (chats[0].blocks.yield_to_first, chats[1].blocks.yield_to_first) == (True, False)
    for bad in ({"min_token_rate": 0}, {"quick_start_max_turns": -1}, {"spare_starting_tokens": -1},
                {"spare_max_turns": -1}, {"urgent_in_hand_s": -0.1}):  # fmt: skip
        with pytest.raises(ValueError, match="invalid pipeline limits"):
            PipelineConfig(**bad)


@pytest.mark.parametrize(
    "first_blocks_first, spare_starting_tokens, spare_max_turns, spared_tokens",
    [(True, 0, 16, 0), (False, 0, 16, 0), (True, 39, 16, 39), (True, 39, 0, 0)],
)
def test_one_process_decodes_a_first_block_while_the_engine_makes_way(
    models, tiny_checkpoints, first_blocks_first, spare_starting_tokens, spare_max_turns, spared_tokens
):
    """The one-process layout (the engine in this process, InProcessTokenClient): the turn's first audio
    block is decoded inside Engine.make_way (the engine starts no step meanwhile; it pauses only if it
    is still generating then, which depends on timing), each later block beside the engine's steps;
    PipelineConfig(first_blocks_first=False) turns it off. With spare_starting_tokens, make_way spares
    the requests that have generated fewer tokens, unless more turns than spare_max_turns are starting
    (this one turn is more than 0)."""
    from glm4voice.client import InProcessTokenClient
    from glm4voice.server.engine_backend import build_engine
    from glm4voice.server.inprocess import InProcessTokenServer
    from glm4voice.server.settings import ServerSettings

    settings = ServerSettings(model_path=str(tiny_checkpoints.llm), device="cpu", dtype="float32",
                              max_concurrent_streams=2, max_seq_len=4096, log_level="warning")  # fmt: skip
    engine = build_engine(settings)
    config = PipelineConfig(first_blocks_first=first_blocks_first, spare_starting_tokens=spare_starting_tokens,
                            spare_max_turns=spare_max_turns)  # fmt: skip
    spared = []
    engine_make_way = engine.make_way

    def make_way(starting_tokens=0):
        spared.append(starting_tokens)
        return engine_make_way(starting_tokens)

    engine.make_way = make_way

    async def main():
        tokens = InProcessTokenServer(engine, settings)
        async with tokens.running(), InProcessTokenClient(tokens) as client:
            chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, client, config)
            try:
                events = await collect(chat, chat.new_session(), UserText("Tell me a story."), FAST)
            finally:
                chat.close()
            return events, engine.make_way_calls, engine.make_way_pauses

    events, calls, pauses = asyncio.run(main())
    finished = events[-1]
    assert isinstance(finished, TurnFinished), events[-1]
    assert len(block_sizes(finished)) >= 2 and any(isinstance(e, AssistantAudio) for e in events)
    # the blocks handed over with the first one (the turn's pacing may hold it back until the next is cut,
    # depending on the measured rates), and those handed over after a first block that went alone, are
    # decoded inside make_way too, one call each; so are urgent later blocks (a listener short of audio,
    # which depends on the machine's speed: PipelineConfig.urgent_in_hand_s)
    blocks = [b for b in finished.timings.blocks if b.index is not None]
    handovers = [sum(1 for b in blocks if b.decode_started == at) for at in sorted({b.decode_started for b in blocks})]
    waited_for = handovers[0] + (handovers[1] if handovers[0] == 1 and len(handovers) > 1 else 0)
    urgent = sum(1 for b in blocks if b.urgent)
    assert calls == (waited_for + urgent if first_blocks_first else 0) and pauses <= calls
    # the first call comes while this turn is starting; a later one may come after its first audio was heard
    assert len(spared) == calls and spared[:1] == [spared_tokens] * min(calls, 1)
    assert set(spared[1:]) <= {spared_tokens, spare_starting_tokens}
