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

This script is the command line and the wiring only: the app is
:func:`glm4voice.web.app.create_app`, the page and its streaming player :mod:`glm4voice.web.page`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from glm4voice import serving
from glm4voice.defaults import (
    DEFAULT_SERVER_URL,
    GPU_MAX_CONCURRENT_TURNS,
    MAX_CONCURRENT_TURNS,
    WEB_DEMO_HOST,
    WEB_DEMO_PORT,
)
from glm4voice.devices import AUTO, DECODER_DTYPE_CHOICES, DeviceError, decoder_dtype, resolve_device
from glm4voice.hub import PUBLISHED_DECODER, PUBLISHED_LLM, PUBLISHED_SPEECH_TOKENIZER
from glm4voice.pipeline import PipelineConfig, VoiceChat
from glm4voice.request_guard import HostPolicy, wildcard_notice
from glm4voice.web.app import create_app
from glm4voice.web.page import DemoSettings

logger = logging.getLogger("glm4voice.web_demo")

__all__ = ["DemoSettings", "build_parser", "create_app", "load_chat", "main"]


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
    return parser


def load_chat(args: argparse.Namespace) -> tuple[VoiceChat, Any]:
    """Load the models once (text tokenizer files, speech tokenizer, decoder) and the client."""
    from flow_inference import AudioDecoder
    from glm4voice.client import AsyncTokenClient
    from glm4voice.decoder.options import graph_batch_sizes_for
    from glm4voice.hub import resolve_checkpoint
    from glm4voice.text_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_MODEL_FILE, GLMTokenizer
    from speech_tokenizer import SpeechTokenizer

    device = str(resolve_device(args.device))
    block_sizes = tuple(int(s) for s in args.block_sizes.split(",") if s.strip())
    config = PipelineConfig(block_sizes=block_sizes)
    started = time.perf_counter()
    llm_folder = resolve_checkpoint(args.model_path, allow_patterns=[TOKENIZER_MODEL_FILE, TOKENIZER_CONFIG_FILE])
    text_tokenizer = GLMTokenizer.from_pretrained(llm_folder)
    speech_tokenizer = SpeechTokenizer.from_pretrained(args.tokenizer_path, device=device)
    dtype = decoder_dtype(args.decoder_dtype, device)
    # at most one block per turn in flight: graphs for batches up to --max-concurrent-turns (default: every size)
    turns = args.max_concurrent_turns
    graphs = {} if turns is None else {"graph_batch_sizes": graph_batch_sizes_for(turns)}
    decoder = AudioDecoder.from_pretrained(args.flow_path, device=device, dtype=dtype, **graphs)
    client = AsyncTokenClient(args.server_url)
    chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, client, config, server_url=args.server_url)
    if decoder.device.type == "cuda":  # every block shape's CUDA graph now, not while a listener waits
        decoder.warm_up(block_sizes, first_block_sizes=chat.first_block_sizes)
    logger.info("models loaded on %s in %.1f s", device, time.perf_counter() - started)
    return chat, client


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    try:
        chat, client = load_chat(args)
    except (OSError, ValueError) as error:  # missing or malformed checkpoint folders, bad --block-sizes
        logger.error("cannot start the web demo: %s", error)
        return 1
    if args.max_concurrent_turns is None:
        on_gpu = getattr(chat.decoder, "device", None) is not None and chat.decoder.device.type == "cuda"
        args.max_concurrent_turns = GPU_MAX_CONCURRENT_TURNS if on_gpu else MAX_CONCURRENT_TURNS
    settings = DemoSettings(random_weights_notice=args.random_weights_notice,
                            max_concurrent_turns=args.max_concurrent_turns, server_url=args.server_url)  # fmt: skip
    app = create_app(chat, settings, close_client=client.aclose, host_policy=host_policy)
    shown = "localhost" if args.host in ("0.0.0.0", "127.0.0.1", "::") else args.host
    logger.info("web demo on http://%s:%d (model server %s); answers to the hosts %s", shown, args.port,
                args.server_url, host_policy.describe())  # fmt: skip
    if notice := wildcard_notice(args.host, host_policy):
        logger.warning(notice)
    server = serving.build_server(app, args.host, args.port, limits, log_level=args.log_level)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
