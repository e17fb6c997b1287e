"""GLM-4-Voice web demo: talk (or type) to the model in the browser and hear it answer as it speaks.

    python web_demo.py --host 0.0.0.0 --port 8888 --server-url http://localhost:10000 \\
        --model-path THUDM/glm-4-voice-9b --tokenizer-path THUDM/glm-4-voice-tokenizer \\
        --flow-path THUDM/glm-4-voice-decoder --device cuda:0

A client of ``model_server.py``: this process loads the speech tokenizer, the speech decoder and
the text tokenizer (only the tokenizer files of ``--model-path``) once at start; each turn runs
:meth:`glm4voice.pipeline.VoiceChat.run_turn` (tokenize speech, build the prompt from the
session's history ids, stream tokens from the server, decode audio blocks while tokens arrive).

How the speech reaches the speaker: Gradio's own streaming ``gr.Audio`` output re-encodes each
chunk and plays the chunks through a media element, which stutters at the seams (original
issue #7). Instead the Gradio app is mounted in a FastAPI app that also serves one plain HTTP
route per turn, ``GET glm4voice/stream/<id>`` (``glm4voice/web/streams.py``; the id is random and
unguessable, created when the turn's input is accepted and discarded at the next turn, on Clear
and when the session ends). The turn's handler pushes every decoded chunk into it as int16 PCM
frames; the page's small Web Audio player (``glm4voice/web/player.js``, loaded in the page head)
fetches that route as soon as the handler publishes the id through a ``gr.HTML`` element, reads
the response body as it arrives and starts each chunk exactly where the previous one ends on an
AudioContext running at the decoder's rate: sample-accurate, gapless and click-free, starting
with the first decoded block. Text, the chat history and errors travel through Gradio's normal
event stream; the whole answer is also added to the chat as an ordinary audio player at the end.
"""

from __future__ import annotations

import argparse
import html
import logging
import shutil
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from fastapi import FastAPI

from glm4voice.audio import encode_wav
from glm4voice.hub import PUBLISHED_DECODER, PUBLISHED_LLM, PUBLISHED_SPEECH_TOKENIZER
from glm4voice.openai_api import add_openai_routes
from glm4voice.pipeline import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_INPUT_SECONDS,
    AssistantAudio,
    AssistantText,
    ChatSession,
    GenerationOptions,
    InputAccepted,
    PipelineConfig,
    TurnFailed,
    TurnFinished,
    UserSpeech,
    UserText,
    VoiceChat,
)
from glm4voice.protocol import InputMode
from glm4voice.web import player_script
from glm4voice.web.streams import AudioStreams, add_stream_route, stream_url

logger = logging.getLogger("glm4voice.web_demo")

ROOT = Path(__file__).resolve().parent
RESOURCES = ROOT / "resources"
DEFAULT_SERVER_URL = "http://localhost:10000"
DEFAULT_PORT = 8888
MAX_UPLOAD_SIZE = "100mb"
MAX_NEW_TOKENS_LIMIT = 4096
"""The token server's default cap (``--max-new-tokens-cap``)."""
TEXT_REFRESH_S = 0.1
"""Streamed text is pushed to the page at most this often (every token would flood the page)."""
DEFAULT_MAX_CONCURRENT_TURNS = 8
GPU_MAX_CONCURRENT_TURNS = 32
"""Default on CUDA: 32 conversations stay real time on one H100 (docs/PERFORMANCE.md)."""

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
    max_concurrent_turns: int = DEFAULT_MAX_CONCURRENT_TURNS
    server_url: str = DEFAULT_SERVER_URL


@dataclass
class UISession:
    """One browser tab: its conversation (ids), what its chat shows, its current audio stream."""

    chat: ChatSession
    messages: list[dict[str, Any]] = field(default_factory=list)
    stream_id: str | None = None
    files: list[Path] = field(default_factory=list)


class DemoFiles:
    """Answer wav files, in one temporary folder owned by the app (removed at shutdown)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="glm4voice-demo-"))

    def write_answer(self, name: str, samples: np.ndarray, sample_rate: int) -> Path:
        path = self.folder / f"answer-{name}.wav"
        path.write_bytes(encode_wav(samples, sample_rate))
        return path

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
        paths.clear()

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# --- the page -----------------------------------------------------------------------------------------


def live_player_html(stream_id: str | None = None, url: str | None = None) -> str:
    """The element the page's player watches: a new ``data-turn`` starts a new stream."""
    if stream_id is None:
        return '<div class="glm4voice-live idle"><span class="glm4voice-live-status"></span></div>'
    return (
        f'<div class="glm4voice-live" data-stream="{html.escape(url or "")}" data-turn="{html.escape(stream_id)}">'
        f"{SPEAKER_ICON}<span class=\"glm4voice-live-status\">Waiting for speech…</span></div>"
    )


def failure_markdown(turn_number: int, message: str) -> str:
    return f"⚠️ **Turn {turn_number} failed:** {message}"


def create_demo(
    chat: VoiceChat, streams: AudioStreams, files: DemoFiles, settings: DemoSettings = DemoSettings()
) -> gr.Blocks:
    """The Gradio page. Its handlers are closures over the app's objects (no module globals)."""

    async def respond(mode, audio_path, text, temperature, top_p, max_new_tokens, ui: UISession | None):
        ui = ui or UISession(chat.new_session())
        epoch = ui.chat.epoch
        request = UserSpeech(audio_path) if mode == InputMode.AUDIO.value else UserText(text or "")
        try:
            options = GenerationOptions(float(temperature), float(top_p), int(max_new_tokens))
        except (TypeError, ValueError):
            options = GenerationOptions(temperature, top_p, max_new_tokens)  # check() explains what is wrong
        turn_number = ui.chat.turns_started + 1
        prompt_tokens = 0
        heard = ""
        stream = None
        answer_index = None
        answer_text = ""
        throttle = _Throttle(TEXT_REFRESH_S)
        keep = gr.skip()
        try:
            async for event in chat.run_turn(ui.chat, request, options):
                if ui.chat.epoch != epoch:  # Clear was pressed while this turn ran: show the cleared page, stop
                    yield list(ui.messages), live_player_html(), "", ui, keep, keep
                    return
                if isinstance(event, InputAccepted):
                    streams.discard(ui.stream_id)
                    stream = streams.open()
                    ui.stream_id = stream.id
                    ui.messages.append({"role": "user", "content": _user_content(request)})
                    ui.messages.append({"role": "assistant", "content": "…"})
                    answer_index = len(ui.messages) - 1
                    prompt_tokens = event.prompt_tokens
                    heard = (f"heard {event.input_seconds:.1f} s of speech ({event.speech_tokens} speech tokens) · "
                             if event.mode is InputMode.AUDIO else "")  # fmt: skip
                    status = f"Turn {turn_number} · {heard}prompt {prompt_tokens} tokens · generating…"
                    yield (list(ui.messages), live_player_html(stream.id, stream_url(stream)), status, ui, "", None)
                elif isinstance(event, AssistantText):
                    answer_text += event.text
                    ui.messages[answer_index] = {"role": "assistant", "content": answer_text}
                    if throttle.ready():
                        yield list(ui.messages), keep, keep, ui, keep, keep
                elif isinstance(event, AssistantAudio):
                    stream.push(event.samples)
                elif isinstance(event, TurnFinished):
                    stream.close()
                    ui.messages[answer_index] = {
                        "role": "assistant",
                        "content": event.text or "(no text in this answer)",
                    }
                    if len(event.audio):
                        path = files.write_answer(stream.id, event.audio, event.sample_rate)
                        ui.files.append(path)
                        ui.messages.append(
                            {"role": "assistant", "content": {"path": str(path), "mime_type": "audio/wav"}}
                        )
                    first = event.timings.first_audio
                    summary = (f"Turn {turn_number} · done · {heard}answer: {event.audio_seconds:.1f} s of speech, "
                               f"{event.text_tokens} text tokens"
                               + (f", first audio after {first:.2f} s" if first is not None else "")
                               + f" · prompt {prompt_tokens} tokens")  # fmt: skip
                    yield list(ui.messages), keep, summary, ui, keep, keep
                elif isinstance(event, TurnFailed):
                    gr.Warning(event.message)
                    status = failure_markdown(turn_number, event.message)
                    if stream is None:  # the input was refused: it stays in place to be fixed
                        yield list(ui.messages), keep, status, ui, keep, keep
                        continue
                    stream.close()
                    partial = event.partial_text or answer_text
                    ui.messages[answer_index] = {
                        "role": "assistant",
                        "content": (partial + "\n\n" if partial else "") + f"⚠️ {event.message}",
                    }
                    # no speech came: hide the live player; the question goes back into the input,
                    # so that Submit retries it
                    live_update = live_player_html() if stream.samples == 0 else keep
                    text_back, audio_back = (text, None) if isinstance(request, UserText) else (keep, audio_path)
                    yield list(ui.messages), live_update, status, ui, text_back, audio_back
        finally:
            if stream is not None:
                stream.close()

    def clear(ui: UISession | None):
        if ui is not None:
            ui.chat.clear()
            ui.messages = []
            streams.discard(ui.stream_id)
            ui.stream_id = None
            files.remove(ui.files)
        return [], live_player_html(), "", ui, "", None

    def switch_mode(mode: str):
        audio = mode == InputMode.AUDIO.value
        return gr.update(visible=audio), gr.update(visible=not audio)

    def end_session(ui: UISession | None) -> None:
        if ui is not None:
            streams.discard(ui.stream_id)
            files.remove(ui.files)

    # no telemetry or version-check thread; Gradio's copies of answer files are deleted after an hour
    with gr.Blocks(title="GLM-4-Voice Demo", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown("# GLM-4-Voice\nSpeak or type; the answer streams as text and speech.", elem_id="title")
        if settings.random_weights_notice:
            gr.HTML(RANDOM_WEIGHTS_NOTICE, elem_id="random-weights-notice", js_on_load=None)
        ui_state = gr.State(None, delete_callback=end_session)
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
                        gr.Examples(
                            [[str(path)] for path, _ in samples],
                            inputs=[audio_in],
                            label="Sample prompts (espeak-ng)",
                            example_labels=[label for _, label in samples],
                            elem_id="audio-examples",
                        )
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
                    temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                                            elem_id="temperature")  # fmt: skip
                    top_p = gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top p", elem_id="top-p")
                    max_new_tokens = gr.Number(DEFAULT_MAX_NEW_TOKENS, label="Max new tokens", precision=0, minimum=1,
                                               maximum=MAX_NEW_TOKENS_LIMIT, elem_id="max-new-tokens")  # fmt: skip

        outputs = [chatbot, live, status, ui_state, text_in, audio_in]
        turn = gr.on(
            [submit.click, text_in.submit],
            respond,
            inputs=[mode, audio_in, text_in, temperature, top_p, max_new_tokens, ui_state],
            outputs=outputs,
            concurrency_limit=settings.max_concurrent_turns,
            trigger_mode="once",
            show_progress="minimal",
        )
        # Clear (and the chat's own trash button) cancels a running turn. It runs through the queue so
        # that its outputs travel on the session's event stream after anything the cancelled turn
        # had already sent: a late message of that turn can never repaint the cleared chat.
        for clear_event in (clear_button.click, chatbot.clear):
            clear_event(None, js=STOP_PLAYER_JS)
            clear_event(clear, inputs=[ui_state], outputs=outputs, cancels=[turn], concurrency_limit=None)
        mode.change(switch_mode, inputs=[mode], outputs=[audio_box, text_box], queue=False)
    return demo


def create_app(chat: VoiceChat, settings: DemoSettings = DemoSettings(), *, close_client=None) -> FastAPI:
    """The FastAPI app: the turn-stream route, then the Gradio page mounted at ``/``."""
    streams = AudioStreams(chat.sample_rate)
    files = DemoFiles()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await _check_server(chat)
        try:
            yield
        finally:
            streams.discard_all()
            files.cleanup()
            chat.close()
            if close_client is not None:
                await close_client()

    app = FastAPI(title="GLM-4-Voice web demo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.streams = streams
    app.state.files = files
    app.state.chat = chat
    add_stream_route(app, streams)  # before the mount: "/" would catch everything
    add_openai_routes(app, chat)  # /v1: OpenAI-compatible chat completions and realtime (docs/API.md)
    demo = create_demo(chat, streams, files, settings)
    demo.queue(default_concurrency_limit=settings.max_concurrent_turns)
    player = player_script()
    head = f"<script>window.GLM4VOICE_SAMPLE_RATE = {int(chat.sample_rate)};</script>\n<script>{player}</script>"
    return gr.mount_gradio_app(
        app, demo, path="/", head=head, css=PAGE_CSS, allowed_paths=[str(RESOURCES)],
        max_file_size=MAX_UPLOAD_SIZE, footer_links=[], show_error=True, run_history=False,
    )  # fmt: skip


async def _check_server(chat: VoiceChat) -> None:
    """Say at start whether the model server answers (the page works either way and reports it per turn)."""
    health = getattr(chat.client, "health", None)
    if health is None:
        return
    from glm4voice.client import TokenServerError

    try:
        info = await health()
        logger.info("model server at %s is %s (%s)", chat.server_url, info.get("status"), info.get("model"))
    except TokenServerError as error:
        logger.warning("the model server at %s does not answer yet (%s); turns will fail until it does",
                       chat.server_url, error)  # fmt: skip


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


def _user_content(request) -> Any:
    if isinstance(request, UserSpeech):
        return {"path": str(request.source)}
    return request.text.strip()


# --- command line -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    parser.add_argument(
        "--model-path",
        default=PUBLISHED_LLM,
        help="glm-4-voice-9b folder or hub id: only its text tokenizer files are read (default %(default)s)",
    )
    parser.add_argument(
        "--tokenizer-path",
        default=PUBLISHED_SPEECH_TOKENIZER,
        help="speech tokenizer folder or hub id (default %(default)s)",
    )
    parser.add_argument(
        "--flow-path", default=PUBLISHED_DECODER, help="speech decoder folder or hub id (default %(default)s)"
    )
    parser.add_argument(
        "--server-url", default=DEFAULT_SERVER_URL, help="model_server.py address (default %(default)s)"
    )
    parser.add_argument(
        "--device", default=None, help="cuda:N or cpu for the tokenizer and decoder (default: cuda:0 if available)"
    )
    parser.add_argument(
        "--decoder-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="speech decoder estimator precision; auto = bfloat16 on CUDA (meets real time), float32 on CPU",
    )
    parser.add_argument(
        "--block-sizes",
        default=",".join(str(s) for s in PipelineConfig().block_sizes),
        help="audio tokens per decoded block, first to last (default %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent-turns",
        type=int,
        default=None,
        help=f"turns handled at once across all users (default {GPU_MAX_CONCURRENT_TURNS} with a GPU, "
        f"{DEFAULT_MAX_CONCURRENT_TURNS} on a CPU)",
    )
    parser.add_argument(
        "--random-weights-notice",
        action="store_true",
        help="say in the page that the checkpoints are random (set by glm4voice.launch)",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def load_chat(args: argparse.Namespace) -> tuple[VoiceChat, Any]:
    """Load the models once (text tokenizer files, speech tokenizer, decoder) and the client."""
    import torch

    from flow_inference import AudioDecoder
    from glm4voice.client import AsyncTokenClient
    from glm4voice.hub import resolve_checkpoint
    from glm4voice.text_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_MODEL_FILE, GLMTokenizer
    from speech_tokenizer import SpeechTokenizer

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    block_sizes = tuple(int(s) for s in args.block_sizes.split(",") if s.strip())
    config = PipelineConfig(block_sizes=block_sizes)
    started = time.perf_counter()
    llm_folder = resolve_checkpoint(args.model_path, allow_patterns=[TOKENIZER_MODEL_FILE, TOKENIZER_CONFIG_FILE])
    text_tokenizer = GLMTokenizer.from_pretrained(llm_folder)
    speech_tokenizer = SpeechTokenizer.from_pretrained(args.tokenizer_path, device=device)
    decoder_dtype = args.decoder_dtype
    if decoder_dtype == "auto":
        decoder_dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    decoder = AudioDecoder.from_pretrained(args.flow_path, device=device, dtype=getattr(torch, decoder_dtype))
    if decoder.device.type == "cuda":  # every block shape's CUDA graph now, not while a listener waits
        decoder.warm_up(block_sizes, batch_sizes=decoder.graph_batch_sizes)  # ~1 min
    client = AsyncTokenClient(args.server_url)
    logger.info("models loaded on %s in %.1f s", device, time.perf_counter() - started)
    chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, client, config, server_url=args.server_url)
    return chat, client


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_concurrent_turns is not None and args.max_concurrent_turns < 1:
        parser.error("--max-concurrent-turns must be at least 1")
    try:
        chat, client = load_chat(args)
    except (OSError, ValueError) as error:  # missing or malformed checkpoint folders, bad --block-sizes
        logger.error("cannot start the web demo: %s", error)
        return 1
    if args.max_concurrent_turns is None:
        on_gpu = getattr(chat.decoder, "device", None) is not None and chat.decoder.device.type == "cuda"
        args.max_concurrent_turns = GPU_MAX_CONCURRENT_TURNS if on_gpu else DEFAULT_MAX_CONCURRENT_TURNS
    settings = DemoSettings(random_weights_notice=args.random_weights_notice,
                            max_concurrent_turns=args.max_concurrent_turns, server_url=args.server_url)  # fmt: skip
    app = create_app(chat, settings, close_client=client.aclose)
    shown = "localhost" if args.host in ("0.0.0.0", "127.0.0.1", "::") else args.host
    logger.info("web demo on http://%s:%d (model server %s)", shown, args.port, args.server_url)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
