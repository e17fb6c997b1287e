"""The page's live socket (conversation mode) without a browser: the live routes served by uvicorn on a
loopback port, a WebSocket client sending espeak-ng speech as the page does (int16 PCM at 48 kHz, 20 ms
messages, faster than real time), the real silero-vad, a scripted chat under the real tab and session.
Speech boundaries are checked in audio time, so nothing depends on the machine's load."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from glm4voice.audio import OUTPUT_SAMPLE_RATE
from glm4voice.conversation import ResponseStatus, Turn, TurnDetection, build_prompt, heard_reply
from glm4voice.conversation.vad import SileroVAD
from glm4voice.pipeline import AssistantAudio, AssistantText
from glm4voice.web.files import DemoFiles
from glm4voice.web.live import LIVE_PATH, WORKLET_PATH, LiveTabs, add_live_routes, live_url
from glm4voice.web.streams import AudioStreams, add_stream_route
from glm4voice.web.tab import PageTab

from scripted_chat import ScriptedChat
from speech_samples import espeak, espeak_available, with_silence
from support import free_port, until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")]

RATE = 48_000
CHUNK = RATE // 50
"""20 ms messages, as the page's worklet sends."""
WAIT_S = 120.0
"""Deadline for messages that must come (never a speed check)."""
TOLERANCE_MS = 100


def pcm16(samples: np.ndarray) -> bytes:
    return np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


class Socket:
    """A live socket client that reads every message into a list; tests wait for the ones they need."""

    def __init__(self, websocket):
        self.websocket = websocket
        self.messages: list[dict] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for text in self.websocket:
                self.messages.append(json.loads(text))
                self._changed.set()
        except ConnectionClosed:
            pass
        self._changed.set()

    async def wait_for(self, kind: str, after: int = 0) -> dict:
        async def search():
            while True:
                for message in self.messages[after:]:
                    if message["type"] == kind:
                        return message
                if self._reader.done():
                    raise AssertionError(f"the socket closed before a {kind} message: {self.messages}")
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(search(), WAIT_S)

    def index(self, message: dict) -> int:
        return next(i for i, m in enumerate(self.messages) if m is message)

    async def send_audio(self, samples: np.ndarray) -> None:
        for start in range(0, len(samples), CHUNK):
            await self.websocket.send(pcm16(samples[start : start + CHUNK]))


@asynccontextmanager
async def live_server(tabs: LiveTabs, streams: AudioStreams):
    app = FastAPI()
    add_stream_route(app, streams)
    add_live_routes(app, tabs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def files():
    files = DemoFiles()
    yield files
    files.cleanup()


def test_a_spoken_conversation_with_barge_in_over_the_live_socket(text_tokenizer, files):
    """Two questions; the second starts while the first answer is still generated: the socket says
    speech started, the page reports what it heard of the answer, the answer is cut to that and the
    second question is answered with only the heard part in its prompt."""
    chat = ScriptedChat(text_tokenizer, [], hold=True)
    special = chat.special
    reply = tuple(text_tokenizer.encode("Sure, here it is", allow_special=False)) + tuple(
        special.audio_id(k) for k in range(60)
    )
    chat.reply_ids = reply
    chat.events = [AssistantText("Sure, here it is", 0.1),
                   AssistantAudio(np.zeros(3 * OUTPUT_SAMPLE_RATE, np.float32), OUTPUT_SAMPLE_RATE, 0, 0, 0.2)]  # fmt: skip
    first = with_silence(espeak("Hello! What is the weather like today in Paris?", sample_rate=RATE), 0.5, 1.0)
    second = with_silence(espeak("Stop. Tell me a story about a cat instead.", sample_rate=RATE), 0.3, 1.0)
    detection = TurnDetection()

    async def main():
        vad = await SileroVAD.load()
        streams, tabs = AudioStreams(OUTPUT_SAMPLE_RATE), LiveTabs()
        tab = PageTab(chat, streams, files)
        tabs.add(tab)
        try:
            async with live_server(tabs, streams) as (ws_base, http_base):
                await tab.listen(detection, vad=vad)
                async with connect(ws_base + live_url(tab)) as websocket:
                    socket = Socket(websocket)
                    await socket.wait_for("ready")
                    errors = await bad_messages(socket)
                    await websocket.send(json.dumps({"type": "start", "sample_rate": RATE}))
                    await socket.send_audio(first.audio.samples)
                    started_one = await socket.wait_for("speech_started")
                    await websocket.send(json.dumps({"type": "playback", "turn": None, "played_ms": 0}))
                    answer_one = await socket.wait_for("answer")
                    await until(lambda: chat.held is not None and chat.held.is_set())
                    chat.held.clear()
                    mark = len(socket.messages)
                    await socket.send_audio(second.audio.samples)
                    started_two = await socket.wait_for("speech_started", mark)
                    done_one = await socket.wait_for("answer_done", mark)
                    await websocket.send(json.dumps({"type": "playback", "turn": answer_one["turn"], "played_ms": 300}))
                    answer_two = await socket.wait_for("answer", mark)
                    await until(lambda: len(chat.prompts) == 2)
                    await websocket.send(json.dumps({"type": "bye"}))
                    await socket._reader
                items = list(tab.session.items)
                running_after_bye = tab.session.response is not None and items[-1].status.value == "in_progress"
                return socket, errors, started_one, started_two, done_one, answer_one, answer_two, items, \
                    running_after_bye  # fmt: skip
        finally:
            await tab.close()
            vad.close()

    (socket, errors, started_one, started_two, done_one, answer_one, answer_two, items,
     running_after_bye) = asyncio.run(main())  # fmt: skip
    assert errors == [
        "send {type: start, sample_rate} before the audio",
        "sample_rate must be a whole number of Hz between 8000 and 192000",
        "unknown message type 'nope'",
    ]
    # speech boundaries in milliseconds of the audio sent (16 kHz positions of the 48 kHz stream)
    offset_ms = len(first.audio.samples) * 1000 / RATE
    for utterance, base, started in ((first, 0, started_one), (second, offset_ms, started_two)):
        assert abs(started["speech_start_ms"] - base - utterance.ms(utterance.start)) <= TOLERANCE_MS
        assert started["audio_start_ms"] == started["speech_start_ms"] - detection.prefix_padding_ms
    stops = [m for m in socket.messages if m["type"] == "speech_stopped"]
    assert len(stops) == 2 and all(m["item_id"] for m in stops)
    # the barge-in: the first answer cancelled after the second question began, cut to the 300 ms heard
    assert done_one == {"type": "answer_done", "turn": answer_one["turn"], "status": "cancelled"}
    assert socket.index(started_two) < socket.index(done_one) < socket.index(answer_two)
    assert answer_one["stream"] == f"glm4voice/stream/{answer_one['turn']}" and answer_two["turn"] != answer_one["turn"]
    user_one, assistant_one, user_two, assistant_two = items
    assert assistant_one.truncated_ms == 300 and assistant_one.reply_ids == heard_reply(reply, 300, special)
    assert chat.prompts[1] == build_prompt(
        text_tokenizer, special, [Turn(user_one.input, assistant_one.reply_ids)], user_two.input
    )
    assert running_after_bye and assistant_two is items[-1]  # bye: the answer goes on


async def bad_messages(socket: Socket) -> list[str]:
    """Refused messages get an error message; the socket goes on."""
    errors = []
    for message in (
        pcm16(np.zeros(100)),
        json.dumps({"type": "start", "sample_rate": 5}),
        json.dumps({"type": "nope"}),
    ):
        mark = len(socket.messages)
        await socket.websocket.send(message)
        errors.append((await socket.wait_for("error", mark))["message"])
    return errors


def test_unknown_sockets_are_refused_and_a_vanished_page_stops_its_answer(text_tokenizer, files):
    chat = ScriptedChat(text_tokenizer, [AssistantText("Hi", 0.1)], hold=True)

    async def main():
        vad = await SileroVAD.load()
        streams, tabs = AudioStreams(OUTPUT_SAMPLE_RATE), LiveTabs()
        tab = PageTab(chat, streams, files)
        tabs.add(tab)
        try:
            async with live_server(tabs, streams) as (ws_base, http_base):
                try:
                    async with connect(ws_base + LIVE_PATH.lstrip("/") + "/nobody") as websocket:
                        await websocket.recv()
                    refused = None
                except Exception as error:  # noqa: BLE001 (the handshake is refused, HTTP 403, or the socket closed)
                    refused = error
                await tab.listen(TurnDetection(), vad=vad)
                await tab.submit(*typed("Tell me a long story"))
                websocket = await connect(ws_base + live_url(tab))
                socket = Socket(websocket)
                await socket.wait_for("ready")
                await until(lambda: chat.held is not None and chat.held.is_set())
                websocket.transport.abort()  # gone, no goodbye
                await until(lambda: tab.session.response is None)
                answer = tab.view.latest
                return refused, answer, tab.listening
        finally:
            await tab.close()
            vad.close()

    refused, answer, listening = asyncio.run(main())
    assert isinstance(refused, InvalidStatus) and refused.response.status_code == 403  # closed before accepting
    assert answer.response.status is ResponseStatus.CANCELLED and not listening


def typed(text: str):
    from glm4voice.pipeline import GenerationOptions, UserText

    return UserText(text), GenerationOptions(), text


def test_the_worklet_path_is_under_the_live_path():
    assert WORKLET_PATH.startswith(LIVE_PATH + "/")
