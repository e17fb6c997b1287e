"""ConversationSession with the tiny speech tokenizer and decoder, the real VAD model, and a scripted
token client (what the server would answer, recorded prompts, streams that stay open until closed)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import numpy as np
import pytest

from glm4voice.audio import INPUT_SAMPLE_RATE, resample
from glm4voice.conversation import (
    CancelReason,
    ConversationSession,
    InputCommitted,
    ItemAdded,
    ItemDeleted,
    ItemTruncated,
    ResponseAudioDelta,
    ResponseCreated,
    ResponseDone,
    ResponseStatus,
    ResponseTextDelta,
    SessionConfig,
    SessionError,
    SessionFailure,
    SpeechStarted,
    SpeechStopped,
    Turn,
    TurnDetection,
    build_prompt,
    heard_reply,
)
from glm4voice.conversation.history import reply_text
from glm4voice.pipeline import GenerationOptions, PipelineConfig, TurnFinished, UserText, VoiceChat
from glm4voice.protocol import AudioInput, TextInput

from conversation.scripted import ScriptedClient, interleaved_answer
from speech_samples import espeak, espeak_available, with_silence

WAIT_S = 120.0
"""Deadline for conditions that must become true (never a speed check)."""
FIXED_BLOCKS = PipelineConfig(adaptive_blocks=False)
"""Block cuts that do not depend on timing: the same answer decodes to the same samples."""
CHUNK_MS = 20


class Recorder:
    """The session's ``emit``: keeps every event, and lets a test wait for one."""

    def __init__(self):
        self.events: list = []
        self._changed = asyncio.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, predicate, timeout: float = WAIT_S):
        async def search():
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(search(), timeout)

    def of(self, kind, response=None) -> list:
        return [e for e in self.events if isinstance(e, kind) and (response is None or e.response is response)]


class CountingDecoder:
    def __init__(self, decoder):
        self.decoder = decoder
        self.streams = 0

    def stream(self, seed=None):
        self.streams += 1
        return self.decoder.stream(seed=seed)


@asynccontextmanager
async def conversation(models, client, config=SessionConfig(turn_detection=None), *, vad=None, decoder=None,
                       pipeline=FIXED_BLOCKS):  # fmt: skip
    chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, decoder or models.decoder, client, pipeline)
    recorder = Recorder()
    session = ConversationSession(chat, config, emit=recorder, vad=vad)
    try:
        yield chat, session, recorder
    finally:
        await session.close()
        chat.close()


async def append_in_chunks(session: ConversationSession, samples: np.ndarray) -> None:
    step = INPUT_SAMPLE_RATE * CHUNK_MS // 1000
    for start in range(0, len(samples), step):
        await session.append_audio(samples[start : start + step])


# --- answers and the history ----------------------------------------------------------------------------


def test_answers_stream_in_order_and_the_prompts_equal_the_pages(models, special_tokens):
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=2)

    async def main():
        client = ScriptedClient(answer)
        async with conversation(models, client) as (chat, session, recorder):
            session.add_user_input(TextInput("Hello"))
            first = session.create_response()
            await session.wait()
            await session.add_user_text("And then?")
            second = session.create_response()
            await session.wait()
        page_client = ScriptedClient(answer)
        page = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, page_client, FIXED_BLOCKS)
        try:
            chat_session = page.new_session()
            for text in ("Hello", "And then?"):
                async for _ in page.run_turn(chat_session, UserText(text)):
                    pass
        finally:
            page.close()
        return client.prompts, page_client.prompts, recorder, first, second

    prompts, page_prompts, recorder, first, second = asyncio.run(main())
    assert prompts == page_prompts and len(prompts) == 2
    for response in (first, second):
        assert response.status is ResponseStatus.COMPLETED and response.item.reply_ids == tuple(answer[:-1])
        deltas = recorder.of(ResponseAudioDelta, response)
        assert deltas and sum(len(d.samples) for d in deltas) == response.item.audio_samples
        assert "".join(d.text for d in recorder.of(ResponseTextDelta, response)) == response.item.text != ""
        assert response.prompt_tokens == len(prompts[0 if response is first else 1])
        assert response.output_audio_tokens == 52 and response.output_tokens == len(answer) - 1
    kinds = [type(e).__name__ for e in recorder.events if not isinstance(e, (ResponseAudioDelta, ResponseTextDelta))]
    assert kinds == ["ItemAdded", "ResponseCreated", "ItemAdded", "ResponseDone"] * 2
    order = recorder.events.index
    assert order(recorder.of(ResponseCreated)[0]) < order(recorder.of(ResponseTextDelta)[0])
    assert order(recorder.of(ResponseAudioDelta, first)[-1]) < order(recorder.of(ResponseDone)[0])


def test_audio_at_another_rate_equals_the_answer_resampled_at_once(models, special_tokens):
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=3)
    options = GenerationOptions(seed=7)

    async def main():
        async with conversation(
            models, ScriptedClient(answer), SessionConfig(turn_detection=None, output_sample_rate=24_000)
        ) as (
            chat,
            session,
            recorder,
        ):
            session.add_user_input(TextInput("Hi"))
            response = session.create_response(options=options)
            await session.wait()
            reference = [e async for e in chat.generate([1, 2], options)][-1]
        return recorder, response, reference

    recorder, response, reference = asyncio.run(main())
    assert isinstance(reference, TurnFinished)
    streamed = np.concatenate([d.samples for d in recorder.of(ResponseAudioDelta, response)])
    np.testing.assert_array_equal(streamed, resample(reference.audio, 22_050, 24_000))
    assert response.item.audio_ms == len(streamed) * 1000 // 24_000


def test_text_only_answers_never_open_the_decoder(models, special_tokens):
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=3)
    decoder = CountingDecoder(models.decoder)

    async def main():
        config = SessionConfig(turn_detection=None, output_audio=False)
        async with conversation(models, ScriptedClient(answer), config, decoder=decoder) as (chat, session, recorder):
            session.add_user_input(TextInput("Hi"))
            response = session.create_response()
            await session.wait()
        return recorder, response

    recorder, response = asyncio.run(main())
    assert decoder.streams == 0 and recorder.of(ResponseAudioDelta) == []
    assert response.status is ResponseStatus.COMPLETED and response.item.reply_ids == tuple(answer[:-1])
    assert recorder.of(ResponseTextDelta) and not response.item.has_audio


# --- cancelling and truncating ----------------------------------------------------------------------------


def test_a_cancelled_answer_keeps_what_was_emitted_and_closes_its_stream(models, special_tokens):
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=8, end=False)

    async def main():
        client = ScriptedClient(answer, hold_after=250)
        async with conversation(models, client) as (chat, session, recorder):
            session.add_user_input(TextInput("Tell me everything."))
            response = session.create_response()
            await recorder.wait_for(lambda e: isinstance(e, ResponseAudioDelta))
            cancelled = await session.cancel_response()
            open_after_cancel = client.open_streams
            await session.add_user_text("Stop. What?")
            session.create_response()
            await recorder.wait_for(lambda e: len(client.prompts) == 2 and client.held.is_set())
            return client, recorder, response, cancelled, open_after_cancel, session.items

    client, recorder, response, cancelled, open_after_cancel, items = asyncio.run(main())
    assert cancelled is response and response.status is ResponseStatus.CANCELLED
    assert response.cancel_reason is CancelReason.CLIENT_CANCELLED and open_after_cancel == 0
    item = response.item
    emitted = sum(len(d.samples) for d in recorder.of(ResponseAudioDelta, response))
    assert emitted > 0 and item.audio_samples == emitted
    assert answer[: len(item.generated_ids)] == list(item.generated_ids)
    assert item.reply_ids == heard_reply(item.generated_ids, emitted * 1000 // 22_050, special_tokens)
    assert 0 < len(item.reply_ids) < len(item.generated_ids)
    done = recorder.events.index(recorder.of(ResponseDone, response)[0])
    assert not any(isinstance(e, ResponseAudioDelta) and e.response is response for e in recorder.events[done:])
    expected = build_prompt(
        models.text_tokenizer,
        special_tokens,
        [Turn(TextInput("Tell me everything."), item.reply_ids)],
        TextInput("Stop. What?"),
    )
    assert client.prompts[1] == expected and items[1] is item


def test_truncate_cuts_an_answer_to_the_heard_audio(models, special_tokens):
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=4)

    async def main():
        client = ScriptedClient(answer)
        async with conversation(models, client) as (chat, session, recorder):
            session.add_user_input(TextInput("Hi"))
            response = session.create_response()
            await session.wait()
            item = response.item
            full_ms = item.audio_ms
            await session.truncate(item.id, 1000)
            errors = []
            for item_id, ms in ((item.id, 1001), ("item_nope", 10), (session.items[0].id, 10)):
                with pytest.raises(SessionError) as caught:
                    await session.truncate(item_id, ms)
                errors.append((caught.value.code, caught.value.param))
            await session.add_user_text("Go on")
            session.create_response()
            await session.wait()
        return client, recorder, item, full_ms, errors

    client, recorder, item, full_ms, errors = asyncio.run(main())
    assert full_ms > 4000
    assert item.reply_ids == heard_reply(answer[:-1], 1000, special_tokens)
    assert sum(special_tokens.is_audio(i) for i in item.reply_ids) == 13  # 1000 ms = 12.5 tokens, halves up
    assert item.audio_ms == 1000 and item.truncated_ms == 1000
    assert item.text == reply_text(item.reply_ids, models.text_tokenizer, special_tokens)
    (truncated,) = recorder.of(ItemTruncated)
    assert truncated.item is item and truncated.audio_end_ms == 1000
    assert errors == [("invalid_value", "audio_end_ms"), ("item_not_found", "item_id"), ("invalid_item", "item_id")]
    expected = build_prompt(
        models.text_tokenizer, special_tokens, [Turn(TextInput("Hi"), item.reply_ids)], TextInput("Go on")
    )
    assert client.prompts[1] == expected


def test_conversation_rules(models, special_tokens):
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=1)

    async def main():
        client = ScriptedClient(answer, hold_after=5)
        codes = []
        async with conversation(models, client) as (chat, session, recorder):
            for setup in ([], ["assistant"]):
                for _ in setup:
                    session.add_assistant_text("Hello, I am here.")
                with pytest.raises(SessionError) as caught:
                    session.create_response()
                codes.append(caught.value.code)
            session.add_user_input(TextInput("First"), previous_item_id="root")  # before the greeting
            with pytest.raises(SessionError) as caught:
                session.create_response()  # the greeting answers it: nothing left to answer
            codes.append(caught.value.code)
            await session.add_user_text("Second")
            await session.add_user_text("Third")  # two user turns in a row: the first has an empty answer
            session.create_response()
            with pytest.raises(SessionError) as caught:
                session.create_response()
            codes.append(caught.value.code)
            await recorder.wait_for(lambda e: client.held.is_set())
            greeting = session.items[1].reply_ids
        return client, codes, greeting

    client, codes, greeting = asyncio.run(main())
    assert codes == [
        "no_user_input",
        "invalid_conversation",
        "no_user_input",
        "conversation_already_has_active_response",
    ]
    turns = [Turn(TextInput("First"), greeting), Turn(TextInput("Second"))]
    assert client.prompts == [build_prompt(models.text_tokenizer, special_tokens, turns, TextInput("Third"))]
    assert greeting == tuple(models.text_tokenizer.encode("Hello, I am here.", allow_special=False))


# --- input audio -------------------------------------------------------------------------------------------


def test_manual_commits_and_buffer_limits(models, special_tokens):
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=1)

    async def main():
        client = ScriptedClient(answer)
        pipeline = PipelineConfig(adaptive_blocks=False, max_input_seconds=2.0)
        async with conversation(models, client, pipeline=pipeline) as (chat, session, recorder):
            errors = []
            for action in (session.commit, lambda: session.append_audio(np.zeros(INPUT_SAMPLE_RATE * 3, np.float32))):
                with pytest.raises(SessionError) as caught:
                    result = action()
                    if asyncio.iscoroutine(result):
                        await result
                errors.append(caught.value.code)
            await session.append_audio(np.zeros(INPUT_SAMPLE_RATE // 2, np.float32))  # silence
            silent = session.commit()
            await recorder.wait_for(lambda e: isinstance(e, SessionFailure))
            speech = espeak("Hello there, how are you?")
            await session.append_audio(speech.audio.samples)
            session.clear_input()
            await session.append_audio(speech.audio.samples)
            spoken = session.commit()
            session.create_response()
            await session.wait()
        return errors, recorder, silent, spoken, client, session.items

    if not espeak_available():
        pytest.skip("espeak-ng is not installed")
    errors, recorder, silent, spoken, client, items = asyncio.run(main())
    assert errors == ["input_audio_buffer_commit_empty", "input_audio_buffer_full"]
    (failure,) = recorder.of(SessionFailure)
    assert failure.error.code == "no_speech" and "No speech" in failure.error.message
    assert any(isinstance(e, ItemDeleted) and e.item_id == silent.id for e in recorder.events)
    assert silent not in items and items[0] is spoken
    speech_codes = models.speech_tokenizer.tokenize(espeak("Hello there, how are you?").audio)
    assert spoken.input == AudioInput(tuple(speech_codes))
    assert client.prompts == [build_prompt(models.text_tokenizer, special_tokens, [], AudioInput(tuple(speech_codes)))]


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_server_vad_answers_each_turn_and_speech_interrupts_the_answer(models, special_tokens, vad):
    """Two spoken questions; the second starts while the first answer streams: the answer is cancelled
    (turn_detected), keeps only what was emitted, and the second question is answered with it in the
    history. Boundaries are checked in audio time."""
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=8, end=False)
    first = with_silence(espeak("Hello! What is the weather like today in Paris?"), 0.5, 1.0)
    second = with_silence(espeak("Tell me a story about a cat."), 0.3, 1.0)
    detection = TurnDetection()

    async def main():
        client = ScriptedClient(answer, hold_after=250)
        config = SessionConfig(turn_detection=detection)
        async with conversation(models, client, config, vad=vad) as (chat, session, recorder):
            await append_in_chunks(session, first.audio.samples)
            answer_one = (await recorder.wait_for(lambda e: isinstance(e, ResponseCreated))).response
            await recorder.wait_for(lambda e: isinstance(e, ResponseAudioDelta))
            offset = session.input_samples
            await append_in_chunks(session, second.audio.samples)
            answer_two = (
                await recorder.wait_for(lambda e: isinstance(e, ResponseCreated) and e.response is not answer_one)
            ).response
            await recorder.wait_for(lambda e: len(client.prompts) == 2)
            items = list(session.items)
            await session.cancel_response()
            return client, recorder, answer_one, answer_two, offset, items

    client, recorder, answer_one, answer_two, offset, items = asyncio.run(main())
    started, stopped = recorder.of(SpeechStarted), recorder.of(SpeechStopped)
    assert len(started) == len(stopped) == 2
    for utterance, origin, start, stop in (
        (first, 0, started[0], stopped[0]),
        (second, offset, started[1], stopped[1]),
    ):
        base_ms = origin * 1000 / INPUT_SAMPLE_RATE
        assert abs(start.audio_start_ms + detection.prefix_padding_ms - base_ms - utterance.ms(utterance.start)) <= 100
        assert abs(stop.audio_end_ms - detection.silence_duration_ms - base_ms - utterance.ms(utterance.end)) <= 100
        assert start.item_id == stop.item_id
    user_one, assistant_one, user_two, assistant_two = items
    assert (user_one.id, user_two.id) == (started[0].item_id, started[1].item_id)
    assert user_one.audio_ms == stopped[0].audio_end_ms - started[0].audio_start_ms
    assert [e.item.id for e in recorder.of(InputCommitted)] == [user_one.id, user_two.id]
    # the barge-in: cancelled after the second question's start, and nothing of it after its done
    assert answer_one.status is ResponseStatus.CANCELLED and answer_one.cancel_reason is CancelReason.TURN_DETECTED
    order = recorder.events.index
    done_one = order(recorder.of(ResponseDone, answer_one)[0])
    assert order(started[1]) < done_one < order(stopped[1])
    assert not any(isinstance(e, ResponseAudioDelta) and e.response is answer_one for e in recorder.events[done_one:])
    emitted_ms = assistant_one.audio_samples * 1000 // 22_050
    assert assistant_one is answer_one.item and emitted_ms > 0
    assert assistant_one.reply_ids == heard_reply(assistant_one.generated_ids, emitted_ms, special_tokens)
    turns = [Turn(user_one.input, assistant_one.reply_ids)]
    assert client.prompts[1] == build_prompt(models.text_tokenizer, special_tokens, turns, user_two.input)
    assert assistant_two is answer_two.item and client.open_streams == 0
    assert any(isinstance(e, ItemAdded) and e.item is user_two for e in recorder.events)


def test_an_answer_cancelled_before_it_started_still_ends_and_frees_the_session(models, special_tokens):
    """A turn ended and the next began in one append: the answer's task is cancelled before it ever ran."""
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=1)

    async def main():
        client = ScriptedClient(answer)
        async with conversation(models, client) as (chat, session, recorder):
            session.add_user_input(TextInput("Hi"))
            first = session.create_response()
            await session.cancel_response()  # no await in between: the task has not run
            free = session.response is None
            await session.add_user_text("Hi again")
            second = session.create_response()
            await session.wait()
        return recorder, first, free, second, client

    recorder, first, free, second, client = asyncio.run(main())
    assert first.status is ResponseStatus.CANCELLED and free and first.item.reply_ids == ()
    assert [e.response for e in recorder.of(ResponseDone)] == [first, second]
    assert second.status is ResponseStatus.COMPLETED and len(client.prompts) == 1
    turns = [Turn(TextInput("Hi"), ())]  # the cancelled answer is an empty one
    assert client.prompts[0] == build_prompt(models.text_tokenizer, special_tokens, turns, TextInput("Hi again"))


# --- a front end with its own player: playback reports, failed turns forgotten ----------------------------


def test_playback_reports_cut_answers_to_what_was_heard(models, special_tokens):
    """A report of a finished answer heard to its end keeps it whole; a shorter one cuts it; a report of
    an answer still running cancels it first."""
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=4)
    held = interleaved_answer(models.text_tokenizer, special_tokens, runs=8, end=False)

    async def main():
        async with conversation(models, ScriptedClient(answer), SessionConfig(turn_detection=None,
                                playback_reports=True)) as (chat, session, recorder):  # fmt: skip
            session.add_user_input(TextInput("Hi"))
            first = session.create_response()
            await session.wait()
            whole = await session.playback_stopped(first.item.id, first.item.audio_ms + 50)
            kept = first.item.reply_ids
            cut = await session.playback_stopped(first.item.id, 1000)
            session.chat.client = client = ScriptedClient(held, hold_after=250)
            await session.add_user_text("More")
            second = session.create_response()
            await recorder.wait_for(lambda e: isinstance(e, ResponseAudioDelta) and e.response is second)
            running = await session.playback_stopped(second.item.id, 80)
            nothing = await session.playback_stopped(None)
        return recorder, first, whole, kept, cut, second, running, nothing, client

    recorder, first, whole, kept, cut, second, running, nothing, client = asyncio.run(main())
    assert whole is None and kept == tuple(answer[:-1])
    assert cut is first.item and first.item.reply_ids == heard_reply(answer[:-1], 1000, special_tokens)
    assert second.status is ResponseStatus.CANCELLED and client.open_streams == 0
    assert second.cancel_reason is CancelReason.TURN_DETECTED
    assert running is second.item and second.item.truncated_ms == 80 and second.item.audio_ms == 80
    assert second.item.reply_ids == heard_reply(second.item.generated_ids, 80, special_tokens)
    assert sum(special_tokens.is_audio(i) for i in second.item.reply_ids) == 1
    assert nothing is None and [e.item for e in recorder.of(ItemTruncated)] == [first.item, second.item]


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_with_playback_reports_the_next_answer_waits_for_what_was_heard(models, special_tokens, vad):
    """The first answer has finished generating but still plays when the second question starts: nothing
    is cancelled, the answer waits for the player's report, and its prompt holds the heard part only."""
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=4)
    first = with_silence(espeak("Hello! What is the weather like today in Paris?"), 0.5, 1.0)
    second = with_silence(espeak("Tell me a story about a cat."), 0.3, 1.0)
    detection = TurnDetection()

    async def main():
        client = ScriptedClient(answer)
        config = SessionConfig(turn_detection=detection, playback_reports=True)
        async with conversation(models, client, config, vad=vad) as (chat, session, recorder):
            await append_in_chunks(session, first.audio.samples)
            await recorder.wait_for(lambda e: isinstance(e, SpeechStopped))
            waited = recorder.of(ResponseCreated) == []
            await session.playback_stopped(None)  # nothing was playing when the first question began
            answer_one = (await recorder.wait_for(lambda e: isinstance(e, ResponseCreated))).response
            await session.wait()
            offset = session.input_samples
            await append_in_chunks(session, second.audio.samples)
            stops = len(recorder.of(SpeechStopped))
            still_waiting = len(recorder.of(ResponseCreated)) == 1
            await session.playback_stopped(answer_one.item.id, 1500)
            answer_two = (await recorder.wait_for(lambda e: isinstance(e, ResponseCreated) and e.response is not
                                                  answer_one)).response  # fmt: skip
            await session.wait()
            return client, recorder, answer_one, answer_two, waited, stops, still_waiting, offset, list(session.items)

    client, recorder, answer_one, answer_two, waited, stops, still_waiting, offset, items = asyncio.run(main())
    assert waited and still_waiting and stops == 2
    assert answer_one.status is ResponseStatus.COMPLETED  # heard in part after it had finished generating
    assert answer_one.item.reply_ids == heard_reply(answer[:-1], 1500, special_tokens)
    user_one, _, user_two, _ = items
    turns = [Turn(user_one.input, answer_one.item.reply_ids)]
    assert client.prompts[1] == build_prompt(models.text_tokenizer, special_tokens, turns, user_two.input)
    started = recorder.of(SpeechStarted)[1]
    assert started.speech_start_ms == started.audio_start_ms + detection.prefix_padding_ms
    onset_ms = offset * 1000 / INPUT_SAMPLE_RATE + second.ms(second.start)
    assert abs(started.speech_start_ms - onset_ms) <= 100
    assert answer_two.status is ResponseStatus.COMPLETED


class FailingClient(ScriptedClient):
    """Streams ``ids``, then fails as a token server that went away mid-answer."""

    async def stream(self, prompt=None, **params):
        from glm4voice.client import StreamFailedError

        async for token_id in super().stream(prompt, **params):
            yield token_id
        raise StreamFailedError("the connection was reset", len(self.ids))


def test_a_failed_turn_can_leave_no_trace(models, special_tokens):
    answer = interleaved_answer(models.text_tokenizer, special_tokens, runs=2, end=False)

    async def main():
        config = SessionConfig(turn_detection=None, record_failed_turns=False)
        async with conversation(models, FailingClient(answer), config) as (chat, session, recorder):
            await session.add_user_text("Hi")
            failed = session.create_response()
            await session.wait()
            after_failure = list(session.items)
            session.chat.client = client = ScriptedClient(answer + [special_tokens.user])
            await session.add_user_text("Hi again")
            session.create_response()
            await session.wait()
        return recorder, failed, after_failure, client

    recorder, failed, after_failure, client = asyncio.run(main())
    assert failed.status is ResponseStatus.FAILED and "cut off" in failed.error.message
    assert after_failure == []
    deleted = [e.item_id for e in recorder.of(ItemDeleted)]
    assert len(deleted) == 2 and deleted[-1] == failed.item.id
    order = recorder.events.index
    assert order(recorder.of(ResponseDone, failed)[0]) < order(recorder.of(ItemDeleted)[0])
    assert client.prompts == [build_prompt(models.text_tokenizer, special_tokens, [], TextInput("Hi again"))]
