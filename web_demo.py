"""GLM-4-Voice web demo: talk (or type) to the model in the browser and hear it answer as it speaks.

    python web_demo.py --port 8888 --server-url http://localhost:10000 \\
        --model-path THUDM/glm-4-voice-9b --tokenizer-path THUDM/glm-4-voice-tokenizer \\
        --flow-path THUDM/glm-4-voice-decoder --device cuda:0

It listens on 127.0.0.1 unless ``--host`` says otherwise (the README's "Exposing the demo" says what
the page guards by itself and what a reverse proxy must add before ``--host 0.0.0.0``).

A client of ``model_server.py``: this process loads the speech tokenizer, the speech decoder and
the text tokenizer (only the tokenizer files of ``--model-path``) once at start; each turn runs
:meth:`glm4voice.pipeline.VoiceChat.run_turn` (tokenize speech, build the prompt from the
session's history ids, stream tokens from the server, decode audio blocks while tokens arrive).

The one-process layout (``--in-process-engine``; ``python -m glm4voice.launch --layout one-process``
runs it): the LLM engine runs in this process instead, with ``model_server.py``'s engine flags
(``--dtype``, ``--max-concurrent-streams``, ``--max-seq-len``, ...; its device is ``--llm-device``,
default ``--device``), and the page and the API reach it through
:class:`glm4voice.server.inprocess.InProcessTokenClient`, which behaves as the HTTP client of
``model_server.py`` does (same token ids, errors, admission and back-pressure). One CUDA context: the
speech tokenizer and decoder run on the device's highest-priority CUDA stream, so with the engine on
the same GPU a listener's audio block does not wait behind LLM steps (two processes time-slice the
GPU instead). The engine starts (load, warm-up) before the page accepts connections; if it dies,
the process exits with ``ENGINE_FAILED_EXIT_CODE`` so that a supervisor restarts it.

    python web_demo.py --in-process-engine --model-path THUDM/glm-4-voice-9b \\
        --tokenizer-path THUDM/glm-4-voice-tokenizer --flow-path THUDM/glm-4-voice-decoder --device cuda:0

This script is the command line and the wiring only: the app is
:func:`glm4voice.web.app.create_app`, the page and its streaming player :mod:`glm4voice.web.page`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import model_server
from glm4voice import serving
from glm4voice.defaults import (
    DEFAULT_SERVER_URL,
    ENGINE_FAILED_EXIT_CODE,
    GPU_MAX_CONCURRENT_TURNS,
    MAX_CONCURRENT_TURNS,
    WEB_DEMO_HOST,
    WEB_DEMO_PORT,
)
from glm4voice.devices import (
    AUTO,
    DECODER_DTYPE_CHOICES,
    DeviceError,
    decoder_dtype,
    prefer_expandable_segments,
    resolve_device,
)
from glm4voice.hub import PUBLISHED_DECODER, PUBLISHED_LLM, PUBLISHED_SPEECH_TOKENIZER
from glm4voice.pipeline import PipelineConfig, VoiceChat
from glm4voice.request_guard import HostPolicy, wildcard_notice
from glm4voice.web.app import create_app
from glm4voice.web.page import DemoSettings

logger = logging.getLogger("glm4voice.web_demo")

__all__ = [
    "DemoSettings",
    "build_app",
    "build_parser",
    "build_server",
    "check_args",
    "create_app",
    "load_chat",
    "main",
    "run_in_one_process",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--host",
        default=WEB_DEMO_HOST,
        help="address to listen on (default %(default)s: this machine only; 0.0.0.0 serves every network "
        "interface: see the README's 'Exposing the demo' first)",
    )
    parser.add_argument("--port", type=int, default=WEB_DEMO_PORT, help="port (default %(default)s)")
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
        default=AUTO,
        choices=DECODER_DTYPE_CHOICES,
        help="speech decoder estimator precision; auto = bfloat16 on CUDA (meets real time), float32 on CPU",
    )
    parser.add_argument(
        "--block-sizes",
        default=",".join(str(s) for s in PipelineConfig().block_sizes),
        help="audio tokens per decoded block, first to last (default %(default)s)",
    )
    parser.add_argument(
        "--min-token-rate",
        type=_positive_rate,
        default=PipelineConfig().min_token_rate,
        help="the slowest answer (tokens/s) the audio blocks are planned for (default %(default)s, three times "
        "real time); lower it below what the LLM streams on a slow GPU (bench/llm.py): smaller blocks, more "
        "decoder work",
    )
    parser.add_argument(
        "--cover-start",
        action="store_true",
        help="send a turn's first audio only once the audio decoded so far covers the wait for the later "
        "blocks at the measured token rate and decoder latency: under heavy load the answer starts later "
        'and plays without gaps (PipelineConfig.cover_start; docs/PERFORMANCE.md, "2026-11-28, evening")',
    )
    parser.add_argument(
        "--pace-generation",
        action=argparse.BooleanOptionalAction,
        default=PipelineConfig().pace_generation,
        help="read a turn's tokens no faster than its listener needs them, so the LLM engine in this process "
        "leaves the GPU to the decoder and to turns that need tokens (PipelineConfig.pace_generation; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent-turns",
        type=int,
        default=None,
        help=f"turns handled at once across all users (default {GPU_MAX_CONCURRENT_TURNS} with a GPU, "
        f"{MAX_CONCURRENT_TURNS} on a CPU); when given, the decoder's CUDA graphs cover only that many blocks "
        "at once (less GPU memory for a small card)",
    )
    parser.add_argument(
        "--random-weights-notice",
        action="store_true",
        help="say in the page that the checkpoints are random (set by glm4voice.launch)",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    # exposure and connections (docs/API.md, "Exposing the servers" and "Limits")
    serving.add_arguments(parser)
    one_process = parser.add_argument_group("one-process layout (the LLM engine in this process)")
    one_process.add_argument(
        "--in-process-engine",
        action="store_true",
        help="run the LLM engine (--model-path) in this process instead of using --server-url",
    )
    model_server.add_engine_arguments(one_process, device_flag="--llm-device")
    return parser


def _positive_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < rate < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens per second, got {text}")
    return rate


def load_chat(args: argparse.Namespace, client: Any = None) -> tuple[VoiceChat, Any]:
    """Load the models once (text tokenizer files, speech tokenizer, decoder) and the client
    (``client``: one given by the caller, e.g. the one-process layout's in-process client; default:
    an :class:`~glm4voice.client.AsyncTokenClient` of ``--server-url``)."""
    from flow_inference import AudioDecoder
    from glm4voice.client import AsyncTokenClient
    from glm4voice.decoder.options import graph_batch_sizes_for
    from glm4voice.hub import resolve_checkpoint
    from glm4voice.memory import memory_report, summary_line
    from glm4voice.text_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_MODEL_FILE, GLMTokenizer
    from speech_tokenizer import SpeechTokenizer

    device = str(resolve_device(args.device))
    block_sizes = tuple(int(s) for s in args.block_sizes.split(",") if s.strip())
    config = PipelineConfig(
        block_sizes=block_sizes,
        min_token_rate=args.min_token_rate,
        cover_start=args.cover_start,
        pace_generation=args.pace_generation,
    )
    started = time.perf_counter()
    llm_folder = resolve_checkpoint(args.model_path, allow_patterns=[TOKENIZER_MODEL_FILE, TOKENIZER_CONFIG_FILE])
    text_tokenizer = GLMTokenizer.from_pretrained(llm_folder)
    speech_tokenizer = SpeechTokenizer.from_pretrained(args.tokenizer_path, device=device)
    dtype = decoder_dtype(args.decoder_dtype, device)
    # at most one block per turn in flight: graphs for batches up to --max-concurrent-turns (default: every size)
    turns = args.max_concurrent_turns
    graphs = {} if turns is None else {"graph_batch_sizes": graph_batch_sizes_for(turns)}
    decoder = AudioDecoder.from_pretrained(args.flow_path, device=device, dtype=dtype, **graphs)
    if client is None:
        client = AsyncTokenClient(args.server_url)
    server_url = getattr(client, "base_url", args.server_url)
    chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, client, config, server_url=server_url)
    if decoder.device.type == "cuda":  # every block shape's CUDA graph now, not while a listener waits
        decoder.warm_up(block_sizes, first_block_sizes=chat.first_block_sizes)
    logger.info("models loaded on %s in %.1f s", device, time.perf_counter() - started)
    logger.info("speech side %s", summary_line(memory_report(device, chat.memory_owners())))
    return chat, client


def check_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[HostPolicy, serving.ConnectionLimits]:
    """The checks that need no model (a usage message and exit 2 for a bad flag): the host policy and
    connection limits the flags give."""
    if args.max_concurrent_turns is not None and args.max_concurrent_turns < 1:
        parser.error("--max-concurrent-turns must be at least 1")
    try:
        host_policy = HostPolicy.for_server(args.host, serving.allowed_hosts_from_args(args))
        limits = serving.limits_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        resolve_device(args.device)
    except DeviceError as error:
        parser.error(f"--device {args.device}: {error}")
    return host_policy, limits


def build_app(args: argparse.Namespace, chat: VoiceChat, client: Any, host_policy: HostPolicy) -> Any:
    """The web demo's app around a loaded ``chat`` (closes ``client`` when it stops)."""
    if args.max_concurrent_turns is None:
        on_gpu = getattr(chat.decoder, "device", None) is not None and chat.decoder.device.type == "cuda"
        args.max_concurrent_turns = GPU_MAX_CONCURRENT_TURNS if on_gpu else MAX_CONCURRENT_TURNS
    settings = DemoSettings(random_weights_notice=args.random_weights_notice,
                            max_concurrent_turns=args.max_concurrent_turns, server_url=chat.server_url)  # fmt: skip
    return create_app(chat, settings, close_client=client.aclose, host_policy=host_policy)


def build_server(app: Any, args: argparse.Namespace, host_policy: HostPolicy, limits: serving.ConnectionLimits,
                 server_url: str, before_shutdown: Any = None) -> serving.Server:  # fmt: skip
    """The uvicorn server for the web demo's ``app`` (logs where it listens and what it answers to;
    ``before_shutdown`` runs first when it stops)."""
    shown = "localhost" if args.host in ("0.0.0.0", "127.0.0.1", "::") else args.host
    logger.info("web demo on http://%s:%d (model server %s); answers to the hosts %s", shown, args.port,
                server_url, host_policy.describe())  # fmt: skip
    if notice := wildcard_notice(args.host, host_policy):
        logger.warning(notice)
    return serving.build_server(app, args.host, args.port, limits, before_shutdown=before_shutdown,
                                log_level=args.log_level)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prefer_expandable_segments()
    host_policy, limits = check_args(parser, args)
    if args.in_process_engine:
        return run_in_one_process(parser, args, host_policy, limits)
    try:
        chat, client = load_chat(args)
    except (OSError, ValueError) as error:  # missing or malformed checkpoint folders, bad --block-sizes
        logger.error("cannot start the web demo: %s", error)
        return 1
    app = build_app(args, chat, client, host_policy)
    server = build_server(app, args, host_policy, limits, args.server_url)
    server.run()
    return 0 if server.started else 1


def llm_device(args: argparse.Namespace) -> str:
    """The in-process engine's device: ``--llm-device``, else ``--device`` (resolved)."""
    return str(resolve_device(args.llm_device if args.llm_device is not None else args.device))


def run_in_one_process(parser: argparse.ArgumentParser, args: argparse.Namespace, host_policy: HostPolicy,
                       limits: serving.ConnectionLimits) -> int:  # fmt: skip
    """The one-process layout (see the module doc): the engine, then the page, in this process."""
    try:
        device = llm_device(args)
    except DeviceError as error:
        parser.error(f"--llm-device {args.llm_device}: {error}")
    try:  # no port of its own: host and port only name the page in the engine's log
        settings = model_server.settings_from_args(args, device=device)
    except ValueError as error:
        parser.error(str(error))
    from glm4voice.client import InProcessTokenClient
    from glm4voice.server.engine_backend import build_engine  # loads the model's code: after the cheap checks
    from glm4voice.server.inprocess import InProcessTokenServer

    try:
        engine = build_engine(settings)
    except ValueError as error:  # e.g. a --dtype this engine does not implement
        parser.error(str(error))
    tokens = InProcessTokenServer(engine, settings)
    try:
        chat, client = load_chat(args, client=InProcessTokenClient(tokens))
    except (OSError, ValueError) as error:  # missing or malformed checkpoint folders, bad --block-sizes
        logger.error("cannot start the web demo: %s", error)
        return 1
    logger.info("one process: LLM engine on %s (%s), speech tokenizer and decoder on %s", device, settings.dtype,
                getattr(chat.decoder, "device", args.device))  # fmt: skip
    app = tokens.serve_inside(build_app(args, chat, client, host_policy))
    # on SIGINT/SIGTERM the engine's open streams end at once (their turns fail with a message), so
    # that the server does not wait for answers still being generated
    server = build_server(app, args, host_policy, limits, client.base_url, tokens.begin_shutdown)
    tokens.on_engine_failure(server.request_exit)
    server.run()
    if tokens.failure is not None:
        logger.error("exiting with code %d: %s", ENGINE_FAILED_EXIT_CODE, tokens.state.stop_reason)
        return ENGINE_FAILED_EXIT_CODE
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
