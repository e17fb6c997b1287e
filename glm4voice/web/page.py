"""The web demo's Gradio page: its layout (:func:`create_demo`), its head (:func:`page_head`) and the
handlers of its buttons (:class:`TurnHandler`).

How the speech reaches the speaker: Gradio's own streaming ``gr.Audio`` output re-encodes each
chunk and plays the chunks through a media element, which stutters at the seams (original
issue #7). Instead the handler of a turn pushes every decoded chunk into the turn's audio stream
(:mod:`glm4voice.web.streams`, served by the app at ``GET glm4voice/stream/<id>``; the id is
random and unguessable, created when the turn's input is accepted and discarded at the next turn,
on Clear and when the session ends), and publishes the stream's address through a ``gr.HTML``
element. The page's small Web Audio player (``glm4voice/web/player.js``, loaded in the page head)
fetches it as soon as the address appears, reads the response body as it arrives and starts each
chunk exactly where the previous one ends on an AudioContext running at the decoder's rate:
sample-accurate, gapless and click-free, starting with the first decoded block. Text, the chat
history and errors travel through Gradio's normal event stream; the whole answer is also added to
the chat as an ordinary audio player at the end.

Each handler output is a :class:`PageUpdate` (named fields, one per output component; a field left
out keeps what the page shows), turned into Gradio's positional outputs in one place.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, AsyncIterator

import gradio as gr

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
from glm4voice.pipeline import (
    AssistantAudio,
    AssistantText,
    ChatSession,
    GenerationOptions,
    InputAccepted,
    TurnEvent,
    TurnFailed,
    TurnFinished,
    UserRequest,
    UserSpeech,
    UserText,
    VoiceChat,
)
from glm4voice.protocol import InputMode
from glm4voice.web import player_script
from glm4voice.web.files import DemoFiles
from glm4voice.web.streams import AudioStreams, TurnAudioStream, stream_url
from glm4voice.web.uploads import SessionUploads, browser_session, named_files

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parents[2] / "resources"
"""Pictures and the spoken sample prompts (not part of an installed package: samples then hide)."""
CLEAR_WAIT_S = 30.0
"""Clear waits this long at most for the turn it stops to end (it ends at once when Gradio runs it)."""
TEXT_REFRESH_S = 0.1
"""Streamed text is pushed to the page at most this often (every token would flood the page)."""
TEMPERATURE_SLIDER = (0.0, 2.0, 0.05)
"""The page's temperature slider (min, max, step): the useful part of what the server accepts."""
TOP_P_SLIDER = (0.05, 1.0, 0.05)

SAMPLE_PROMPTS = (
    ("sample_en.wav", "English: “Hello! Can you tell me a short story about a cat, please?”"),
    ("sample_zh.wav", "Mandarin: “你好，请给我讲一个关于小猫的简短故事。”"),
)
"""Spoken examples in resources/ (espeak-ng, see resources/make_samples.sh)."""
TEXT_EXAMPLES = ("Tell me a short story about a cat.", "你好，请介绍一下你自己。")

RANDOM_WEIGHTS_NOTICE = (
    "⚠️ <b>Random weights.</b> This demo runs on tiny randomly initialised checkpoints "
    "(no checkpoint paths were given), so every answer, text and speech, is noise. Everything else "
    "works end to end. For real answers start it with <code>--model-path {llm} --tokenizer-path {tok} "
    "--flow-path {dec}</code>."
).format(llm=PUBLISHED_LLM, tok=PUBLISHED_SPEECH_TOKENIZER, dec=PUBLISHED_DECODER)

PAGE_CSS = """
#random-weights-notice { background: #fff4e5; border: 1px solid #f0b35b; border-radius: 8px; padding: 10px 14px;
  color: #7a4100; }
.glm4voice-live { display: flex; align-items: center; gap: 8px; min-height: 1.6em; font-size: 0.95em; color: #555; }
.glm4voice-live.idle { display: none; }
.glm4voice-live-status[data-state="error"] { color: #b00020; }
#status .prose { font-size: 0.95em; }
"""

LIVE_PLAYER_JS = """
const attach = () => {
  if (window.glm4voicePlayer) window.glm4voicePlayer.attach(element.querySelector('[data-stream]'));
};
attach();
watch('value', attach);
"""
SPEAKER_ICON = (
    '<svg aria-hidden="true" width="18" height="18" viewBox="0 0 24 24" fill="none" stroke="currentColor" '
    'stroke-width="2"><path d="M11 5 6 9H2v6h4l5 4V5z"/><path d="M15.5 8.5a5 5 0 0 1 0 7M19 5a10 10 0 0 1 0 14"/></svg>'
)
STOP_PLAYER_JS = "() => { if (window.glm4voicePlayer) window.glm4voicePlayer.stop(); }"


@dataclass(frozen=True)
class DemoSettings:
    random_weights_notice: bool = False
    max_concurrent_turns: int = MAX_CONCURRENT_TURNS
    server_url: str = DEFAULT_SERVER_URL


@dataclass
class TurnControl:
    """The turn a tab is running: Clear sets ``stop``; the turn sets ``done`` when it has ended."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class UISession:
    """One browser tab: its conversation (ids), what its chat shows, its current audio stream."""

    chat: ChatSession
    messages: list[dict[str, Any]] = field(default_factory=list)
    stream_id: str | None = None
    files: list[Path] = field(default_factory=list)
    running: TurnControl | None = None
    """The turn in flight, if any."""


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
    """The tab's :class:`UISession` (Gradio state)."""
    text_input: Any = field(default_factory=gr.skip)
    audio_input: Any = field(default_factory=gr.skip)

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


def failure_markdown(turn_number: int, message: str) -> str:
    return f"⚠️ **Turn {turn_number} failed:** {message}"


def player_settings_script(sample_rate: int, lead_s: float) -> str:
    """The settings ``player.js`` reads. A lead set before the page loads (a test's init script, an
    embedding page) is kept."""
    return f"window.GLM4VOICE_SAMPLE_RATE = {int(sample_rate)}; window.GLM4VOICE_PLAYER_LEAD_S ??= {float(lead_s)!r};"


def page_head(sample_rate: int, lead_s: float) -> str:
    """The page's head: the player's settings, then the player."""
    return f"<script>{player_settings_script(sample_rate, lead_s)}</script>\n<script>{player_script()}</script>"


# --- the turn handler ---------------------------------------------------------------------------------


@dataclass
class _Turn:
    """What the page shows of the turn in flight (one per Submit)."""

    ui: UISession
    request: UserRequest
    number: int
    session: str | None
    """The browser session (its streams are capped together)."""
    text: str | None
    """The typed text and the recording as submitted (a failed turn puts them back)."""
    audio_path: str | None
    stream: TurnAudioStream | None = None
    answer_index: int = -1
    answer_text: str = ""
    prompt_tokens: int = 0
    heard: str = ""


class TurnHandler:
    """The page's handlers: Submit (:meth:`respond`), Clear (:meth:`clear`), a closed tab
    (:meth:`end_session`). Shared by every tab; per-tab state is the :class:`UISession`.

    Clear during a turn: the turn itself ends at once and its last update is the cleared page (a
    turn's updates reach the page in order, so nothing it computed before can repaint the page
    afterwards); Clear answers only once that turn has ended.
    """

    def __init__(
        self, chat: VoiceChat, streams: AudioStreams, files: DemoFiles, text_refresh_s: float = TEXT_REFRESH_S
    ):
        self.chat = chat
        self.streams = streams
        self.files = files
        self.text_refresh_s = text_refresh_s

    async def respond(
        self, mode, audio_path, text, temperature, top_p, max_new_tokens, ui: UISession | None, request: gr.Request
    ):
        """Gradio's handler of Submit: the positional outputs of each :class:`PageUpdate` of :meth:`updates`."""
        session = browser_session(request)
        async for update in self.updates(mode, audio_path, text, temperature, top_p, max_new_tokens, ui, session):
            yield update.outputs()

    async def updates(
        self, mode, audio_path, text, temperature, top_p, max_new_tokens, ui: UISession | None, session=None
    ) -> AsyncIterator[PageUpdate]:
        """One turn of this tab (of browser session ``session``), as page updates."""
        ui = ui or UISession(self.chat.new_session())
        request = UserSpeech(audio_path) if mode == InputMode.AUDIO.value else UserText(text or "")
        turn = _Turn(ui, request, ui.chat.turns_started + 1, session, text, audio_path)
        throttle = _Throttle(self.text_refresh_s)
        control = ui.running = TurnControl()
        try:
            events = self.chat.run_turn(ui.chat, request, _options(temperature, top_p, max_new_tokens))
            async for event in _until(control.stop, events):
                update = await self._on_event(event, turn, throttle)
                if update is not None:
                    yield update
            if control.stop.is_set():  # Clear: the cleared page is this turn's last update
                yield _cleared(ui)
        finally:
            if turn.stream is not None:
                turn.stream.close()
            if ui.running is control:
                ui.running = None
            control.done.set()

    async def clear(self, ui: UISession | None) -> tuple:
        """Clear (and the chat's own trash button): a new conversation, an empty page. A running turn
        is stopped (and closes its token stream) first."""
        if ui is not None:
            ui.chat.clear()  # a turn that is still finishing cannot write into the new history
            running = ui.running
            if running is not None:
                running.stop.set()
                try:  # the turn ends at its next step; the bound only guards against a turn nobody steps
                    await asyncio.wait_for(running.done.wait(), CLEAR_WAIT_S)
                except TimeoutError:
                    logger.warning("a cleared turn did not end within %g s", CLEAR_WAIT_S)
            ui.messages = []
            self.streams.discard(ui.stream_id)
            ui.stream_id = None
            self.files.remove(ui.files)
        return _cleared(ui).outputs()

    def end_session(self, ui: UISession | None) -> None:
        """The tab is gone: its stream and answer files go too."""
        if ui is not None:
            self.streams.discard(ui.stream_id)
            self.files.remove(ui.files)

    # --- one event, one update ------------------------------------------------------------------------
    async def _on_event(self, event: TurnEvent, turn: _Turn, throttle: _Throttle) -> PageUpdate | None:
        if isinstance(event, InputAccepted):
            return self._accepted(event, turn)
        if isinstance(event, AssistantText):
            turn.answer_text += event.text
            turn.ui.messages[turn.answer_index] = {"role": "assistant", "content": turn.answer_text}
            return PageUpdate(chat=list(turn.ui.messages), session=turn.ui) if throttle.ready() else None
        if isinstance(event, AssistantAudio):
            turn.stream.push(event.samples)
            return None
        if isinstance(event, TurnFinished):
            return await self._finished(event, turn)
        if isinstance(event, TurnFailed):
            return self._failed(event, turn)
        raise TypeError(f"unexpected turn event {event!r}")

    def _accepted(self, event: InputAccepted, turn: _Turn) -> PageUpdate:
        ui = turn.ui
        self.streams.discard(ui.stream_id)
        turn.stream = self.streams.open(turn.session)
        ui.stream_id = turn.stream.id
        ui.messages.append({"role": "user", "content": _user_content(turn.request)})
        ui.messages.append({"role": "assistant", "content": "…"})
        turn.answer_index = len(ui.messages) - 1
        turn.prompt_tokens = event.prompt_tokens
        if event.mode is InputMode.AUDIO:
            turn.heard = f"heard {event.input_seconds:.1f} s of speech ({event.speech_tokens} speech tokens) · "
        status = f"Turn {turn.number} · {turn.heard}prompt {turn.prompt_tokens} tokens · generating…"
        live = live_player_html(turn.stream.id, stream_url(turn.stream))
        return PageUpdate(list(ui.messages), live, status, ui, text_input="", audio_input=None)

    async def _finished(self, event: TurnFinished, turn: _Turn) -> PageUpdate:
        ui = turn.ui
        turn.stream.close()
        ui.messages[turn.answer_index] = {"role": "assistant", "content": event.text or "(no text in this answer)"}
        if len(event.audio):  # encoded and written off the event loop
            path = await asyncio.to_thread(self.files.write_answer, turn.stream.id, event.audio, event.sample_rate)
            ui.files.append(path)
            ui.messages.append({"role": "assistant", "content": {"path": str(path), "mime_type": "audio/wav"}})
        first = event.timings.first_audio
        summary = (
            f"Turn {turn.number} · done · {turn.heard}answer: {event.audio_seconds:.1f} s of speech, "
            f"{event.text_tokens} text tokens"
            + (f", first audio after {first:.2f} s" if first is not None else "")
            + f" · prompt {turn.prompt_tokens} tokens"
        )
        return PageUpdate(chat=list(ui.messages), status=summary, session=ui)

    def _failed(self, event: TurnFailed, turn: _Turn) -> PageUpdate:
        ui = turn.ui
        gr.Warning(event.message)
        status = failure_markdown(turn.number, event.message)
        if turn.stream is None:  # the input was refused: it stays in place to be fixed
            return PageUpdate(chat=list(ui.messages), status=status, session=ui)
        turn.stream.close()
        partial = event.partial_text or turn.answer_text
        ui.messages[turn.answer_index] = {
            "role": "assistant",
            "content": (partial + "\n\n" if partial else "") + f"⚠️ {event.message}",
        }
        # no speech came: hide the live player; the question goes back into the input, so that
        # Submit retries it
        update = PageUpdate(chat=list(ui.messages), status=status, session=ui)
        if turn.stream.samples == 0:
            update = replace(update, live_player=live_player_html())
        if isinstance(turn.request, UserText):
            return replace(update, text_input=turn.text, audio_input=None)
        return replace(update, audio_input=turn.audio_path)


def _cleared(ui: UISession | None) -> PageUpdate:
    return PageUpdate(chat=[], live_player=live_player_html(), status="", session=ui, text_input="", audio_input=None)


async def _until(stop: asyncio.Event, events: AsyncIterator[TurnEvent]) -> AsyncIterator[TurnEvent]:
    """``events`` until ``stop`` is set, then ``events`` is closed (a turn's pipeline: that cancels its
    tasks and closes its token stream). ``stop`` wins over an event that is ready at the same time."""
    stopped = asyncio.ensure_future(stop.wait())
    step: asyncio.Future | None = None
    try:
        while not stop.is_set():
            step = asyncio.ensure_future(anext(events))
            await asyncio.wait((step, stopped), return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                return
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield event
    finally:
        stopped.cancel()
        if step is not None and not step.done():  # stopped, or this iteration was itself cancelled
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
        await events.aclose()


def _options(temperature, top_p, max_new_tokens) -> GenerationOptions:
    try:
        return GenerationOptions(float(temperature), float(top_p), int(max_new_tokens))
    except (TypeError, ValueError):
        return GenerationOptions(temperature, top_p, max_new_tokens)  # check() explains what is wrong


def _user_content(request: UserRequest) -> Any:
    if isinstance(request, UserSpeech):
        return {"path": str(request.source)}
    return request.text.strip()


class _Throttle:
    def __init__(self, interval: float):
        self.interval = interval
        self.last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            return True
        return False


# --- the page -----------------------------------------------------------------------------------------


def create_demo(
    chat: VoiceChat,
    streams: AudioStreams,
    files: DemoFiles,
    settings: DemoSettings = DemoSettings(),
    uploads: SessionUploads | None = None,
) -> gr.Blocks:
    """The Gradio page. Its handlers are one :class:`TurnHandler` over the app's objects (no module globals).
    The sample prompts' files are shared in ``uploads`` (every browser session may submit them)."""
    handler = TurnHandler(chat, streams, files)

    def switch_mode(mode: str):
        audio = mode == InputMode.AUDIO.value
        return gr.update(visible=audio), gr.update(visible=not audio)

    # no telemetry or version-check thread; Gradio's copies of answer files are deleted after an hour
    with gr.Blocks(title="GLM-4-Voice Demo", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown("# GLM-4-Voice\nSpeak or type; the answer streams as text and speech.", elem_id="title")
        if settings.random_weights_notice:
            gr.HTML(RANDOM_WEIGHTS_NOTICE, elem_id="random-weights-notice", js_on_load=None)
        ui_state = gr.State(None, delete_callback=handler.end_session)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=460, feedback_options=None,
                                     buttons=["copy", "copy_all"],
                                     placeholder="Record a question, or switch to text and type one.")  # fmt: skip
                live = gr.HTML(live_player_html(), elem_id="live-player", js_on_load=LIVE_PLAYER_JS)
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=1, min_width=300):
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

        components = dict(chat=chatbot, live_player=live, status=status, session=ui_state, text_input=text_in,
                          audio_input=audio_in)  # fmt: skip
        outputs = [components[name] for name in PAGE_OUTPUTS]
        gr.on(
            [submit.click, text_in.submit],
            handler.respond,
            inputs=[mode, audio_in, text_in, temperature, top_p, max_new_tokens, ui_state],
            outputs=outputs,
            concurrency_limit=settings.max_concurrent_turns,
            trigger_mode="once",
            show_progress="minimal",
        )
        # Clear (and the chat's own trash button) stops a running turn through the handler, not with
        # Gradio's `cancels`: that cancels the turn's task from a separate request, racing with
        # Clear's own answer, so that an update the turn had computed just before could repaint the
        # cleared page, and Submit stayed blocked ("once") until that request came back. Here the turn
        # ends itself with the cleared page as its last update, and Clear answers after it.
        for clear_event in (clear_button.click, chatbot.clear):
            clear_event(None, js=STOP_PLAYER_JS)
            clear_event(handler.clear, inputs=[ui_state], outputs=outputs, concurrency_limit=None)
        mode.change(switch_mode, inputs=[mode], outputs=[audio_box, text_box], queue=False)
    return demo
