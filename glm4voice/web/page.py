"""The web demo's Gradio page: its layout (:func:`create_demo`), its head (:func:`page_head`) and the
handlers of its controls (:class:`TurnHandler`).

How the speech reaches the speaker: Gradio's own streaming ``gr.Audio`` output re-encodes each
chunk and plays the chunks through a media element, which stutters at the seams (original
issue #7). Instead each answer's decoded chunks go into the answer's audio stream
(:mod:`glm4voice.web.streams`, served by the app at ``GET glm4voice/stream/<id>``; the id is
random and unguessable, created when the answer starts and discarded at the next answer,
on Clear and when the session ends), and the handler publishes the stream's address through a
``gr.HTML`` element. The page's small Web Audio player (``glm4voice/web/player.js``, loaded in the page
head) fetches it as soon as the address appears, reads the response body as it arrives and starts each
chunk exactly where the previous one ends on an AudioContext running at the decoder's rate:
sample-accurate, gapless and click-free, starting with the first decoded block. Text, the chat
history and errors travel through Gradio's normal event stream; the whole answer is also added to
the chat as an ordinary audio player at the end.

Each tab's conversation is a :class:`glm4voice.web.tab.PageTab` (Gradio state): one
:class:`~glm4voice.conversation.ConversationSession` whatever the way in, so typed and recorded turns,
Stop and conversation mode share one history, and the turn-taking, cancellation and truncation exist
once (with ``/v1/realtime``).

- **Stop** (shown while an answer streams or plays): the player stops at once and says how much was
  heard (its own clock); the handler cancels the answer (the token stream closes, the token server frees
  the slot) and cuts it in the history to what was heard.
- **Conversation mode**: the microphone stays open (``glm4voice/web/live.js`` over the tab's live socket,
  :mod:`glm4voice.web.live`); the session's silero-vad detects the turns, a silence of the chosen length
  ends one and starts the answer, and speech over an answer stops it (barge-in). A handler follows the
  tab while the mode is on and shows each turn as it happens.

Each handler output is a :class:`PageUpdate` (named fields, one per output component; a field left
out keeps what the page shows), turned into Gradio's positional outputs in one place.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import gradio as gr

from glm4voice.conversation import ResponseStatus, TurnDetection
from glm4voice.conversation.vad import DEFAULT_SILENCE_DURATION_MS, SileroVAD
from glm4voice.defaults import (
    DEFAULT_SERVER_URL,
    DEMO_MAX_NEW_TOKENS,
    DEMO_TEMPERATURE,
    DEMO_TOP_P,
    MAX_CONCURRENT_TURNS,
    MAX_INPUT_SECONDS,
    MAX_NEW_TOKENS_CAP,
    MAX_NEW_TOKENS_MIN,
)
from glm4voice.hub import PUBLISHED_DECODER, PUBLISHED_LLM, PUBLISHED_SPEECH_TOKENIZER
from glm4voice.pipeline import GenerationOptions, TurnError, UserRequest, UserSpeech, UserText, VoiceChat
from glm4voice.protocol import InputMode
from glm4voice.web import live_script, player_script
from glm4voice.web.chat_view import AnswerView, failure_markdown
from glm4voice.web.files import DemoFiles
from glm4voice.web.live import WORKLET_PATH, LiveTabs, live_url
from glm4voice.web.streams import AudioStreams, stream_url
from glm4voice.web.tab import PageTab
from glm4voice.web.uploads import SessionUploads, browser_session, named_files

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parents[2] / "resources"
"""Pictures and the spoken sample prompts (not part of an installed package: samples then hide)."""
CLEAR_WAIT_S = 30.0
"""Clear waits this long at most for the Submit handler of the turn it stops to end (it ends at once)."""
TEXT_REFRESH_S = 0.1
"""Streamed text is pushed to the page at most this often (every token would flood the page)."""
TEMPERATURE_SLIDER = (0.0, 2.0, 0.05)
"""The page's temperature slider (min, max, step): the useful part of what the server accepts."""
TOP_P_SLIDER = (0.05, 1.0, 0.05)
SILENCE_SLIDER = (200, 3000, 50)
"""Conversation mode's end-of-turn silence (ms: min, max, step); the default is the VAD's."""

SAMPLE_PROMPTS = (
    ("sample_en.wav", "English: “Hello! Can you tell me a short story about a cat, please?”"),
    ("sample_zh.wav", "Mandarin: “你好，请给我讲一个关于小猫的简短故事。”"),
)
"""Spoken examples in resources/ (espeak-ng, see resources/make_samples.sh)."""
TEXT_EXAMPLES = ("Tell me a short story about a cat.", "你好，请介绍一下你自己。")

RANDOM_WEIGHTS_NOTICE = (
    "⚠️ <b>Random weights.</b> This demo runs on tiny randomly initialised checkpoints "
    "(no checkpoint paths were given), so every answer, text and speech, is noise. Everything else "
    f"works end to end. For real answers start it with <code>--model-path {PUBLISHED_LLM} --tokenizer-path {PUBLISHED_SPEECH_TOKENIZER} "
    f"--flow-path {PUBLISHED_DECODER}</code>."
)

PAGE_CSS = """
#random-weights-notice { background: #fff4e5; border: 1px solid #f0b35b; border-radius: 8px; padding: 10px 14px;
  color: #7a4100; }
.glm4voice-live, .glm4voice-mic { display: flex; align-items: center; gap: 8px; min-height: 1.6em; font-size: 0.95em;
  color: #555; }
.glm4voice-live.idle, .glm4voice-mic.idle { display: none; }
.glm4voice-live-status[data-state="error"], .glm4voice-mic-status[data-state="error"] { color: #b00020; }
body:not(.glm4voice-answering) #stop { display: none !important; }
#status .prose { font-size: 0.95em; }
"""

LIVE_PLAYER_JS = """
const attach = () => {
  if (window.glm4voicePlayer) window.glm4voicePlayer.attach(element.querySelector('[data-stream]'));
};
attach();
watch('value', attach);
"""
LIVE_SOCKET_JS = """
const sync = () => {
  if (window.glm4voiceLive) window.glm4voiceLive.sync(element.querySelector('.glm4voice-mic'));
};
sync();
watch('value', sync);
"""
SPEAKER_ICON = (
    '<svg aria-hidden="true" width="18" height="18" viewBox="0 0 24 24" fill="none" stroke="currentColor" '
    'stroke-width="2"><path d="M11 5 6 9H2v6h4l5 4V5z"/><path d="M15.5 8.5a5 5 0 0 1 0 7M19 5a10 10 0 0 1 0 14"/></svg>'
)
STOP_PLAYER_JS = "() => { if (window.glm4voicePlayer) window.glm4voicePlayer.stop(); }"
INTERRUPT_PLAYER_JS = """(report, tab) => {
  const player = window.glm4voicePlayer;
  return [JSON.stringify(player ? player.interrupt() : {turn: null, playedMs: 0}), tab];
}"""
"""Stop's first step, in the browser: silence the answer now and say what was heard (the handler's input)."""
LISTENING_STATUS = (
    "🎙️ **Conversation mode:** just talk. The answer starts after {silence} ms of silence; speak over an "
    "answer to interrupt it."
)

VadProvider = Callable[[], Awaitable[SileroVAD]]
"""The app's shared VAD model, loaded when first needed (``OpenAIService.vad``)."""


@dataclass(frozen=True)
class DemoSettings:
    random_weights_notice: bool = False
    max_concurrent_turns: int = MAX_CONCURRENT_TURNS
    server_url: str = DEFAULT_SERVER_URL


@dataclass(frozen=True)
class PageUpdate:
    """One update of the page's outputs, by name; a field left out keeps what the page shows."""

    chat: Any = field(default_factory=gr.skip)
    """The conversation's messages."""
    live_player: Any = field(default_factory=gr.skip)
    """The live player's element (:func:`live_player_html`)."""
    status: Any = field(default_factory=gr.skip)
    """The line under the chat (Markdown)."""
    session: Any = field(default_factory=gr.skip)
    """The tab's :class:`PageTab` (Gradio state)."""
    text_input: Any = field(default_factory=gr.skip)
    audio_input: Any = field(default_factory=gr.skip)
    live_socket: Any = field(default_factory=gr.skip)
    """Conversation mode's element (:func:`live_socket_html`): the microphone runs while it names a socket."""

    def outputs(self) -> tuple:
        """The values in the order of :data:`PAGE_OUTPUTS` (Gradio's positional outputs)."""
        return tuple(getattr(self, name) for name in PAGE_OUTPUTS)


PAGE_OUTPUTS = tuple(f.name for f in fields(PageUpdate))


def live_player_html(stream_id: str | None = None, url: str | None = None) -> str:
    """The element the page's player watches: a new ``data-turn`` starts a new stream."""
    if stream_id is None:
        return '<div class="glm4voice-live idle"><span class="glm4voice-live-status"></span></div>'
    return (
        f'<div class="glm4voice-live" data-stream="{html.escape(url or "")}" data-turn="{html.escape(stream_id)}">'
        f'{SPEAKER_ICON}<span class="glm4voice-live-status">Waiting for speech…</span></div>'
    )


def live_socket_html(url: str | None = None) -> str:
    """The element conversation mode's client watches (``live.js``): a socket address opens the
    microphone and the socket, none closes them."""
    if url is None:
        return '<div class="glm4voice-mic idle"><span class="glm4voice-mic-status"></span></div>'
    return (
        f'<div class="glm4voice-mic" data-socket="{html.escape(url)}"><span class="glm4voice-mic-status"></span></div>'
    )


def player_settings_script(sample_rate: int, lead_s: float) -> str:
    """The settings ``player.js`` and ``live.js`` read. A lead set before the page loads (a test's init
    script, an embedding page) is kept."""
    return (
        f"window.GLM4VOICE_SAMPLE_RATE = {int(sample_rate)}; window.GLM4VOICE_PLAYER_LEAD_S ??= {float(lead_s)!r}; "
        f"window.GLM4VOICE_MIC_WORKLET = {json.dumps(WORKLET_PATH.lstrip('/'))};"
    )


def page_head(sample_rate: int, lead_s: float) -> str:
    """The page's head: the scripts' settings, the player, conversation mode's client."""
    settings = player_settings_script(sample_rate, lead_s)
    return f"<script>{settings}</script>\n<script>{player_script()}</script>\n<script>{live_script()}</script>"


# --- the handlers -------------------------------------------------------------------------------------


class TurnHandler:
    """The page's handlers: Submit (:meth:`respond`), Stop (:meth:`stop`), Clear (:meth:`clear`),
    conversation mode (:meth:`conversation`), a closed tab (:meth:`end_session`). Shared by every tab;
    per-tab state is the :class:`PageTab` (Gradio state), created at the tab's first action."""

    def __init__(
        self,
        chat: VoiceChat,
        streams: AudioStreams,
        files: DemoFiles,
        text_refresh_s: float = TEXT_REFRESH_S,
        *,
        tabs: LiveTabs | None = None,
        vad: VadProvider | None = None,
    ):
        self.chat = chat
        self.streams = streams
        self.files = files
        self.text_refresh_s = text_refresh_s
        self.tabs = tabs if tabs is not None else LiveTabs()
        self.vad = vad
        self._closing: set[asyncio.Task] = set()

    def tab(self, ui: PageTab | None, session: str | None = None) -> PageTab:
        """The tab's conversation (a new one at its first action), in browser session ``session`` (its audio
        streams are capped with the other tabs of that browser)."""
        if ui is None:
            ui = PageTab(self.chat, self.streams, self.files)
            self.tabs.add(ui)
        if session is not None:
            ui.view.owner = session
        return ui

    # --- Submit -----------------------------------------------------------------------------------------

    async def respond(
        self, mode, audio_path, text, temperature, top_p, max_new_tokens, ui: PageTab | None, request: gr.Request
    ):
        """Gradio's handler of Submit: the positional outputs of each :class:`PageUpdate` of :meth:`updates`."""
        session = browser_session(request)
        async for update in self.updates(mode, audio_path, text, temperature, top_p, max_new_tokens, ui, session):
            yield update.outputs()

    async def updates(
        self, mode, audio_path, text, temperature, top_p, max_new_tokens, ui: PageTab | None, session=None
    ) -> AsyncIterator[PageUpdate]:
        """One typed or recorded turn of this tab (of browser session ``session``), as page updates."""
        tab = self.tab(ui, session)
        shown = asyncio.Event()
        tab.shown_turns.add(shown)
        try:
            async for update in self._turn_updates(tab, mode, audio_path, text, temperature, top_p, max_new_tokens):
                yield update
        finally:
            tab.shown_turns.discard(shown)
            shown.set()

    async def _turn_updates(
        self, tab: PageTab, mode, audio_path, text, temperature, top_p, max_new_tokens
    ) -> AsyncIterator[PageUpdate]:
        epoch = tab.epoch
        request: UserRequest
        content: dict[str, str] | str
        if mode == InputMode.AUDIO.value:
            request, content = UserSpeech(audio_path), {"path": str(audio_path)}
        else:
            request, content = UserText(text or ""), (text or "").strip()
        try:
            answer = await tab.submit(request, _options(temperature, top_p, max_new_tokens), content)
        except TurnError as error:  # refused: the input stays in place to be fixed
            number = tab.view.refused()
            gr.Warning(error.message)
            yield PageUpdate(chat=tab.messages(), status=failure_markdown(number, error.message), session=tab)
            return
        live = live_player_html(answer.turn, stream_url(answer.stream))
        yield PageUpdate(tab.messages(), live, answer.status(), tab, text_input="", audio_input=None)
        try:
            async for update in self._follow_answer(tab, answer, epoch):
                yield update
            if tab.epoch != epoch:  # Clear was pressed while this turn ran: show the cleared page, stop
                yield await self._cleared(tab)
                return
            if answer.response.status is ResponseStatus.CANCELLED:
                async with tab.lock:  # a Stop that cancelled it also cuts it: show it cut
                    pass
            await tab.view.settled()  # its files (a cut one too) are written
            if tab.epoch != epoch:
                yield await self._cleared(tab)
                return
            yield self._finished(tab, answer, text, audio_path)
        finally:
            task = answer.response.task
            if not answer.done and tab.epoch == epoch and task is not None:  # the page went away: it stops too
                task.cancel()

    @staticmethod
    async def _cleared(tab: PageTab) -> PageUpdate:
        """The page once the Clear in progress has finished (it holds the tab's lock until then)."""
        async with tab.lock:
            return PageUpdate(chat=tab.messages(), live_player=live_player_html(), status="", session=tab)

    async def _follow_answer(self, tab: PageTab, answer: AnswerView, epoch: int) -> AsyncIterator[PageUpdate]:
        """The chat while ``answer`` runs (text at most every ``text_refresh_s``); ends when it is done or
        the tab was cleared."""
        seen, shown = tab.version, _Shown(tab, self.text_refresh_s)
        while not answer.done and tab.epoch == epoch:
            seen = await tab.wait_change(seen)
            if answer.done or tab.epoch != epoch:
                return
            if shown.due():
                yield PageUpdate(chat=tab.messages(), session=tab)

    def _finished(self, tab: PageTab, answer: AnswerView, text, audio_path) -> PageUpdate:
        response = answer.response
        update = PageUpdate(chat=tab.messages(), status=answer.status(), session=tab)
        if response.status is not ResponseStatus.FAILED:
            return update
        message = response.error.message if response.error else "the answer failed"
        gr.Warning(message)
        # the question goes back into the input, so that Submit retries it; no speech came: hide the player
        if answer.stream.samples == 0:
            update = replace(update, live_player=live_player_html())
        if answer.question is not None and answer.question.text is not None:
            return replace(update, text_input=text, audio_input=None)
        return replace(update, audio_input=audio_path)

    # --- Stop and Clear ---------------------------------------------------------------------------------

    async def stop(self, report: str | None, ui: PageTab | None) -> tuple:
        """Stop: the player already stopped (``report``: its turn and how much was heard, from the page's
        ``interrupt()``); the answer is cancelled and cut to what was heard."""
        if ui is None:
            return PageUpdate().outputs()
        turn, played_ms = _stop_report(report)
        answer = await ui.stop(turn, played_ms)
        if answer is None:
            return PageUpdate(session=ui).outputs()
        await ui.view.settled()  # the heard part's file is written
        return PageUpdate(chat=ui.messages(), status=answer.status(), session=ui).outputs()

    async def clear(self, ui: PageTab | None) -> tuple:
        """Clear (and the chat's own trash button): a new conversation, an empty page. A running answer stops
        (its token stream closes); the Submit handler showing it ends with the cleared page as its last update,
        and Clear answers only after that (Gradio sends a handler's updates in order)."""
        if ui is not None:
            await ui.clear()
            shown = list(ui.shown_turns)
            if shown:
                try:  # they end at once (the tab's change wakes them); the bound guards against a stuck one
                    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in shown)), CLEAR_WAIT_S)
                except TimeoutError:
                    logger.warning("a cleared turn's handler did not end within %g s", CLEAR_WAIT_S)
        cleared = PageUpdate(
            chat=[], live_player=live_player_html(), status="", session=ui, text_input="", audio_input=None
        )
        return cleared.outputs()

    def end_session(self, ui: PageTab | None) -> None:
        """The tab is gone (Gradio drops its state): its answer, streams and files go too."""
        if ui is None:
            return
        self.tabs.remove(ui)
        task = asyncio.get_running_loop().create_task(ui.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # --- conversation mode ------------------------------------------------------------------------------

    async def conversation(
        self, on, silence_ms, temperature, top_p, max_new_tokens, ui: PageTab | None, request: gr.Request = None
    ):
        """Conversation mode switched on or off. On: the tab listens, the page gets the live socket's
        address, and this handler follows the tab (each turn as it happens) until the mode is switched off."""
        tab = self.tab(ui, browser_session(request))
        if not on:
            await tab.listen(None)
            yield PageUpdate(session=tab, live_socket=live_socket_html(), status="").outputs()
            return
        try:
            detection, options = _live_settings(silence_ms, temperature, top_p, max_new_tokens)
            vad = await self.vad() if self.vad is not None else None
            await tab.listen(detection, options, vad)
        except (TurnError, ValueError, RuntimeError) as error:
            message = getattr(error, "message", None) or str(error)
            gr.Warning(message)
            yield PageUpdate(session=tab, status=f"⚠️ Conversation mode is off: {message}").outputs()
            return
        listening = tab.listening
        waiting = LISTENING_STATUS.format(silence=detection.silence_duration_ms)
        yield PageUpdate(session=tab, live_socket=live_socket_html(live_url(tab)), status=waiting).outputs()
        async for update in self._follow_tab(tab, listening, waiting):
            yield update.outputs()

    async def conversation_settings(self, silence_ms, temperature, top_p, max_new_tokens, ui: PageTab | None):
        """A setting changed: conversation mode (if on) goes on with it."""
        if ui is None or not ui.listening:
            return PageUpdate().outputs()
        try:
            detection, options = _live_settings(silence_ms, temperature, top_p, max_new_tokens)
        except (TurnError, ValueError) as error:
            gr.Warning(getattr(error, "message", None) or str(error))
            return PageUpdate().outputs()
        await ui.listen(detection, options)
        return PageUpdate(session=ui).outputs()

    async def _follow_tab(self, tab: PageTab, listening: int, waiting: str) -> AsyncIterator[PageUpdate]:
        seen, changes, shown = tab.version, _Shown(tab, self.text_refresh_s), None
        while tab.listening == listening:
            seen = await tab.wait_change(seen)
            if tab.listening != listening:
                return
            if not changes.due():
                continue
            answer = tab.view.latest
            update = PageUpdate(chat=tab.messages(), status=_tab_status(tab, waiting), session=tab)
            if answer is not None and answer is not shown:
                shown = answer
                update = replace(update, live_player=live_player_html(answer.turn, stream_url(answer.stream)))
            elif answer is None and shown is not None:  # cleared
                shown = None
                update = replace(update, live_player=live_player_html())
            yield update


def _tab_status(tab: PageTab, waiting: str) -> str:
    answer, failure = tab.view.latest, tab.view.failure
    if failure is not None and (answer is None or answer.done):
        return f"⚠️ {failure}"
    return answer.status() if answer is not None else waiting


def _options(temperature, top_p, max_new_tokens) -> GenerationOptions:
    try:
        return GenerationOptions(float(temperature), float(top_p), int(max_new_tokens))
    except (TypeError, ValueError):
        return GenerationOptions(temperature, top_p, max_new_tokens)  # check() explains what is wrong


def _live_settings(silence_ms, temperature, top_p, max_new_tokens) -> tuple[TurnDetection, GenerationOptions]:
    """Conversation mode's settings from the page's controls (ValueError or TurnError if unusable)."""
    options = _options(temperature, top_p, max_new_tokens)
    options.check()
    try:
        silence = int(silence_ms)
    except (TypeError, ValueError):
        raise ValueError(f"the end-of-turn silence must be a number of milliseconds (got {silence_ms!r})") from None
    return TurnDetection(silence_duration_ms=silence), options


def _stop_report(report: str | None) -> tuple[str | None, int]:
    """The player's ``interrupt()`` result (JSON): its turn and the milliseconds heard."""
    try:
        data = json.loads(report or "{}")
        turn, played = data.get("turn"), int(data.get("playedMs") or 0)
    except (ValueError, TypeError, AttributeError):
        return None, 0
    return (turn if isinstance(turn, str) else None), max(0, played)


class _Shown:
    """What a handler last showed of a tab's chat: new or replaced messages are due at once, streamed text
    at most every ``interval`` seconds (the end of an answer replaces its message: its last text shows)."""

    def __init__(self, tab: PageTab, interval: float):
        self.view = tab.view
        self.interval = interval
        self.structure, self.text = self.view.structure, self.view.text
        self.last = float("-inf")

    def due(self) -> bool:
        view, now = self.view, time.monotonic()
        if view.structure == self.structure and (view.text == self.text or now - self.last < self.interval):
            return False
        self.structure, self.text, self.last = view.structure, view.text, now
        return True


# --- the page -----------------------------------------------------------------------------------------


def create_demo(
    chat: VoiceChat,
    streams: AudioStreams,
    files: DemoFiles,
    settings: DemoSettings = DemoSettings(),
    uploads: SessionUploads | None = None,
    *,
    tabs: LiveTabs | None = None,
    vad: VadProvider | None = None,
) -> gr.Blocks:
    """The Gradio page. Its handlers are one :class:`TurnHandler` over the app's objects (no module globals):
    ``tabs`` is the registry the live socket finds the tabs in, ``vad`` loads the shared VAD model. The sample
    prompts' files are shared in ``uploads`` (every browser session may submit them)."""
    handler = TurnHandler(chat, streams, files, tabs=tabs, vad=vad)

    def switch_mode(mode: str):
        audio = mode == InputMode.AUDIO.value
        return gr.update(visible=audio), gr.update(visible=not audio)

    # no telemetry or version-check thread; Gradio's copies of answer files are deleted after an hour
    with gr.Blocks(title="GLM-4-Voice Demo", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown("# GLM-4-Voice\nSpeak or type; the answer streams as text and speech.", elem_id="title")
        if settings.random_weights_notice:
            gr.HTML(RANDOM_WEIGHTS_NOTICE, elem_id="random-weights-notice", js_on_load=None)

        # a plain function, not the bound method: Gradio deep-copies every component's settings (this
        # callback included) on each page load, and a bound method would be copied with the handler, the
        # pipeline and its models (seconds per page load, and the weights' memory again on the GPU)
        def end_session(state: Any) -> None:
            handler.end_session(state)

        ui_state = gr.State(None, delete_callback=end_session)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=460, feedback_options=None,
                                     buttons=["copy", "copy_all"],
                                     placeholder="Record a question, or switch to text and type one.")  # fmt: skip
                live = gr.HTML(live_player_html(), elem_id="live-player", js_on_load=LIVE_PLAYER_JS)
                live_socket = gr.HTML(live_socket_html(), elem_id="live-socket", js_on_load=LIVE_SOCKET_JS)
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=1, min_width=300):
                with gr.Group(elem_id="conversation"):
                    conversation = gr.Checkbox(False, label="Conversation mode: the microphone stays open; just "
                                               "talk, and speak over an answer to interrupt it",
                                               elem_id="conversation-mode")  # fmt: skip
                    low_ms, high_ms, step_ms = SILENCE_SLIDER
                    silence = gr.Slider(low_ms, high_ms, value=DEFAULT_SILENCE_DURATION_MS, step=step_ms,
                                        label="Silence that ends your turn (ms)", elem_id="silence-ms")  # fmt: skip
                mode = gr.Radio([InputMode.AUDIO.value, InputMode.TEXT.value], value=InputMode.AUDIO.value,
                                label="Input mode", elem_id="input-mode")  # fmt: skip
                with gr.Column(visible=True) as audio_box:
                    audio_in = gr.Audio(
                        sources=["microphone", "upload"],
                        type="filepath",
                        elem_id="audio-input",
                        buttons=["download"],
                        label=f"Your question (record or upload, up to {MAX_INPUT_SECONDS:.0f} s)",
                    )
                    samples = [
                        (RESOURCES / name, label) for name, label in SAMPLE_PROMPTS if (RESOURCES / name).is_file()
                    ]
                    if samples:
                        examples = gr.Examples(
                            [[str(path)] for path, _ in samples],
                            inputs=[audio_in],
                            label="Sample prompts (espeak-ng)",
                            example_labels=[label for _, label in samples],
                            elem_id="audio-examples",
                        )
                        # the copies in Gradio's cache that a click puts in the input: every session may
                        # submit them, and Gradio's hourly clean-up (delete_cache) keeps them
                        cached = [f["path"] for f in named_files(list(examples.non_none_processed_examples.values()))]
                        audio_in.keep_in_cache.update(cached)
                        if uploads is not None:
                            uploads.share(cached)
                with gr.Column(visible=False) as text_box:
                    text_in = gr.Textbox(label="Your message", lines=2, elem_id="text-input",
                                         placeholder="Type a message and press Enter")  # fmt: skip
                    gr.Examples(
                        [[t] for t in TEXT_EXAMPLES], inputs=[text_in], label="Examples", elem_id="text-examples"
                    )
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear_button = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Generation settings", open=False, elem_id="settings"):
                    low, high, step = TEMPERATURE_SLIDER
                    temperature = gr.Slider(low, high, value=DEMO_TEMPERATURE, step=step, label="Temperature",
                                            elem_id="temperature")  # fmt: skip
                    low, high, step = TOP_P_SLIDER
                    top_p = gr.Slider(low, high, value=DEMO_TOP_P, step=step, label="Top p", elem_id="top-p")
                    max_new_tokens = gr.Number(DEMO_MAX_NEW_TOKENS, label="Max new tokens", precision=0,
                                               minimum=MAX_NEW_TOKENS_MIN, maximum=MAX_NEW_TOKENS_CAP,
                                               elem_id="max-new-tokens")  # fmt: skip
                stop_report = gr.Textbox(visible=False, elem_id="stop-report")

        components = dict(chat=chatbot, live_player=live, status=status, session=ui_state, text_input=text_in,
                          audio_input=audio_in, live_socket=live_socket)  # fmt: skip
        outputs = [components[name] for name in PAGE_OUTPUTS]
        settings_inputs = [silence, temperature, top_p, max_new_tokens]
        gr.on(
            [submit.click, text_in.submit],
            handler.respond,
            inputs=[mode, audio_in, text_in, temperature, top_p, max_new_tokens, ui_state],
            outputs=outputs,
            concurrency_limit=settings.max_concurrent_turns,
            trigger_mode="once",
            show_progress="minimal",
        )
        # Stop: the player stops in the browser at once (js), then the handler cuts the answer to what was heard
        stop.click(handler.stop, inputs=[stop_report, ui_state], outputs=outputs, js=INTERRUPT_PLAYER_JS,
                   concurrency_limit=None, show_progress="hidden")  # fmt: skip
        # Clear (and the chat's own trash button) stops a running turn through the handler, not with
        # Gradio's `cancels`: that cancels the turn's task from a separate request, racing with
        # Clear's own answer, so that an update the turn had computed just before could repaint the
        # cleared page, and Submit stayed blocked ("once") until that request came back. Here the turn
        # ends itself with the cleared page as its last update, and Clear answers after it.
        for clear_event in (clear_button.click, chatbot.clear):
            clear_event(None, js=STOP_PLAYER_JS)
            clear_event(handler.clear, inputs=[ui_state], outputs=outputs, concurrency_limit=None)
        # conversation mode: switched on, the handler runs (following the tab) until it is switched off
        conversation.change(handler.conversation, inputs=[conversation, *settings_inputs, ui_state], outputs=outputs,
                            concurrency_limit=None, trigger_mode="multiple", show_progress="hidden",
                            api_name="conversation_mode")  # fmt: skip
        gr.on([silence.release, temperature.release, top_p.release, max_new_tokens.submit],
              handler.conversation_settings, inputs=[*settings_inputs, ui_state], outputs=outputs,
              concurrency_limit=None, show_progress="hidden")  # fmt: skip
        mode.change(switch_mode, inputs=[mode], outputs=[audio_box, text_box], queue=False)
    return demo
