"""The page's turn handler and head, without a browser: a scripted chat yields the turn's events,
the handler's named updates are checked field by field; the app is called through its ASGI interface."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio.route_utils import delete_files_created_by_app
from gradio.utils import get_upload_folder

from glm4voice.audio import OUTPUT_SAMPLE_RATE
from glm4voice.defaults import PLAYER_LEAD_S
from glm4voice.pipeline import (
    AssistantAudio,
    AssistantText,
    FailureKind,
    InputAccepted,
    PipelineConfig,
    TurnFailed,
    TurnFinished,
    TurnTimings,
    UserSpeech,
    UserText,
)
from glm4voice.protocol import EndReason, InputMode
from glm4voice.web import player_script
from glm4voice.web.app import create_app
from glm4voice.web.files import DemoFiles
from glm4voice.web.page import (
    PAGE_OUTPUTS,
    RESOURCES,
    create_demo,
    DemoSettings,
    PageUpdate,
    TurnHandler,
    UISession,
    live_player_html,
    page_head,
)
from glm4voice.web.streams import AudioStreams
from glm4voice.web.uploads import SessionUploads

SKIP = gr.skip()
AUDIO = InputMode.AUDIO.value
TEXT = InputMode.TEXT.value


@dataclass
class FakeSession:
    """The parts of a ChatSession the page uses."""

    epoch: int = 0
    turns_started: int = 0

    def clear(self) -> None:
        self.epoch += 1


@dataclass
class ScriptedChat:
    """The parts of a VoiceChat the page uses; every turn yields ``events``."""

    events: list
    sample_rate: int = OUTPUT_SAMPLE_RATE
    config: PipelineConfig = PipelineConfig()
    server_url: str = "scripted"
    client: object = None
    requests: list = field(default_factory=list)
    closed: bool = False

    def new_session(self) -> FakeSession:
        return FakeSession()

    async def run_turn(self, session, request, options):
        session.turns_started += 1
        self.requests.append((request, options))
        for event in self.events:
            yield event

    def close(self) -> None:
        self.closed = True


def accepted(mode=InputMode.TEXT) -> InputAccepted:
    return InputAccepted(mode, 42, 25 if mode is InputMode.AUDIO else 0, 2.0 if mode is InputMode.AUDIO else None, 0.1)


def finished(text: str, audio: np.ndarray) -> TurnFinished:
    timings = TurnTimings(first_audio=0.25)
    return TurnFinished(text, audio, OUTPUT_SAMPLE_RATE, EndReason.USER, (1, 2), 2, 0, 0, timings, 1.0)


def failed(kind=FailureKind.STREAM_FAILED, message="The answer was cut off.", partial="") -> TurnFailed:
    return TurnFailed(kind, message, partial, TurnTimings(), 0.5)


def updates(handler: TurnHandler, mode, audio_path, text, ui=None, session=None) -> list[PageUpdate]:
    async def collect():
        return [u async for u in handler.updates(mode, audio_path, text, 0.2, 0.8, 2000, ui, session)]

    return asyncio.run(collect())


@pytest.fixture
def files():
    files = DemoFiles()
    yield files
    files.cleanup()


def handler_for(events, files) -> tuple[TurnHandler, ScriptedChat, AudioStreams]:
    chat = ScriptedChat(events)
    streams = AudioStreams(OUTPUT_SAMPLE_RATE)
    return TurnHandler(chat, streams, files, text_refresh_s=0.0), chat, streams


def test_a_turn_becomes_named_page_updates(files):
    audio = np.linspace(-0.5, 0.5, 300, dtype=np.float32)
    events = [accepted(), AssistantText("Hel", 0.2), AssistantText("lo", 0.3),
              AssistantAudio(audio, OUTPUT_SAMPLE_RATE, 0, 0, 0.4), finished("Hello", audio)]  # fmt: skip
    handler, chat, streams = handler_for(events, files)
    first, *texts, done = updates(handler, TEXT, None, "  Hi there ")
    ui = first.session
    assert isinstance(ui, UISession) and all(u.session is ui for u in (first, *texts, done))
    (request, options), = chat.requests  # fmt: skip
    assert request == UserText("  Hi there ") and (options.temperature, options.top_p, options.max_new_tokens) == (
        0.2,
        0.8,
        2000,
    )
    # accepted: the question and a placeholder answer, the live player on the turn's stream, inputs emptied
    assert first.chat == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "…"}]
    stream = streams.get(ui.stream_id)
    assert f'data-turn="{stream.id}"' in first.live_player and "data-stream=" in first.live_player
    assert first.status == "Turn 1 · prompt 42 tokens · generating…"
    assert (first.text_input, first.audio_input) == ("", None)
    # text: the chat only
    assert [u.chat[-1]["content"] for u in texts] == ["Hel", "Hello"]
    assert all(u.live_player == u.status == u.text_input == u.audio_input == SKIP for u in texts)
    # audio went to the stream; the end closes it and adds the whole answer as a file
    assert stream.closed and stream.samples == 300
    assert done.chat[1] == {"role": "assistant", "content": "Hello"}
    assert done.chat[2]["content"]["mime_type"] == "audio/wav" and ui.files and ui.files[0].is_file()
    assert done.status.startswith("Turn 1 · done · answer: 0.0 s of speech, 2 text tokens, first audio after 0.25 s")
    assert done.live_player == done.text_input == done.audio_input == SKIP


def test_a_refused_input_stays_in_place(files):
    handler, _, _ = handler_for([failed(FailureKind.EMPTY_INPUT, "Please type a message first.")], files)
    with pytest.warns(UserWarning, match="Please type a message first"):  # gr.Warning: the page's toast
        (update,) = updates(handler, TEXT, None, "")
    assert update.status == "⚠️ **Turn 1 failed:** Please type a message first."
    assert update.chat == [] and update.live_player == update.text_input == update.audio_input == SKIP


def test_a_failed_text_turn_puts_the_question_back_and_hides_the_silent_player(files):
    handler, _, _ = handler_for([accepted(), AssistantText("Par", 0.2), failed(partial="Par")], files)
    with pytest.warns(UserWarning, match="cut off"):
        *_, update = updates(handler, TEXT, None, "Tell me more")
    assert update.chat[-1]["content"] == "Par\n\n⚠️ The answer was cut off."
    assert update.live_player == live_player_html()
    assert (update.text_input, update.audio_input) == ("Tell me more", None)


def test_a_failed_spoken_turn_puts_the_recording_back_and_keeps_the_player_that_spoke(files):
    audio = np.ones(10, dtype=np.float32)
    events = [accepted(InputMode.AUDIO), AssistantAudio(audio, OUTPUT_SAMPLE_RATE, 0, 0, 0.3), failed()]
    handler, chat, _ = handler_for(events, files)
    with pytest.warns(UserWarning, match="cut off"):
        first, update = updates(handler, AUDIO, "/tmp/question.wav", "")
    assert chat.requests[0][0] == UserSpeech("/tmp/question.wav")
    assert first.status.startswith("Turn 1 · heard 2.0 s of speech (25 speech tokens) · prompt 42 tokens")
    assert first.chat[0] == {"role": "user", "content": {"path": "/tmp/question.wav"}}
    assert update.live_player == SKIP  # some speech played: the player stays
    assert (update.text_input, update.audio_input) == (SKIP, "/tmp/question.wav")


def test_clear_empties_the_page_and_drops_the_turns_stream_and_files(files):
    audio = np.ones(10, dtype=np.float32)
    handler, _, streams = handler_for([accepted(), finished("x", audio)], files)
    ui = updates(handler, TEXT, None, "Hi")[0].session
    stream_id, answer = ui.stream_id, ui.files[0]
    outputs = asyncio.run(handler.clear(ui))
    assert len(outputs) == len(PAGE_OUTPUTS) == 6
    cleared = dict(zip(PAGE_OUTPUTS, outputs))
    assert cleared == dict(chat=[], live_player=live_player_html(), status="", session=ui, text_input="",
                           audio_input=None)  # fmt: skip
    assert ui.chat.epoch == 1 and ui.messages == [] and ui.stream_id is None
    assert streams.get(stream_id) is None and not answer.exists()
    assert asyncio.run(handler.clear(None))[PAGE_OUTPUTS.index("session")] is None


def test_clear_stops_a_running_turn_whose_last_update_is_the_cleared_page(files):
    """Clear while the turn waits for the server: the turn's pipeline is closed at once, the turn's
    own last update is the cleared page, and Clear answers only after the turn has ended."""
    closed = asyncio.Event()

    class WaitingChat(ScriptedChat):
        async def run_turn(self, session, request, options):
            try:
                yield accepted()
                yield AssistantText("Par", 0.2)
                await asyncio.Event().wait()  # no more tokens for now
                raise AssertionError("the handler kept reading a cleared turn")
            finally:
                closed.set()

    handler = TurnHandler(WaitingChat([]), AudioStreams(OUTPUT_SAMPLE_RATE), files, text_refresh_s=0.0)

    async def scenario():
        turn = handler.updates(TEXT, None, "Hi", 0.2, 0.8, 2000, None)
        first, text = await anext(turn), await anext(turn)
        ui = first.session
        rest = asyncio.ensure_future(_drain(turn))
        await asyncio.sleep(0)  # the turn now waits for its pipeline
        assert ui.running is not None and not closed.is_set()
        outputs = await handler.clear(ui)
        assert closed.is_set() and ui.running is None  # the turn ended before Clear answered
        return ui, first, text, await rest, dict(zip(PAGE_OUTPUTS, outputs))

    ui, first, text, rest, cleared = asyncio.run(scenario())
    assert text.chat[-1]["content"] == "Par"
    (last,) = rest
    assert last.chat == [] and last.status == "" and last.live_player == live_player_html()
    assert (last.text_input, last.audio_input) == ("", None)
    assert cleared["chat"] == [] and cleared["status"] == "" and ui.messages == [] and ui.chat.epoch == 1
    assert handler.streams.get(first.session.stream_id) is None


async def _drain(turn) -> list:
    return [update async for update in turn]


def test_a_turn_ends_normally_without_clear(files):
    handler, _, _ = handler_for([accepted(), finished("x", np.zeros(0, np.float32))], files)
    *_, done = updates(handler, TEXT, None, "Hi")
    assert done.status.startswith("Turn 1 · done") and done.session.running is None


def test_a_browser_sessions_streams_are_capped_together(files):
    handler, _, streams = handler_for([accepted()], files)
    streams.max_per_session = 2
    ids = [updates(handler, TEXT, None, "Hi", session="browser-a")[0].session.stream_id for _ in range(4)]
    other = updates(handler, TEXT, None, "Hi", session="browser-b")[0].session.stream_id
    assert [streams.get(i) is not None for i in ids] == [False, False, True, True]
    assert streams.get(other) is not None and streams.get(other).session == "browser-b"


def test_page_updates_are_positional_outputs_in_one_order():
    update = PageUpdate(status="s", audio_input=None)
    assert PAGE_OUTPUTS == ("chat", "live_player", "status", "session", "text_input", "audio_input")
    assert update.outputs() == (SKIP, SKIP, "s", SKIP, SKIP, None)


def test_the_page_head_hands_the_player_its_settings_from_python():
    head = page_head(OUTPUT_SAMPLE_RATE, PLAYER_LEAD_S)
    assert f"window.GLM4VOICE_SAMPLE_RATE = {OUTPUT_SAMPLE_RATE};" in head
    assert f"window.GLM4VOICE_PLAYER_LEAD_S ??= {PLAYER_LEAD_S!r};" in head
    assert head.index("GLM4VOICE_PLAYER_LEAD_S") < head.index("glm4voicePlayer")  # set before the player runs
    script = player_script()
    assert 'pageSetting("GLM4VOICE_PLAYER_LEAD_S")' in script and 'pageSetting("GLM4VOICE_SAMPLE_RATE")' in script
    assert "22050" not in script and "0.15" not in script  # no values of its own


def test_the_app_serves_the_page_with_the_chats_player_lead(files):
    chat = ScriptedChat([], config=PipelineConfig(player_lead_s=0.25))
    app = create_app(chat, DemoSettings(random_weights_notice=True))

    async def fetch():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.get("/config"), await client.get("/glm4voice/stream/unknown")

    config, missing = asyncio.run(fetch())
    assert config.status_code == 200
    assert "GLM4VOICE_PLAYER_LEAD_S ??= 0.25" in config.text and "Random weights" in config.text
    assert missing.status_code == 404
    app.state.files.cleanup()


def test_the_app_refuses_files_its_browser_session_did_not_upload(files):
    app = create_app(ScriptedChat([]), DemoSettings())
    body = {"data": ["audio", {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "", 0.2, 0.8, 40]}

    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            return await client.post("/gradio_api/call/respond", json=body)

    refused = asyncio.run(call())
    assert refused.status_code == 403 and "did not upload" in refused.json()["detail"]
    app.state.files.cleanup()


def test_every_session_may_submit_the_sample_prompts_which_gradio_keeps(files):
    uploads = SessionUploads()
    demo = create_demo(ScriptedChat([]), AudioStreams(OUTPUT_SAMPLE_RATE), files, DemoSettings(), uploads)
    cached = {str(p) for p in Path(get_upload_folder()).rglob("sample_*.wav")}
    assert len(cached) >= 2 and all(uploads.allows(None, path) for path in cached)
    assert not uploads.allows(None, str(RESOURCES / "sample_en.wav"))  # the copy Gradio hands out, not the source
    delete_files_created_by_app(demo, age=None)  # Gradio's clean-up (delete_cache), as if an hour had passed
    assert all(Path(path).is_file() for path in cached)
