"""``/v1/realtime`` through the official openai SDK (GA and beta clients), against the real web process and
the real token server (tiny checkpoints, CPU). Speech is espeak-ng sent as pcm16 at 24 kHz faster than
real time; speech boundaries are checked in audio time (milliseconds of the audio sent), so the results
do not depend on the machine's load."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
import typing
from contextlib import asynccontextmanager

import numpy as np
import openai
import pytest
from openai.types.beta.realtime import realtime_server_event as beta_events
from openai.types.realtime import realtime_server_event as ga_events

from openai_api.conftest import WAIT_S
from openai_api.recording_server import HELD_AFTER, HELD_MAX_NEW_TOKENS
from openai_api.strict import no_extras
from speech_samples import espeak, espeak_available, with_silence
from support import until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")]

MODEL = "glm-4-voice-9b"
RATE = 24_000
CHUNK = RATE // 10
"""100 ms appends."""
TOLERANCE_MS = 100


def _event_types(union) -> dict[str, type]:
    members = typing.get_args(typing.get_args(union)[0])
    return {member.model_fields["type"].annotation.__args__[0]: member for member in members}


GA_TYPES = _event_types(ga_events.RealtimeServerEvent)
BETA_TYPES = _event_types(beta_events.RealtimeServerEvent)


def pcm16(samples: np.ndarray) -> str:
    return base64.b64encode(np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


class Events:
    """Reads a connection's events in a task (each parsed by the SDK, and validated strictly against the
    SDK's type for its name: no unknown field); tests wait for the ones they need."""

    def __init__(self, connection, beta: bool = False):
        self.connection = connection
        self.types = BETA_TYPES if beta else GA_TYPES
        self.events: list = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _read(self) -> None:
        while True:
            raw = await self.connection.recv_bytes()
            data = json.loads(raw)
            assert data["type"] in self.types, f"not an event of this API: {data['type']}"
            no_extras(self.types[data["type"]].model_validate(data))
            event = self.connection.parse_event(raw)
            no_extras(event)
            self.events.append(event)
            self._changed.set()

    async def wait_for(self, match, after: int = 0, timeout: float = WAIT_S):
        """The first event from index ``after`` on that matches (a type name or a predicate)."""
        predicate = (lambda e: e.type == match) if isinstance(match, str) else match

        async def search():
            while True:
                for event in self.events[after:]:
                    if predicate(event):
                        return event
                if self._task.done():
                    self._task.result()
                    raise AssertionError("the connection ended")
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(search(), timeout)

    def index(self, event) -> int:
        return next(i for i, e in enumerate(self.events) if e is event)

    def of(self, name: str, response_id: str | None = None) -> list:
        return [e for e in self.events if e.type == name and (response_id is None or e.response_id == response_id)]


@asynccontextmanager
async def realtime(web, *, beta: bool = False):
    ws_url = web.api.replace("http://", "ws://")  # the beta client assumes wss:// unless told
    client = openai.AsyncOpenAI(base_url=web.api, websocket_base_url=ws_url, api_key="unused", max_retries=0)
    connect = client.beta.realtime.connect if beta else client.realtime.connect
    async with connect(model=MODEL) as connection:
        events = Events(connection, beta)
        events._task = asyncio.create_task(events._read())
        events._changed.set()
        try:
            yield connection, events
        finally:
            events._task.cancel()


async def send_audio(connection, samples: np.ndarray) -> None:
    for start in range(0, len(samples), CHUNK):
        await connection.input_audio_buffer.append(audio=pcm16(samples[start : start + CHUNK]))


def kept_ids(token_ids: list[int], special) -> list[int]:
    """What the history keeps of a stream: no stop token, no id past the audio codebook."""
    return [i for i in token_ids if i not in special.stop_ids and special.audio_code(i) < special.num_audio_codes]


def cut_after(ids: list[int], audio_tokens: int, special) -> list[int]:
    """The documented truncation rule, written out independently of the server's code."""
    seen = 0
    for index, token_id in enumerate(ids):
        seen += special.is_audio(token_id)
        if audio_tokens and seen == audio_tokens:
            return ids[: index + 1]
    return [] if audio_tokens == 0 else ids


def heard_tokens(audio_ms: int) -> int:
    return math.floor(audio_ms / 80 + 0.5)


def audio_bytes(events: Events, name: str, response_id: str) -> int:
    return sum(len(base64.b64decode(e.delta)) for e in events.of(name, response_id))


# --- a spoken conversation with server VAD and barge-in ---------------------------------------------------


def test_spoken_turns_barge_in_and_the_heard_part_of_the_cut_answer(web, token_server, special_tokens):
    first = with_silence(espeak("Hello! What is the weather like today in Paris?", sample_rate=RATE), 0.5, 1.0)
    second = with_silence(espeak("Tell me a story about a cat.", sample_rate=RATE), 0.3, 1.0)
    token_server.wait_idle()
    cancelled_before = token_server.cancelled()
    start = len(token_server.requests())

    async def scenario():
        async with realtime(web) as (connection, events):
            session = (await events.wait_for("session.created")).session
            await connection.session.update(session={"type": "realtime", "max_output_tokens": 1800})
            await events.wait_for("session.updated")
            await send_audio(connection, first.audio.samples)
            answer_one = (await events.wait_for("response.created")).response.id
            await events.wait_for(lambda e: e.type == "response.output_audio.delta")
            await send_audio(connection, second.audio.samples)
            done_one = await events.wait_for(lambda e: e.type == "response.done" and e.response.id == answer_one)
            created_two = await events.wait_for(lambda e: e.type == "response.created" and e.response.id != answer_one)
            answer_two = created_two.response.id
            await until(
                lambda: len(token_server.requests()) >= start + 2, "the second question never reached the server"
            )
            await events.wait_for(lambda e: e.type == "response.output_audio.delta" and e.response_id == answer_two)
            await connection.response.cancel()
            done_two = await events.wait_for(lambda e: e.type == "response.done" and e.response.id == answer_two)
            return session, events, answer_one, done_one, answer_two, done_two

    session, events, answer_one, done_one, answer_two, done_two = asyncio.run(scenario())
    detection = session.audio.input.turn_detection
    assert detection.type == "server_vad" and session.audio.input.format.rate == RATE
    # speech boundaries, in milliseconds of the audio sent
    started, stopped = events.of("input_audio_buffer.speech_started"), events.of("input_audio_buffer.speech_stopped")
    assert len(started) == len(stopped) == 2
    offset = len(first.audio.samples) * 1000 / RATE
    for utterance, base, start_event, stop_event in (
        (first, 0, started[0], stopped[0]),
        (second, offset, started[1], stopped[1]),
    ):
        onset = start_event.audio_start_ms + detection.prefix_padding_ms - base
        end = stop_event.audio_end_ms - detection.silence_duration_ms - base
        assert abs(onset - utterance.ms(utterance.start)) <= TOLERANCE_MS, (onset, utterance.ms(utterance.start))
        assert abs(end - utterance.ms(utterance.end)) <= TOLERANCE_MS, (end, utterance.ms(utterance.end))
        assert start_event.item_id == stop_event.item_id
    users = [e.item for e in events.of("conversation.item.added") if e.item.role == "user"]
    assert [u.id for u in users] == [started[0].item_id, started[1].item_id]
    assert [e.item_id for e in events.of("input_audio_buffer.committed")] == [u.id for u in users]
    # the barge-in: cancelled after the second question started, and no audio of it after its response.done
    assert done_one.response.status == "cancelled" and done_one.response.status_details.reason == "turn_detected"
    assert events.index(started[1]) < events.index(done_one) < events.index(stopped[1])
    late = [
        e
        for e in events.events[events.index(done_one) :]
        if e.type == "response.output_audio.delta" and e.response_id == answer_one
    ]
    assert late == []
    assert done_two.response.status == "cancelled" and done_two.response.status_details.reason == "client_cancelled"
    # the token server saw both streams cancelled, and holds none now
    token_server.wait_idle()
    assert token_server.cancelled() >= cancelled_before + 2
    # the second prompt holds the first answer up to the audio that was sent, by the documented rule
    one, two = token_server.requests()[start : start + 2]
    sent_ms = audio_bytes(events, "response.output_audio.delta", answer_one) // 2 * 1000 // RATE
    heard = cut_after(kept_ids(one["token_ids"], special_tokens), heard_tokens(sent_ms), special_tokens)
    assert sent_ms > 0 and len(heard) < len(kept_ids(one["token_ids"], special_tokens))
    prompt = two["prompt_ids"]
    assert prompt[: len(one["prompt_ids"])] == one["prompt_ids"]
    assert prompt[len(one["prompt_ids"]) : len(one["prompt_ids"]) + len(heard)] == heard
    assert prompt[len(one["prompt_ids"]) + len(heard)] == special_tokens.user
    item = done_one.response.output[0]
    assert item.status == "incomplete" and item.content[0].type == "output_audio"


# --- manual turns, text answers, truncation ----------------------------------------------------------------


def test_manual_turns_text_answers_and_truncation(web, token_server, special_tokens, models):
    question = espeak("Can you help me with my homework, please?", sample_rate=RATE)
    start = len(token_server.requests())

    async def scenario():
        async with realtime(web) as (connection, events):
            await connection.session.update(session={"type": "realtime", "max_output_tokens": 60,
                                                     "audio": {"input": {"turn_detection": None}}})  # fmt: skip
            updated = await events.wait_for("session.updated")
            await connection.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}
            )
            await events.wait_for("conversation.item.done")
            await connection.response.create()
            done_one = await events.wait_for("response.done")
            answer = done_one.response.output[0]
            mark = len(events.events)
            await connection.conversation.item.truncate(item_id=answer.id, content_index=0, audio_end_ms=400)
            truncated = await events.wait_for("conversation.item.truncated", mark)
            for bad in (dict(item_id=answer.id, content_index=0, audio_end_ms=10_000),
                        dict(item_id="item_nope", content_index=0, audio_end_ms=10)):  # fmt: skip
                mark = len(events.events)
                await connection.conversation.item.truncate(**bad)
                (await events.wait_for("error", mark))
            mark = len(events.events)
            await connection.response.cancel()
            await events.wait_for("error", mark)
            mark = len(events.events)
            await connection.input_audio_buffer.commit()
            await events.wait_for("error", mark)
            decoder_before = web.decoder()
            await connection.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Go on"}]}
            )
            mark = len(events.events)
            await connection.response.create(response={"output_modalities": ["text"]})
            done_two = await events.wait_for("response.done", mark)
            decoder_after = web.decoder()
            mark = len(events.events)
            await send_audio(connection, question.audio.samples)
            await connection.input_audio_buffer.commit()
            committed = await events.wait_for("input_audio_buffer.committed", mark)
            await connection.response.create()
            done_three = await events.wait_for("response.done", mark)
            return updated, events, done_one, truncated, done_two, decoder_before, decoder_after, committed, done_three

    (updated, events, done_one, truncated, done_two, decoder_before, decoder_after, committed,
     done_three) = asyncio.run(scenario())  # fmt: skip
    assert updated.session.audio.input.turn_detection is None
    assert done_one.response.status in ("completed", "incomplete") and done_one.response.usage.output_tokens > 0
    assert truncated.audio_end_ms == 400 and truncated.item_id == done_one.response.output[0].id
    errors = events.of("error")
    assert [e.error.code for e in errors] == [
        "invalid_value", "item_not_found", "response_cancel_not_active", "input_audio_buffer_commit_empty",
    ]  # fmt: skip
    assert errors[0].error.param == "audio_end_ms"
    # text only: no audio events, the decoder untouched
    two = done_two.response
    assert two.output_modalities == ["text"] and two.output[0].content[0].type == "output_text"
    assert not events.of("response.output_audio.delta", two.id) and decoder_after == decoder_before
    text = "".join(e.delta for e in events.of("response.output_text.delta", two.id))  # random weights: may be ""
    assert two.output[0].content[0].text == text and events.of("response.output_text.done", two.id)[0].text == text
    assert two.usage.output_tokens > 0
    # the truncated answer: 400 ms = 5 speech tokens in the next prompt
    one, second, third = token_server.requests()[start : start + 3]
    heard = cut_after(kept_ids(one["token_ids"], special_tokens), heard_tokens(400), special_tokens)
    assert sum(special_tokens.is_audio(i) for i in heard) == 5
    cut = len(one["prompt_ids"])
    assert (
        second["prompt_ids"][cut : cut + len(heard)] == heard
        and second["prompt_ids"][cut + len(heard)] == special_tokens.user
    )
    # a committed spoken question: its speech tokens in the third prompt
    codes = models.speech_tokenizer.tokenize((question.audio.samples, RATE))
    prompt = third["prompt_ids"]
    begin = len(prompt) - prompt[::-1].index(special_tokens.begin_of_audio) - 1
    assert prompt[begin + 1 : begin + 1 + len(codes)] == [special_tokens.audio_id(c) for c in codes]
    assert committed.item_id in [e.item.id for e in events.of("conversation.item.added") if e.item.role == "user"]
    assert done_three.response.status in ("completed", "incomplete")


# --- beta clients -------------------------------------------------------------------------------------------


def test_beta_clients_get_the_beta_names_and_shapes(web):
    async def scenario():
        async with realtime(web, beta=True) as (connection, events):
            created = await events.wait_for("session.created")
            await connection.session.update(session={"turn_detection": None, "max_response_output_tokens": 40,
                                                     "modalities": ["audio", "text"]})  # fmt: skip
            await events.wait_for("session.updated")
            await connection.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}
            )
            added = await events.wait_for("conversation.item.created")
            await connection.response.create(response={"modalities": ["audio", "text"]})
            done = await events.wait_for("response.done")
            return created, added, events, done

    created, added, events, done = asyncio.run(scenario())
    assert created.session.modalities == ["audio", "text"] and created.session.output_audio_format == "pcm16"
    assert added.item.content[0].type == "input_text" and added.item.content[0].text == "Hello"
    names = {e.type for e in events.events}
    assert {"response.audio.delta", "response.audio.done", "response.audio_transcript.done"} <= names
    assert not {
        n
        for n in names
        if n.startswith(("response.output_audio", "response.output_text")) or n == "conversation.item.added"
    }
    assert done.response.modalities == ["audio", "text"] and done.response.output[0].content[0].type == "audio"
    transcript = "".join(e.delta for e in events.of("response.audio_transcript.delta"))  # random weights: may be ""
    assert done.response.output[0].content[0].transcript == transcript


# --- bad input, vanished clients ----------------------------------------------------------------------------


def test_bad_events_get_error_events_and_the_session_goes_on(web):
    bad = [
        ("not json", "invalid_json", None),
        (b"\x00\x01binary", "binary_frame_not_supported", None),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 10_000_000}), "event_too_large", None),
        (json.dumps({"type": "conversation.do_magic"}), "invalid_event_type", "type"),
        (json.dumps({"type": "conversation.item.truncate", "item_id": "x", "event_id": "mine"}),
         "missing_required_parameter", "audio_end_ms"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_audio", "audio"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"odd").decode()}), "invalid_audio", "audio"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}),
         "unsupported_value", "session.audio.input.format"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}),
         "unsupported_value", "session.audio.input.turn_detection.type"),
        (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "system",
                                                                 "content": [{"type": "input_text", "text": "Be brief"}]}}),
         "unsupported_value", "item.role"),
        (json.dumps({"type": "output_audio_buffer.clear"}), "unsupported_event", "type"),
    ]  # fmt: skip

    async def scenario():
        async with realtime(web) as (connection, events):
            await events.wait_for("session.created")
            for message, _, _ in bad:
                mark = len(events.events)
                await connection.send_raw(message)
                await events.wait_for("error", mark)
            mark = len(events.events)
            await connection.session.update(session={"type": "realtime", "max_output_tokens": 5})
            updated = await events.wait_for("session.updated", mark)
            return events, updated

    events, updated = asyncio.run(scenario())
    errors = events.of("error")
    assert [(e.error.code, e.error.param) for e in errors] == [(code, param) for _, code, param in bad]
    assert all(e.error.type == "invalid_request_error" and e.error.message for e in errors)
    assert errors[4].error.event_id == "mine"
    assert updated.session.max_output_tokens == 5


def test_a_client_that_vanishes_mid_answer_leaks_no_model_server_stream(web, token_server):
    token_server.wait_idle()
    cancelled = token_server.cancelled()

    async def scenario():
        async with realtime(web) as (connection, events):
            # held by the token server after a few blocks: still streaming whenever the first audio arrives
            await connection.session.update(session={"type": "realtime", "max_output_tokens": HELD_MAX_NEW_TOKENS,
                                                     "audio": {"input": {"turn_detection": None}}})  # fmt: skip
            await events.wait_for("session.updated")
            await connection.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "A long story"}]}
            )
            await connection.response.create()
            await events.wait_for("response.output_audio.delta")
            assert token_server.health()["active_streams"] == 1
            connection._connection.transport.abort()  # gone: no close frame

    asyncio.run(scenario())
    deadline = time.monotonic() + WAIT_S
    while token_server.cancelled() < cancelled + 1:
        assert time.monotonic() < deadline, "the answer's token stream was not cancelled"
        time.sleep(0.05)
    token_server.wait_idle()
    held = token_server.requests()[-1]  # the answer was held open by the token server, not ended early
    assert held["max_new_tokens"] == HELD_MAX_NEW_TOKENS and len(held["token_ids"]) <= HELD_AFTER
