"""The page's handlers and head, without a browser: a scripted chat (the tiny text tokenizer, inputs
accepted or refused as scripted, answers of scripted events) under the real tab, conversation session
and chat view; the handler's named updates are checked field by field; the app is called through its
ASGI interface."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import soundfile as sf
from gradio.route_utils import delete_files_created_by_app
from gradio.utils import get_upload_folder

from glm4voice.audio import OUTPUT_SAMPLE_RATE
from glm4voice.conversation import ResponseStatus, heard_reply
from glm4voice.defaults import PLAYER_LEAD_S
from glm4voice.pipeline import (
    AssistantAudio,
    AssistantText,
    FailureKind,
    PipelineConfig,
    TurnFailed,
    TurnFinished,
    TurnTimings,
    UserSpeech,
    UserText,
)
from glm4voice.protocol import Conversation, EndReason, InputMode, SpecialTokens, TextInput
from glm4voice.web import live_script, player_script
from glm4voice.web.app import create_app
from glm4voice.web.chat_view import CUT_MARK
from glm4voice.web.files import DemoFiles
from glm4voice.web.live import LIVE_PATH, WORKLET_PATH
from glm4voice.web.page import (
    PAGE_OUTPUTS,
    RESOURCES,
    DemoSettings,
    PageUpdate,
    TurnHandler,
    create_demo,
    live_player_html,
    live_socket_html,
    page_head,
)
from glm4voice.web.streams import AudioStreams
from glm4voice.web.tab import PageTab
from glm4voice.web.uploads import SessionUploads

from scripted_chat import ScriptedChat
from support import until

SKIP = gr.skip()
AUDIO = InputMode.AUDIO.value
TEXT = InputMode.TEXT.value
WAIT_S = 60.0
"""Deadline for conditions that must become true (never a speed check)."""


def finished(text: str, audio: np.ndarray, reply_ids=(1, 2)) -> TurnFinished:
    timings = TurnTimings(first_audio=0.25)
    return TurnFinished(text, audio, OUTPUT_SAMPLE_RATE, EndReason.USER, tuple(reply_ids), len(reply_ids), 0, 0,
                        timings, 1.0)  # fmt: skip


def failed(kind=FailureKind.STREAM_FAILED, message="The answer was cut off.", partial="") -> TurnFailed:
    return TurnFailed(kind, message, partial, TurnTimings(), 0.5)


def speech(seconds: float) -> np.ndarray:
    return np.linspace(-0.5, 0.5, int(seconds * OUTPUT_SAMPLE_RATE), dtype=np.float32)


@pytest.fixture
def files():
    files = DemoFiles()
    yield files
    files.cleanup()


@pytest.fixture
def scripted(text_tokenizer, files):
    """``scripted(events, **chat_fields)``: a handler over a ScriptedChat."""

    def make(events, **fields) -> tuple[TurnHandler, ScriptedChat, AudioStreams]:
        chat = ScriptedChat(text_tokenizer, events, **fields)
        streams = AudioStreams(OUTPUT_SAMPLE_RATE)
        return TurnHandler(chat, streams, files, text_refresh_s=0.0), chat, streams

    return make


async def collect(handler: TurnHandler, mode, audio_path, text, ui=None, session=None) -> list[PageUpdate]:
    return [u async for u in handler.updates(mode, audio_path, text, 0.2, 0.8, 2000, ui, session)]


def fresh_prompt(text_tokenizer, text: str) -> list[int]:
    return Conversation(text_tokenizer, SpecialTokens.from_tokenizer(text_tokenizer)).prompt_for(TextInput(text))


# --- typed and recorded turns -------------------------------------------------------------------------


def test_a_turn_becomes_named_page_updates(scripted, text_tokenizer):
    audio = speech(0.5)
    events = [AssistantText("Hel", 0.2), AssistantText("lo", 0.3), AssistantAudio(audio, OUTPUT_SAMPLE_RATE, 0, 0, 0.4),
              finished("Hello", audio)]  # fmt: skip
    handler, chat, streams = scripted(events)
    first, *texts, done = asyncio.run(collect(handler, TEXT, None, "  Hi there "))
    tab = first.session
    assert isinstance(tab, PageTab) and all(u.session is tab for u in (first, *texts, done))
    assert chat.requests == [UserText("  Hi there ")]
    (options,) = chat.options
    assert (options.temperature, options.top_p, options.max_new_tokens) == (0.2, 0.8, 2000)
    assert chat.prompts == [fresh_prompt(text_tokenizer, "Hi there")]
    # accepted: the question and a placeholder answer, the live player on the answer's stream, inputs emptied
    assert first.chat == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "…"}]
    answer = tab.view.latest
    assert f'data-turn="{answer.turn}"' in first.live_player and "data-stream=" in first.live_player
    assert first.status == f"Turn 1 · prompt {len(chat.prompts[0])} tokens · generating…"
    assert (first.text_input, first.audio_input) == ("", None)
    # text: the chat only
    shown = [u.chat[-1]["content"] for u in texts]  # then the final text, maybe before the wav is written
    assert shown[:2] == ["Hel", "Hello"] and set(shown[2:]) <= {"Hello"}
    assert all(u.live_player == u.status == u.text_input == u.audio_input == SKIP for u in texts)
    # audio went to the stream; the end closes it and adds the whole answer as a file
    stream = streams.get(answer.turn)
    assert stream.closed and stream.samples == len(audio)
    assert done.chat[1] == {"role": "assistant", "content": "Hello"}
    path = done.chat[2]["content"]["path"]
    assert done.chat[2]["content"]["mime_type"] == "audio/wav" and sf.info(path).frames == len(audio)
    assert done.status.startswith("Turn 1 · done · answer: 0.5 s of speech, 2 text tokens, first audio after")
    assert done.live_player == done.text_input == done.audio_input == SKIP
    assert [type(i).__name__ for i in tab.session.items] == ["UserItem", "AssistantItem"]


def test_a_refused_input_stays_in_place(scripted):
    handler, chat, _ = scripted([])
    with pytest.warns(UserWarning, match="Please type a message first"):  # gr.Warning: the page's toast
        (update,) = asyncio.run(collect(handler, TEXT, None, ""))
    assert update.status == "⚠️ **Turn 1 failed:** Please type a message first."
    assert update.chat == [] and update.live_player == update.text_input == update.audio_input == SKIP
    assert chat.prompts == [] and update.session.session.items == []
    # the next attempt is a turn of its own, whether it is refused too or answered
    chat.events = [finished("Yes", speech(0.1))]
    with pytest.warns(UserWarning, match="Please type a message first"):
        (again,) = asyncio.run(collect(handler, TEXT, None, "  ", update.session))
    *_, answered = asyncio.run(collect(handler, TEXT, None, "Hi", update.session))
    assert again.status == "⚠️ **Turn 2 failed:** Please type a message first."
    assert answered.status.startswith("Turn 3 · done")


def test_a_failed_text_turn_puts_the_question_back_and_is_not_recorded(scripted, text_tokenizer):
    handler, chat, _ = scripted([AssistantText("Par", 0.2), failed(partial="Par")])
    with pytest.warns(UserWarning, match="cut off"):
        *_, update = asyncio.run(collect(handler, TEXT, None, "Tell me more"))
    assert update.chat[-1]["content"] == "Par\n\n⚠️ The answer was cut off."
    assert update.status == "⚠️ **Turn 1 failed:** The answer was cut off."
    assert update.live_player == live_player_html()  # no speech came: the player hides
    assert (update.text_input, update.audio_input) == ("Tell me more", None)
    tab = update.session
    assert tab.session.items == []  # a failed turn is not recorded: a retry starts afresh
    chat.events = [finished("Yes", speech(0.1))]
    asyncio.run(collect(handler, TEXT, None, "Tell me more", tab))
    assert chat.prompts[1] == fresh_prompt(text_tokenizer, "Tell me more")


def test_a_failed_spoken_turn_puts_the_recording_back_and_keeps_the_player_that_spoke(scripted):
    events = [AssistantAudio(np.ones(10, np.float32), OUTPUT_SAMPLE_RATE, 0, 0, 0.3), failed()]
    handler, chat, _ = scripted(events)
    with pytest.warns(UserWarning, match="cut off"):
        first, *_, update = asyncio.run(collect(handler, AUDIO, "/tmp/question.wav", ""))
    assert chat.requests == [UserSpeech("/tmp/question.wav")]
    assert first.status.startswith("Turn 1 · heard 0.4 s of speech (5 speech tokens) · prompt")
    assert first.chat[0] == {"role": "user", "content": {"path": "/tmp/question.wav"}}
    assert update.live_player == SKIP  # some speech played: the player stays
    assert (update.text_input, update.audio_input) == (SKIP, "/tmp/question.wav")


def test_a_second_submit_while_an_answer_runs_is_refused(scripted):
    handler, chat, _ = scripted([AssistantAudio(speech(0.2), OUTPUT_SAMPLE_RATE, 0, 0, 0.1)], hold=True)

    async def main():
        turn = handler.updates(TEXT, None, "Hi", 0.2, 0.8, 2000, None)
        first = await anext(turn)
        with pytest.warns(UserWarning, match="Please wait"):
            busy = await collect(handler, TEXT, None, "Hello?", first.session)
        await handler.clear(first.session)
        rest = [u async for u in turn]
        return busy, rest

    busy, rest = asyncio.run(main())
    assert busy[-1].status.startswith("⚠️ **Turn 2 failed:** Please wait")
    assert rest[-1].status == "" and rest[-1].chat == []  # Clear ended the first turn


# --- Stop ---------------------------------------------------------------------------------------------


HEARD_MS = 550
"""What the page's player reports heard in the stop test: a value whose samples, counted back in whole
milliseconds, give 549 ms (rounded to a tenth, 0.5 against 0.6 s)."""


def test_stop_cancels_the_answer_and_keeps_what_was_heard(scripted, text_tokenizer):
    special = SpecialTokens.from_tokenizer(text_tokenizer)
    reply = tuple(text_tokenizer.encode("Once upon a time", allow_special=False)) + tuple(
        special.audio_id(k) for k in range(40)
    )
    audio = speech(2.0)
    events = [AssistantText("Once upon", 0.1), AssistantAudio(audio, OUTPUT_SAMPLE_RATE, 0, 0, 0.2)]
    handler, chat, streams = scripted(events, reply_ids=reply, hold=True)

    async def main():
        turn = handler.updates(TEXT, None, "Tell me a story", 0.2, 0.8, 2000, None)
        first = await anext(turn)
        tab = first.session
        rest = asyncio.ensure_future(_drain(turn))
        await until(lambda: chat.held is not None and chat.held.is_set(), "the answer never streamed")
        answer = tab.view.latest
        report = json.dumps({"turn": answer.turn, "playedMs": HEARD_MS, "wasPlaying": True})
        stopped = dict(zip(PAGE_OUTPUTS, await handler.stop(report, tab), strict=True))
        updates = await asyncio.wait_for(rest, WAIT_S)
        nothing = await handler.stop(json.dumps({"turn": None, "playedMs": 0}), tab)
        return tab, answer, stopped, updates, nothing

    tab, answer, stopped, updates, nothing = asyncio.run(main())
    response, item = answer.response, answer.item
    assert response.status is ResponseStatus.CANCELLED and answer.stream.closed
    assert item.truncated_ms == HEARD_MS and item.reply_ids == heard_reply(reply, HEARD_MS, chat.special)
    assert sum(chat.special.is_audio(i) for i in item.reply_ids) == 7  # 550 ms: 6.9 tokens
    # the page: the answer marked as cut after what was heard (0.55 s: "0.6"; the wav's whole samples last
    # 549.98 ms, which would read "0.5"), its wav the heard part, the status says so
    text, wav = stopped["chat"][1]["content"], stopped["chat"][2]["content"]["path"]
    assert CUT_MARK in text and "cut after 0.6 s" in text
    assert sf.info(wav).frames == OUTPUT_SAMPLE_RATE * HEARD_MS // 1000
    assert stopped["status"].startswith("Turn 1 · stopped ✂️")
    assert updates[-1].status == stopped["status"] and updates[-1].chat == stopped["chat"]
    assert nothing == PageUpdate(session=tab).outputs()  # nothing more to stop: the page stays
    # the next turn's prompt holds the heard part only
    chat.hold, chat.events = False, [finished("Ok", speech(0.1))]
    asyncio.run(collect(handler, TEXT, None, "Go on", tab))
    conversation = Conversation(text_tokenizer, chat.special)
    conversation.add_turn(conversation.prompt_for(TextInput("Tell me a story")), item.reply_ids)
    assert chat.prompts[1] == conversation.prompt_for(TextInput("Go on"))


async def _drain(updates) -> list[PageUpdate]:
    return [u async for u in updates]


def test_stop_without_a_reported_turn_stops_the_answer_in_flight_with_nothing_heard(scripted):
    handler, chat, _ = scripted([AssistantText("Hi", 0.1)], reply_ids=(5, 6, 7), hold=True)

    async def main():
        turn = handler.updates(TEXT, None, "Hello", 0.2, 0.8, 2000, None)
        first = await anext(turn)
        rest = asyncio.ensure_future(_drain(turn))
        await until(lambda: chat.held is not None and chat.held.is_set(), "the answer never streamed")
        await handler.stop("not json", first.session)
        await asyncio.wait_for(rest, WAIT_S)
        return first.session.view.latest

    answer = asyncio.run(main())
    assert answer.response.status is ResponseStatus.CANCELLED and answer.item.reply_ids == ()


# --- Clear, closing the tab ---------------------------------------------------------------------------


def test_clear_empties_the_page_and_drops_the_turns_stream_and_files(scripted):
    audio = np.ones(10, np.float32)
    handler, _, streams = scripted([AssistantAudio(audio, OUTPUT_SAMPLE_RATE, 0, 0, 0.1), finished("x", audio)])
    tab = asyncio.run(collect(handler, TEXT, None, "Hi"))[0].session
    answer = tab.view.latest
    wav = answer.audio_path
    outputs = asyncio.run(handler.clear(tab))
    assert len(outputs) == len(PAGE_OUTPUTS) == 7
    cleared = dict(zip(PAGE_OUTPUTS, outputs, strict=True))
    assert cleared == dict(chat=[], live_player=live_player_html(), status="", session=tab, text_input="",
                           audio_input=None, live_socket=SKIP)  # fmt: skip
    assert tab.epoch == 1 and tab.messages() == [] and tab.session.items == []
    assert streams.get(answer.turn) is None and not wav.exists()
    assert asyncio.run(handler.clear(None))[PAGE_OUTPUTS.index("session")] is None


class HeldFiles(DemoFiles):
    """Answer files whose writing (in the worker thread) waits until ``release`` is set."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()

    def write_wav(self, stem, samples, sample_rate):
        self.started.set()
        assert self.release.wait(WAIT_S), "the test never released the write"
        return super().write_wav(stem, samples, sample_rate)


def test_an_answer_is_done_once_its_wav_is_written_off_the_event_loop_and_clear_drops_a_late_one(text_tokenizer):
    audio = speech(0.3)
    chat = ScriptedChat(text_tokenizer, [AssistantAudio(audio, OUTPUT_SAMPLE_RATE, 0, 0, 0.1), finished("x", audio)])
    files = HeldFiles()
    handler = TurnHandler(chat, AudioStreams(OUTPUT_SAMPLE_RATE), files, text_refresh_s=0.0)

    async def main():
        turn = handler.updates(TEXT, None, "Hi", 0.2, 0.8, 2000, None)
        tab = (await anext(turn)).session
        rest = asyncio.ensure_future(_drain(turn))
        answer = tab.view.latest
        await until(lambda: answer.ended and files.started.is_set(), "the answer never ended")
        waiting = (answer.done, answer.status(), rest.done())  # the event loop runs on while the file is written
        await handler.clear(tab)  # the handler ends with the cleared page; the write is still held
        files.release.set()
        await tab.view.settled()
        return tab, answer, waiting, await rest

    try:
        tab, answer, (done, status, handler_ended), rest = asyncio.run(main())
        assert not done and status.endswith("generating…") and not handler_ended
        assert rest[-1].chat == [] and tab.messages() == [] and answer.audio_path is None
        assert list(files.folder.iterdir()) == []  # written after Clear: removed at once
    finally:
        files.cleanup()


def test_clear_answers_after_the_running_turns_handler_ended_with_the_cleared_page(scripted):
    """Clear while an answer streams: the answer stops (its token stream closes), the Submit handler's own last
    update is the cleared page, and Clear answers only once that handler has ended."""
    handler, chat, streams = scripted([AssistantText("Par", 0.1)], hold=True)

    async def main():
        turn = handler.updates(TEXT, None, "Hi", 0.2, 0.8, 2000, None)
        first = await anext(turn)
        tab, ended = first.session, asyncio.Event()

        async def drain():
            try:
                return await _drain(turn)
            finally:
                ended.set()

        rest = asyncio.ensure_future(drain())
        await until(lambda: chat.held is not None and chat.held.is_set(), "the answer never streamed")
        running = len(tab.shown_turns)
        outputs = await handler.clear(tab)
        handler_ended_first = ended.is_set()
        return tab, running, handler_ended_first, await rest, dict(zip(PAGE_OUTPUTS, outputs, strict=True))

    tab, running, handler_ended_first, rest, cleared = asyncio.run(main())
    assert running == 1 and handler_ended_first and tab.shown_turns == set()
    last = rest[-1]
    assert last.chat == [] and last.status == "" and last.live_player == live_player_html()
    assert cleared["chat"] == [] and cleared["status"] == "" and tab.session.items == []
    assert chat.open_streams == 0


def test_a_browser_sessions_streams_are_capped_together(scripted):
    audio = np.ones(10, np.float32)
    handler, _, streams = scripted([AssistantAudio(audio, OUTPUT_SAMPLE_RATE, 0, 0, 0.1), finished("x", audio)])
    streams.max_per_session = 2

    def answer_stream(session: str) -> str:  # each turn in a tab of its own
        tab = asyncio.run(collect(handler, TEXT, None, "Hi", session=session))[0].session
        return tab.view.latest.turn

    ids = [answer_stream("browser-a") for _ in range(4)]
    other = answer_stream("browser-b")
    assert [streams.get(i) is not None for i in ids] == [False, False, True, True]
    assert streams.get(other) is not None and streams.get(other).session == "browser-b"


def test_a_closed_tab_stops_its_answer_and_leaves_the_registry(scripted):
    handler, chat, _ = scripted([AssistantText("Hi", 0.1)], hold=True)

    async def main():
        turn = handler.updates(TEXT, None, "Hello", 0.2, 0.8, 2000, None)
        tab = (await anext(turn)).session
        rest = asyncio.ensure_future(_drain(turn))
        await until(lambda: chat.held is not None and chat.held.is_set(), "the answer never streamed")
        registered = handler.tabs.get(tab.token) is tab
        handler.end_session(tab)
        await asyncio.wait_for(rest, WAIT_S)
        await until(lambda: tab.session.response is None, "the answer was not stopped")
        return tab, registered

    tab, registered = asyncio.run(main())
    assert registered and handler.tabs.get(tab.token) is None
    assert tab.view.answers == [] and tab.session.items[-1].status.value == "incomplete"


# --- conversation mode's handler ----------------------------------------------------------------------


def test_conversation_mode_switches_the_tab_to_listening_and_back(scripted):
    handler, _, _ = scripted([])

    class FakeVAD:
        pass

    async def vad():
        return FakeVAD()

    handler.vad = vad

    async def main():
        switched = handler.conversation(True, 700, 0.2, 0.8, 300, None)
        first = await anext(switched)
        tab = first[PAGE_OUTPUTS.index("session")]
        on = (tab.listening, tab.session.config.turn_detection, tab.session.config.options, tab.session.vad)
        following = asyncio.ensure_future(_drain(switched))
        bad = await handler.conversation_settings("lots", 0.2, 0.8, 300, tab)
        changed = await handler.conversation_settings(900, 0.3, 0.8, 300, tab)
        detection_after = tab.session.config.turn_detection
        off = [u async for u in handler.conversation(False, 900, 0.3, 0.8, 300, tab)]
        await asyncio.wait_for(following, WAIT_S)  # the follower ends when the mode is switched off
        return first, tab, on, bad, changed, detection_after, off

    with pytest.warns(UserWarning, match="milliseconds"):
        first, tab, on, bad, changed, detection_after, off = asyncio.run(main())
    update = dict(zip(PAGE_OUTPUTS, first, strict=True))
    assert update["live_socket"] == live_socket_html(f"glm4voice/live/{tab.token}")
    assert "700 ms of silence" in update["status"]
    listening, detection, options, vad = on
    assert listening and detection.silence_duration_ms == 700 and options.max_new_tokens == 300
    assert type(vad).__name__ == "FakeVAD"
    assert bad == PageUpdate().outputs() and detection_after.silence_duration_ms == 900
    (off_update,) = off
    assert off_update[PAGE_OUTPUTS.index("live_socket")] == live_socket_html()
    assert not tab.listening and tab.session.config.turn_detection is None


def test_conversation_mode_refuses_bad_settings_with_a_message(scripted):
    handler, _, _ = scripted([])

    async def main():
        return [u async for u in handler.conversation(True, 5, 0.2, 0.8, 300, None)]

    with pytest.warns(UserWarning, match="silence_duration_ms"):
        (update,) = asyncio.run(main())
    update = dict(zip(PAGE_OUTPUTS, update, strict=True))
    assert update["status"].startswith("⚠️ Conversation mode is off") and update["live_socket"] == SKIP
    assert not update["session"].listening


# --- outputs, head, app -------------------------------------------------------------------------------


def test_page_updates_are_positional_outputs_in_one_order():
    update = PageUpdate(status="s", audio_input=None)
    assert PAGE_OUTPUTS == ("chat", "live_player", "status", "session", "text_input", "audio_input", "live_socket")
    assert update.outputs() == (SKIP, SKIP, "s", SKIP, SKIP, None, SKIP)


def test_the_page_head_hands_the_scripts_their_settings_from_python():
    head = page_head(OUTPUT_SAMPLE_RATE, PLAYER_LEAD_S)
    assert f"window.GLM4VOICE_SAMPLE_RATE = {OUTPUT_SAMPLE_RATE};" in head
    assert f"window.GLM4VOICE_PLAYER_LEAD_S ??= {PLAYER_LEAD_S!r};" in head
    assert f'window.GLM4VOICE_MIC_WORKLET = "{WORKLET_PATH.lstrip("/")}";' in head
    assert head.index("GLM4VOICE_PLAYER_LEAD_S") < head.index("glm4voicePlayer")  # set before the player runs
    assert head.index("glm4voicePlayer") < head.index("glm4voiceLive")
    script = player_script()
    assert 'pageSetting("GLM4VOICE_PLAYER_LEAD_S")' in script and 'pageSetting("GLM4VOICE_SAMPLE_RATE")' in script
    assert "22050" not in script and "0.15" not in script  # no values of its own
    assert "window.GLM4VOICE_MIC_WORKLET" in live_script() and "echoCancellation: true" in live_script()


def test_the_app_serves_the_page_with_the_chats_player_lead_and_the_worklet(text_tokenizer):
    chat = ScriptedChat(text_tokenizer, [], config=PipelineConfig(player_lead_s=0.25))
    app = create_app(chat, DemoSettings(random_weights_notice=True))

    async def fetch():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return [await client.get(path) for path in ("/config", "/glm4voice/stream/unknown", WORKLET_PATH)]

    config, missing, worklet = asyncio.run(fetch())
    assert config.status_code == 200
    assert "GLM4VOICE_PLAYER_LEAD_S ??= 0.25" in config.text and "Random weights" in config.text
    ids = {c["props"].get("elem_id"): c["type"] for c in config.json()["components"]}
    assert {ids.get(k) for k in ("stop", "conversation-mode", "silence-ms", "live-socket")} == {
        "button", "checkbox", "slider", "html",
    }  # fmt: skip
    assert missing.status_code == 404
    assert worklet.status_code == 200 and 'registerProcessor("glm4voice-mic"' in worklet.text
    assert worklet.headers["content-type"].startswith("text/javascript")
    app.state.files.cleanup()


def test_loading_the_page_copies_no_part_of_the_pipeline(text_tokenizer):
    """Gradio deep-copies the page's component settings on every page load (a State's delete callback
    among them): nothing there may reach the pipeline, which holds the models (a copy per page load took
    minutes on a busy CPU with the tiny models, and would copy the weights on the GPU)."""
    copies = []

    class Uncopyable(ScriptedChat):
        def __deepcopy__(self, memo):
            copies.append(type(self).__name__)
            raise TypeError("the pipeline must not be copied")

    app = create_app(Uncopyable(text_tokenizer, []), DemoSettings())

    async def load():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return [await client.get(path) for path in ("/", "/config")]

    page, config = asyncio.run(load())
    assert page.status_code == 200 and config.status_code == 200
    assert copies == []
    app.state.files.cleanup()


def test_the_app_refuses_files_its_browser_session_did_not_upload(text_tokenizer):
    app = create_app(ScriptedChat(text_tokenizer, []), DemoSettings())
    body = {"data": ["audio", {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "", 0.2, 0.8, 40]}

    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.post("/gradio_api/call/respond", json=body)

    refused = asyncio.run(call())
    assert refused.status_code == 403 and "did not upload" in refused.json()["detail"]
    app.state.files.cleanup()


def test_the_app_refuses_a_live_socket_from_another_site(text_tokenizer):
    """The live socket is behind the request guard too: a page of another site cannot open a tab's microphone
    socket (the handshake is refused before the token is even looked up)."""
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    app = create_app(ScriptedChat(text_tokenizer, []), DemoSettings())
    with TestClient(app, base_url="http://localhost") as client:
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect(f"ws://localhost{LIVE_PATH}/anything",
                                          headers={"origin": "http://evil.example"}) as socket:  # fmt: skip
                socket.receive_text()
        with pytest.raises(WebSocketDisconnect) as unknown:
            with client.websocket_connect(f"ws://localhost{LIVE_PATH}/anything") as socket:
                socket.receive_text()
    assert refused.value.code == 1008 and "cross-site" in refused.value.reason
    assert unknown.value.code == 1008 and "no such page session" in unknown.value.reason
    app.state.files.cleanup()


def test_every_session_may_submit_the_sample_prompts_which_gradio_keeps(text_tokenizer, files):
    uploads = SessionUploads()
    chat = ScriptedChat(text_tokenizer, [])
    demo = create_demo(chat, AudioStreams(OUTPUT_SAMPLE_RATE), files, DemoSettings(), uploads)
    cached = {str(p) for p in Path(get_upload_folder()).rglob("sample_*.wav")}
    assert len(cached) >= 2 and all(uploads.allows(None, path) for path in cached)
    assert not uploads.allows(None, str(RESOURCES / "sample_en.wav"))  # the copy Gradio hands out, not the source
    delete_files_created_by_app(demo, age=None)  # Gradio's clean-up (delete_cache), as if an hour had passed
    assert all(Path(path).is_file() for path in cached)
