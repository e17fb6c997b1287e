"""``/v1/models`` and ``/v1/chat/completions`` through the official openai SDK, against the real web process
and the real token server (tiny checkpoints, CPU)."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import time

import numpy as np
import openai
import pytest
import soundfile as sf
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from glm4voice.audio import INPUT_SAMPLE_RATE, SPEECH_TOKEN_RATE, encode_wav, load_audio
from glm4voice.client import AsyncTokenClient, TokenClient
from glm4voice.pipeline import GenerationOptions, PipelineConfig, UserText, VoiceChat

from openai_api.conftest import TOKEN_SLOTS, WAIT_S, WebServer, web_server_args
from openai_api.recording_server import HELD_MAX_NEW_TOKENS
from openai_api.strict import no_extras, validate
from speech_samples import espeak, espeak_available
from support import ServerProcess, free_port

pytestmark = pytest.mark.slow

MODEL = "glm-4-voice-9b"
SPOKEN = "Hello! What is the weather like today in Paris?"


def sdk(web: WebServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=web.api, api_key="unused", max_retries=0, timeout=WAIT_S)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def audio_part(data: bytes, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def create(client: openai.OpenAI, **params) -> ChatCompletion:
    """A non-streamed completion, checked against the SDK's types (validated, nothing unknown)."""
    raw = client.chat.completions.with_raw_response.create(**params)
    validate(ChatCompletion, raw.http_response.json())
    completion = raw.parse()
    no_extras(completion)
    return completion


def stream(client: openai.OpenAI, **params) -> list[ChatCompletionChunk]:
    chunks = list(client.chat.completions.create(stream=True, **params))
    for chunk in chunks:
        no_extras(chunk)
        validate(ChatCompletionChunk, chunk.to_dict())
    return chunks


# --- models ----------------------------------------------------------------------------------------------


def test_one_model_is_listed_and_others_are_not_found(web):
    client = sdk(web)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    for model in models.data:
        no_extras(model)
        validate(Model, model.to_dict())
    assert client.models.retrieve(MODEL).owned_by == "zai-org"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"


# --- answers ---------------------------------------------------------------------------------------------


def test_text_answers_never_run_the_decoder(web, token_server):
    client = sdk(web)
    before = web.decoder()
    completion = create(client, model=MODEL, messages=[user("Hello")], max_completion_tokens=40, seed=5)
    chunks = stream(client, model=MODEL, messages=[user("Hello")], max_completion_tokens=40, seed=5)
    assert web.decoder() == before  # a counter on the decoder: no stream opened, no block decoded
    message = completion.choices[0].message
    assert message.role == "assistant" and message.content and message.audio is None
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == message.content  # same seed, same answer
    assert all(c.choices[0].delta.audio is None for c in chunks if c.choices)
    usage = completion.usage
    prompt = token_server.requests()[-2]["prompt_ids"]
    assert usage.prompt_tokens == len(prompt) and usage.prompt_tokens_details.audio_tokens == 0
    details = usage.completion_tokens_details
    assert details.audio_tokens + details.text_tokens == usage.completion_tokens > 0
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_only_a_streamed_answer_is_paced_for_a_listener():
    """A chat completion without ``stream`` waits for the whole answer: its reading is never paced to a
    listener (``GenerationOptions.paced``); a streamed one may be played as it arrives."""
    from glm4voice.openai_api.chat import generation_options
    from glm4voice.openai_api.chat_schema import ChatCompletionRequest

    body = {"model": MODEL, "messages": [user("Hi")], "seed": 3}
    streamed = generation_options(ChatCompletionRequest.model_validate({**body, "stream": True}))
    whole = generation_options(ChatCompletionRequest.model_validate(body))
    assert streamed.paced and not whole.paced and streamed.seed == whole.seed == 3


def test_streamed_audio_equals_the_whole_answer_for_the_same_seed(web):
    """The web process cuts decoder blocks at fixed sizes (tests/openai_api/web_server.py), so two calls
    with the same seed decode the same samples; streamed pcm16 chunks must join into the wav exactly."""
    client = sdk(web)
    params = dict(model=MODEL, messages=[user("Tell me a story.")], modalities=["text", "audio"],
                  max_completion_tokens=80, seed=21, temperature=0.8)  # fmt: skip
    before = web.decoder()
    whole = create(client, audio={"voice": "alloy", "format": "wav"}, **params)
    chunks = stream(
        client, audio={"voice": "alloy", "format": "pcm16"}, stream_options={"include_usage": True}, **params
    )
    assert web.decoder()["streams"] == before["streams"] + 2
    audio = whole.choices[0].message.audio
    samples, rate = sf.read(io.BytesIO(base64.b64decode(audio.data)), dtype="int16")
    assert rate == 24_000 and len(samples) > 24_000 // 2
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pcm = b"".join(base64.b64decode(d.audio.data) for d in deltas if d.audio is not None and d.audio.data)
    np.testing.assert_array_equal(np.frombuffer(pcm, dtype="<i2"), samples)
    assert sum(1 for d in deltas if d.audio is not None and d.audio.data) > 1  # streamed in blocks
    transcript = "".join(d.audio.transcript for d in deltas if d.audio is not None and d.audio.transcript)
    content = "".join(d.content or "" for d in deltas)
    assert transcript == content == audio.transcript == whole.choices[0].message.content != ""
    ids = {d.audio.id for d in deltas if d.audio is not None}
    assert len(ids) == 1 and ids != {audio.id}  # one id per answer
    assert deltas[0].role == "assistant" and chunks[-1].usage is not None and chunks[-1].choices == []
    expires = [d.audio.expires_at for d in deltas if d.audio is not None and d.audio.expires_at]
    assert len(expires) == 1 and abs(expires[0] - audio.expires_at) <= 60
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_spoken_questions_as_wav_and_mp3(web, token_server, models, special_tokens):
    client = sdk(web)
    speech = espeak(SPOKEN)
    wav = encode_wav(speech.audio.samples, INPUT_SAMPLE_RATE)
    mp3 = io.BytesIO()
    sf.write(mp3, speech.audio.samples, INPUT_SAMPLE_RATE, format="MP3")
    for fmt, data in (("wav", wav), ("mp3", mp3.getvalue())):
        completion = create(client, model=MODEL, messages=[{"role": "user", "content": [audio_part(data, fmt)]}],
                            max_completion_tokens=12)  # fmt: skip
        prompt = token_server.requests()[-1]["prompt_ids"]
        begin, end = prompt.index(special_tokens.begin_of_audio), prompt.index(special_tokens.end_of_audio)
        codes = [special_tokens.audio_code(i) for i in prompt[begin + 1 : end]]
        duration = load_audio(data).duration
        assert len(codes) == math.ceil(duration * SPEECH_TOKEN_RATE), fmt
        assert completion.usage.prompt_tokens_details.audio_tokens == len(codes)
        if fmt == "wav":
            assert codes == models.speech_tokenizer.tokenize(load_audio(data))


def test_an_answer_cited_by_audio_id_gives_the_pages_prompt(web, token_server, models, special_tokens):
    """Multi-turn through the API (the first answer cited by its audio id) and through the page's pipeline
    (VoiceChat.run_turn with a ChatSession, as web_demo.py runs it) with the same seeds: the token server
    receives the same second prompt from both."""
    client = sdk(web)
    settings = dict(temperature=0.8, top_p=0.9, max_completion_tokens=40)
    start = len(token_server.requests())
    first = create(client, model=MODEL, messages=[user("Hello there")], modalities=["text", "audio"], seed=9,
                   audio={"voice": "alloy", "format": "wav"}, **settings)  # fmt: skip
    audio = first.choices[0].message.audio
    assert abs(audio.expires_at - (time.time() + 3600)) < 120
    history = [user("Hello there"), {"role": "assistant", "audio": {"id": audio.id}}, user("And then?")]
    create(client, model=MODEL, messages=history, modalities=["text", "audio"], seed=10,
           audio={"voice": "alloy", "format": "wav"}, **settings)  # fmt: skip
    api_first, api_second = token_server.requests()[start : start + 2]

    async def page():
        async with AsyncTokenClient(token_server.url) as token_client:
            chat = VoiceChat(models.text_tokenizer, models.speech_tokenizer, models.decoder, token_client,
                             PipelineConfig(adaptive_blocks=False))  # fmt: skip
            try:
                session = chat.new_session()
                for text, seed in (("Hello there", 9), ("And then?", 10)):
                    options = GenerationOptions(temperature=0.8, top_p=0.9, max_new_tokens=40, seed=seed)
                    async for _ in chat.run_turn(session, UserText(text), options):
                        pass
            finally:
                chat.close()

    asyncio.run(page())
    page_first, page_second = token_server.requests()[start + 2 : start + 4]
    assert api_first["prompt_ids"] == page_first["prompt_ids"]
    assert api_first["token_ids"] == page_first["token_ids"]  # same seed: the same answer
    assert api_second["prompt_ids"] == page_second["prompt_ids"]
    # the cited answer went back whole: the generated ids (less the stop token and ids past the codebook)
    special = special_tokens
    kept = [
        i
        for i in api_first["token_ids"]
        if i not in special.stop_ids and special.audio_code(i) < special.num_audio_codes
    ]
    cited = api_second["prompt_ids"][len(api_first["prompt_ids"]) :]
    assert cited[: len(kept)] == kept and cited[len(kept)] == special.user


# --- refusals --------------------------------------------------------------------------------------------


def _bad_requests(client: openai.OpenAI):
    noise = (0.01 * np.random.default_rng(0).standard_normal(8000 * 121)).astype(np.float32)
    long_wav = encode_wav(noise, 8000)
    audio_message = lambda part: [{"role": "user", "content": [part]}]  # noqa: E731
    bad_b64 = {"type": "input_audio", "input_audio": {"data": "bm90IGJhc2U2NA==!!", "format": "wav"}}
    return [
        ("bad base64", dict(messages=audio_message(bad_b64)), 400, "messages[0].content[0].input_audio.data", "invalid_base64"),
        ("unknown format", dict(messages=audio_message(audio_part(b"RIFF", "aac"))), 400,
         "messages[0].content[0].input_audio.format", "invalid_value"),
        ("not audio", dict(messages=audio_message(audio_part(b"hello, not a sound file", "wav"))), 400,
         "messages[0].content[0].input_audio.data", "invalid_value"),
        ("too long audio", dict(messages=audio_message(audio_part(long_wav, "wav"))), 400,
         "messages[0].content[0].input_audio.data", "input_too_long"),
        ("unknown audio id", dict(messages=[user("Hi"), {"role": "assistant", "audio": {"id": "audio_nope"}}, user("So?")]),
         400, "messages[1].audio.id", "audio_not_found"),
        ("temperature", dict(messages=[user("Hi")], temperature=3), 400, "temperature", "invalid_value"),
        ("top_p", dict(messages=[user("Hi")], top_p=0), 400, "top_p", "invalid_value"),
        ("max tokens", dict(messages=[user("Hi")], max_completion_tokens=0), 400, "max_completion_tokens", "invalid_value"),
        ("n", dict(messages=[user("Hi")], n=2), 400, "n", "unsupported_parameter"),
        ("tools", dict(messages=[user("Hi")], tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
         "unsupported_parameter"),
        ("unknown parameter", dict(messages=[user("Hi")], extra_body={"top_k": 5}), 400, "top_k", "unknown_parameter"),
        ("stream as wav", dict(messages=[user("Hi")], stream=True, modalities=["text", "audio"],
                               audio={"voice": "alloy", "format": "wav"}), 400, "audio.format", "invalid_value"),
        ("audio only", dict(messages=[user("Hi")], modalities=["audio"]), 400, "modalities", "invalid_value"),
        ("output format", dict(messages=[user("Hi")], modalities=["text", "audio"], audio={"voice": "x", "format": "aac"}),
         400, "audio.format", "invalid_value"),
        ("tool message", dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "c"}]), 400, "messages[0].role",
         "invalid_value"),
        ("no messages", dict(messages=[]), 400, "messages", "invalid_value"),
        ("empty text", dict(messages=[user("   ")]), 400, "messages[0].content", "empty_input"),
        ("mixed parts", dict(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                   audio_part(b"RIFF", "wav")]}]),
         400, "messages[0].content", "invalid_value"),
        ("unknown model", dict(messages=[user("Hi")], model="gpt-4o"), 404, "model", "model_not_found"),
    ]  # fmt: skip


def test_refusals_come_in_openais_error_envelope(web, token_server):
    client = sdk(web)
    requests_before = len(token_server.requests())
    for name, params, status, param, code in _bad_requests(client):
        params = {"model": MODEL, **params}
        with pytest.raises(openai.APIStatusError) as caught:
            result = client.chat.completions.create(**params)
            if params.get("stream"):
                list(result)
        error = caught.value
        assert error.status_code == status, (name, error.response.text)
        body = error.response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, name
        assert (error.param, error.code) == (param, code), (name, body)
        assert error.type in ("invalid_request_error", "not_found_error") and error.message, name
    assert len(token_server.requests()) == requests_before  # nothing reached the token server
    assert create(client, model=MODEL, messages=[user("Still there?")], max_completion_tokens=4).choices


def test_a_busy_or_unreachable_model_server_answers_503_with_retry_after(web, token_server, tiny_checkpoints):
    client = sdk(web)
    token_server.wait_idle()
    with TokenClient(token_server.url) as holder:
        streams = [holder.stream(prompt_token_ids=[1, 2, 3], max_new_tokens=4000) for _ in range(TOKEN_SLOTS)]
        for held in streams:
            next(held)
        with pytest.raises(openai.APIStatusError) as busy:
            client.chat.completions.create(model=MODEL, messages=[user("Hi")], max_completion_tokens=4)
        for held in streams:
            held.close()
    token_server.wait_idle()
    assert busy.value.status_code == 503 and busy.value.code == "model_server_busy"
    assert busy.value.response.headers["retry-after"] == "2"
    assert create(client, model=MODEL, messages=[user("Hi")], max_completion_tokens=4).choices  # free again
    port = free_port()
    nowhere = f"http://127.0.0.1:{free_port()}"
    with ServerProcess(
        web_server_args(tiny_checkpoints, port, nowhere), f"http://127.0.0.1:{port}/v1/models", timeout=300
    ):
        lonely = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        with pytest.raises(openai.APIStatusError) as down:
            lonely.chat.completions.create(model=MODEL, messages=[user("Hi")], stream=True)
    assert down.value.status_code == 503 and down.value.code == "model_server_unavailable"
    assert down.value.response.headers["retry-after"] == "2" and "model_server.py" in down.value.message


def test_a_client_that_leaves_frees_the_model_server_at_once(web, token_server):
    client = sdk(web)
    token_server.wait_idle()
    cancelled = token_server.cancelled()
    answer = client.chat.completions.create(model=MODEL, messages=[user("Tell me a long story.")], stream=True,
                                            modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
                                            max_completion_tokens=HELD_MAX_NEW_TOKENS)  # fmt: skip
    for chunk in answer:
        if chunk.choices and chunk.choices[0].delta.audio is not None and chunk.choices[0].delta.audio.data:
            break
    answer.close()
    wait_for_cancelled(token_server, cancelled + 1)
    token_server.wait_idle()
    # a whole (not streamed) answer whose client leaves once the answer is being generated: cancelled too
    requests = len(token_server.requests())

    async def leave_while_generating() -> None:
        leaving = openai.AsyncOpenAI(base_url=web.api, api_key="unused", max_retries=0, timeout=WAIT_S)
        ask = asyncio.ensure_future(leaving.chat.completions.create(
            model=MODEL, messages=[user("Tell me a long story.")], modalities=["text", "audio"],
            max_completion_tokens=HELD_MAX_NEW_TOKENS,
        ))  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        while len(await asyncio.to_thread(token_server.requests)) == requests:
            assert time.monotonic() < deadline and not ask.done(), "the answer never started"
            await asyncio.sleep(0.05)
        ask.cancel()  # the client gives up: its connection is closed
        await asyncio.wait({ask})
        assert ask.cancelled()

    asyncio.run(leave_while_generating())
    wait_for_cancelled(token_server, cancelled + 2)
    token_server.wait_idle()
    # both answers were held open by the token server (still running when their clients left)
    assert [r["max_new_tokens"] for r in token_server.requests()[-2:]] == [HELD_MAX_NEW_TOKENS] * 2


def wait_for_cancelled(token_server, count: float) -> None:
    deadline = time.monotonic() + WAIT_S
    while token_server.cancelled() < count:
        assert time.monotonic() < deadline, "the token server never saw the stream cancelled"
        time.sleep(0.05)
