"""GLM-4-Voice token server: the original's CLI and ``POST /generate_stream`` wire format, served
by our batching engine.

    python model_server.py --host localhost --port 10000 --model-path THUDM/glm-4-voice-9b \\
        --device cuda:0 --dtype bfloat16

The model loads and warms up before the port opens; ``GET /health`` then answers 200. Endpoints
(docs/API.md): ``POST /generate_stream`` (newline-delimited JSON, one ``{"token_id": N,
"error_code": 0}`` per token), ``GET /health``, ``GET /metrics`` (Prometheus text).

This script is the command line and the wiring only: the app is :func:`glm4voice.server.app.create_app`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from glm4voice import serving
from glm4voice.devices import DeviceError, llm_dtypes, prefer_expandable_segments, resolve_device
from glm4voice.server.app import ServerState, create_app, serve
from glm4voice.server.settings import ServerSettings

__all__ = ["ServerState", "add_engine_arguments", "build_parser", "create_app", "main", "serve", "settings_from_args"]


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the original's flags
    parser.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="port (default %(default)s)")
    parser.add_argument(
        "--model-path", default=defaults.model_path, help="glm-4-voice-9b folder or hub id (default %(default)s)"
    )
    add_engine_arguments(parser)
    parser.add_argument("--log-level", default=defaults.log_level, choices=("debug", "info", "warning", "error"))
    # exposure and connections (docs/API.md, "Exposing the servers" and "Limits")
    serving.add_arguments(parser)
    return parser


def add_engine_arguments(parser: argparse.ArgumentParser, device_flag: str = "--device") -> None:
    """The engine's and the stream limits' flags (also ``web_demo.py --in-process-engine``'s, where the
    device flag is ``--llm-device``)."""
    defaults = ServerSettings()
    parser.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=llm_dtypes(),
        help="weights and activations: what the engine implements (default %(default)s)",
    )
    parser.add_argument(
        "--quant-method",
        default=None,
        help="how a quantized --dtype is implemented, one of glm4voice.llm.quant's methods (e.g. hqq for int4; "
        "a wrong name is answered with the dtype's methods); default: the dtype's default",
    )
    if device_flag == "--device":
        parser.add_argument("--device", default=defaults.device, help="cuda:N or cpu (default %(default)s)")
    else:
        parser.add_argument(device_flag, default=None, help="cuda:N or cpu for the LLM engine (default: --device)")
    # serving
    parser.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=defaults.max_concurrent_streams,
        help="streams generated at once: the engine's batch size (default %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help="requests that may wait for a stream; more get 503 (default %(default)s)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=defaults.queue_timeout_s,
        help="seconds a request may wait for a stream before 503 (default %(default)s)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=defaults.max_seq_len,
        help="prompt + generated tokens per stream (default %(default)s)",
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: max-seq-len - 1)"
    )
    parser.add_argument(
        "--max-new-tokens-cap",
        type=int,
        default=defaults.max_new_tokens_cap,
        help="largest max_new_tokens accepted (default %(default)s)",
    )
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs / compilation (slower; for debugging)")
    parser.add_argument("--retry-after", type=int, default=defaults.retry_after_s, help="Retry-After seconds on 503")


def settings_from_args(args: argparse.Namespace, **overrides) -> ServerSettings:
    """The settings the flags give (``overrides``: fields set by the caller, e.g. the one-process
    command's device, host and port)."""
    fields = dict(
        host=args.host, port=args.port, model_path=args.model_path, dtype=args.dtype, quant_method=args.quant_method,
        device=getattr(args, "device", None), max_concurrent_streams=args.max_concurrent_streams,
        max_queue=args.max_queue, queue_timeout_s=args.queue_timeout, max_seq_len=args.max_seq_len,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens_cap=args.max_new_tokens_cap, eager=args.eager,
        retry_after_s=args.retry_after, log_level=args.log_level, allowed_hosts=serving.allowed_hosts_from_args(args),
        connection_limits=serving.limits_from_args(args),
    )  # fmt: skip
    return ServerSettings(**(fields | overrides))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prefer_expandable_segments()
    try:
        resolve_device(settings.device)
    except DeviceError as error:
        parser.error(f"--device {settings.device}: {error}")
    from glm4voice.server.engine_backend import build_engine  # loads the model's code: after the cheap checks

    try:
        engine = build_engine(settings)
    except ValueError as error:  # e.g. a --dtype this engine does not implement
        parser.error(str(error))
    app = create_app(engine, settings)
    return serve(app, settings)


if __name__ == "__main__":
    sys.exit(main())
