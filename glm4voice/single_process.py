"""The one-process layout: the LLM engine and the web demo (speech tokenizer, speech decoder, page,
OpenAI-compatible API) in one process, one CUDA context per device.

    python -m glm4voice.single_process --model-path THUDM/glm-4-voice-9b \\
        --tokenizer-path THUDM/glm-4-voice-tokenizer --flow-path THUDM/glm-4-voice-decoder \\
        --device cuda:0 [--llm-device cuda:1] [--port 8888]

(``python -m glm4voice.launch --layout one-process`` runs this, from the repository root: it builds on
the two entry scripts' command lines and wiring.) Flags: ``web_demo.py``'s (``--device``:
the speech tokenizer and decoder) plus ``model_server.py``'s engine flags (``--dtype``,
``--max-concurrent-streams``, ``--max-seq-len``, ...), the engine's device being ``--llm-device``
(default: ``--device``). There is no token server port: the page and the API reach the engine
through :class:`glm4voice.server.inprocess.InProcessTokenClient`, which behaves as the HTTP client
of ``model_server.py`` does (same token ids, errors, admission and back-pressure). The speech side's
GPU work runs on the device's highest-priority CUDA stream, so with the engine on the same GPU a
listener's audio block does not wait behind LLM steps (two processes would time-slice the GPU
instead). The engine starts (load, warm-up) before the page accepts connections; if it dies, the
process exits with ``ENGINE_FAILED_EXIT_CODE`` so that a supervisor (``glm4voice.launch``) restarts it.
"""

from __future__ import annotations

import argparse
import logging
import sys

import model_server
import web_demo
from glm4voice.defaults import ENGINE_FAILED_EXIT_CODE, LOOPBACK_HOST
from glm4voice.devices import DeviceError, resolve_device

logger = logging.getLogger("glm4voice.single_process")


def build_parser() -> argparse.ArgumentParser:
    parser = web_demo.build_parser()
    parser.prog = "python -m glm4voice.single_process"
    parser.description = __doc__
    model_server.add_engine_arguments(parser.add_argument_group("LLM engine"), device_flag="--llm-device")
    return parser


def llm_device(args: argparse.Namespace) -> str:
    """The engine's device: ``--llm-device``, else the speech side's ``--device`` (resolved)."""
    return str(resolve_device(args.device_llm if args.device_llm is not None else args.device))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host_policy, limits = web_demo.check_args(parser, args)
    try:
        device = llm_device(args)
    except DeviceError as error:
        parser.error(f"--llm-device {args.device_llm}: {error}")
    try:  # no port of its own: host and port only name the page in the engine's log
        settings = model_server.settings_from_args(args, device=device, host=LOOPBACK_HOST, port=args.port)
    except ValueError as error:
        parser.error(str(error))
    from glm4voice.server.engine_backend import build_engine  # loads the model's code: after the cheap checks
    from glm4voice.server.inprocess import InProcessTokenServer

    try:
        engine = build_engine(settings)
    except ValueError as error:  # e.g. a --dtype this engine does not implement
        parser.error(str(error))
    tokens = InProcessTokenServer(engine, settings)
    try:
        chat, client = web_demo.load_chat(args, client=tokens.client())
    except (OSError, ValueError) as error:  # missing or malformed checkpoint folders, bad --block-sizes
        logger.error("cannot start the demo: %s", error)
        return 1
    logger.info("one process: LLM engine on %s (%s), speech tokenizer and decoder on %s", device, settings.dtype,
                chat.decoder.device if hasattr(chat.decoder, "device") else args.device)  # fmt: skip
    app = tokens.serve_inside(web_demo.build_app(args, chat, client, host_policy))
    # on SIGINT/SIGTERM the engine's open streams end at once (their turns fail with a message), so
    # that the server does not wait for answers still being generated
    server = web_demo.build_server(app, args, host_policy, limits, client.base_url, tokens.state.begin_shutdown)
    tokens.on_engine_failure(server.request_exit)
    server.run()
    if tokens.failure is not None:
        logger.error("exiting with code %d: %s", ENGINE_FAILED_EXIT_CODE, tokens.state.stop_reason)
        return ENGINE_FAILED_EXIT_CODE
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
