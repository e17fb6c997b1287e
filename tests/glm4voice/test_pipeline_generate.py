"""The two halves of a turn for front ends that keep their own history: ``VoiceChat.prepare_input``
and ``VoiceChat.generate`` (text only without the decoder, a live ``TurnProgress``), and
``Demuxer.reply_ids``. A scripted token client stands in for the server (no process needed)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from glm4voice.audio import INPUT_SAMPLE_RATE, Audio
from glm4voice.pipeline import (
    AssistantAudio,
    AssistantText,
    FailureKind,
    GenerationOptions,
    TurnError,
    TurnFailed,
    TurnFinished,
    TurnProgress,
    UserSpeech,
    UserText,
    VoiceChat,
)
from glm4voice.protocol import AudioInput, Demuxer, TextInput

from support import ROOT

SAMPLE_EN = ROOT / "resources" / "sample_en.wav"


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    from flow_inference import AudioDecoder
    from glm4voice.text_tokenizer import GLMTokenizer
    from speech_tokenizer import SpeechTokenizer

    return (
        GLMTokenizer.from_pretrained(tiny_checkpoints.llm),
        SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device="cpu"),
        AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu"),
    )


class ScriptedClient:
    """Answers with fixed ids; can hold the stream open after ``hold_after`` ids until cancelled."""

    base_url = "scripted"

    def __init__(self, ids: list[int], hold_after: int | None = None):
        self.ids = ids
        self.hold_after = hold_after
        self.held = asyncio.Event()
        self.closed = False
        self.prompts: list[list[int]] = []

    async def stream(self, prompt=None, **params):
        self.prompts.append(list(params["prompt_token_ids"]))
        try:
            for n, token_id in enumerate(self.ids):
                if n == self.hold_after:
                    self.held.set()
                    await asyncio.Event().wait()  # until the consumer cancels
                yield token_id
        finally:
            self.closed = True


class CountingDecoder:
    """The real decoder, counting the streams opened on it."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.streams = 0

    def stream(self, seed=None):
        self.streams += 1
        return self.decoder.stream(seed=seed)

    def __getattr__(self, name):  # every other attribute (hold_back_s, min_block_tokens, ...) is the decoder's
        return getattr(self.decoder, name)


def interleaved(text_tokenizer, special, runs: int = 2) -> list[int]:
    text = (text_tokenizer.encode("Sure, here is a short answer for you today my friend") * 2)[:13]
    audio = [special.audio_offset + 7 * k for k in range(26)]
    return (text + audio) * runs


def test_demuxer_reply_ids_grow_as_ids_are_fed(text_tokenizer, special_tokens):
    demuxer = Demuxer(text_tokenizer, special_tokens)
    ids = interleaved(text_tokenizer, special_tokens, runs=1)
    for n, token_id in enumerate(ids):
        assert demuxer.reply_ids == tuple(ids[:n])
        demuxer.feed(token_id)
    demuxer.feed(special_tokens.audio_offset + special_tokens.num_audio_codes)  # past the codebook: dropped
    (end,) = [e for e in demuxer.feed(special_tokens.user) if hasattr(e, "reply_ids")]
    assert demuxer.reply_ids == end.reply_ids == tuple(ids)


def test_generate_streams_the_answer_to_given_prompt_ids(models, special_tokens):
    text_tokenizer, speech_tokenizer, decoder = models
    ids = interleaved(text_tokenizer, special_tokens) + [special_tokens.user]
    client = ScriptedClient(ids)
    counting = CountingDecoder(decoder)

    async def main():
        chat = VoiceChat(text_tokenizer, speech_tokenizer, counting, client)
        try:
            progress = TurnProgress()
            events = [e async for e in chat.generate([1, 2, 3], GenerationOptions(seed=5), progress=progress)]
            return events, progress, chat.active_turns
        finally:
            chat.close()

    events, progress, active = asyncio.run(main())
    assert client.prompts == [[1, 2, 3]] and active == 0
    finished = events[-1]
    assert isinstance(finished, TurnFinished) and finished.reply_ids == tuple(ids[:-1])
    assert progress.reply_ids == finished.reply_ids
    assert counting.streams == 1 and finished.audio_tokens == 52 and len(finished.audio) > 0
    assert any(isinstance(e, AssistantAudio) for e in events)


def test_text_only_generation_never_opens_the_decoder(models, special_tokens):
    text_tokenizer, speech_tokenizer, decoder = models
    ids = interleaved(text_tokenizer, special_tokens, runs=3) + [special_tokens.user]
    counting = CountingDecoder(decoder)

    async def main():
        chat = VoiceChat(text_tokenizer, speech_tokenizer, counting, ScriptedClient(ids))
        try:
            events, counted = [], set()
            async for event in chat.generate([5, 6], decode_audio=False):
                events.append(event)
                counted.add((chat.active_turns, chat.load.active_turns))
            return events, counted
        finally:
            chat.close()

    events, counted = asyncio.run(main())
    finished = events[-1]
    assert isinstance(finished, TurnFinished)
    assert counting.streams == 0
    # a running turn, but no load on the decoder for the other turns' pacing to count
    assert counted == {(1, 0)}
    assert not any(isinstance(e, AssistantAudio) for e in events)
    assert len(finished.audio) == 0 and finished.audio_tokens == 78 and finished.reply_ids == tuple(ids[:-1])
    assert "".join(e.text for e in events if isinstance(e, AssistantText)) == finished.text != ""


def test_progress_keeps_the_ids_of_a_cancelled_turn_and_the_stream_is_closed(models, special_tokens):
    text_tokenizer, speech_tokenizer, decoder = models
    ids = interleaved(text_tokenizer, special_tokens, runs=3)
    client = ScriptedClient(ids, hold_after=50)

    async def main():
        chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, client)
        progress = TurnProgress()

        async def consume():
            async for _ in chat.generate([9], progress=progress):
                pass

        try:
            task = asyncio.create_task(consume())
            await asyncio.wait_for(client.held.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return progress.reply_ids, chat.active_turns
        finally:
            chat.close()

    reply_ids, active = asyncio.run(main())
    assert reply_ids == tuple(ids[:50])
    assert client.closed and active == 0


def test_generate_refuses_bad_settings_without_a_request(models):
    text_tokenizer, speech_tokenizer, decoder = models
    client = ScriptedClient([])

    async def main():
        chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, client)
        try:
            return [e async for e in chat.generate([1], GenerationOptions(top_p=0))]
        finally:
            chat.close()

    (failed,) = asyncio.run(main())
    assert isinstance(failed, TurnFailed) and failed.kind is FailureKind.INVALID_INPUT and "top-p" in failed.message
    assert client.prompts == []


def test_prepare_input_tokenizes_speech_and_checks_text(models):
    text_tokenizer, speech_tokenizer, decoder = models
    from glm4voice.audio import load_audio

    audio = load_audio(SAMPLE_EN)

    async def main():
        chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, ScriptedClient([]))
        try:
            spoken = await chat.prepare_input(UserSpeech(Audio(audio.samples, INPUT_SAMPLE_RATE)))
            typed = await chat.prepare_input(UserText("  Hello  "))
            with pytest.raises(TurnError) as silent:
                await chat.prepare_input(UserSpeech(Audio(np.zeros(16000, np.float32), INPUT_SAMPLE_RATE)))
            return spoken, typed, silent.value
        finally:
            chat.close()

    spoken, typed, silent = asyncio.run(main())
    assert isinstance(spoken, AudioInput) and list(spoken.codes) == speech_tokenizer.tokenize(audio)
    assert typed == TextInput("Hello")
    assert silent.kind is FailureKind.NO_SPEECH
