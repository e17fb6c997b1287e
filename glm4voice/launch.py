"""Start the whole demo with one command: model_server.py, then web_demo.py (or both in one process).

``python -m glm4voice.launch`` (what ``bash scripts/demo.sh`` runs). With no checkpoint arguments
it writes tiny random checkpoints to ``checkpoints/tiny`` (once) and says loudly that answers are
noise; pass ``--model-path``, ``--tokenizer-path`` and ``--flow-path`` (local folders or hub ids)
for the real models. Both processes are stopped together: if one exits, the other is stopped too and
the launcher exits non-zero, saying which one ended and why (a model server whose engine died exits
with ``ENGINE_FAILED_EXIT_CODE``), so that a supervisor can start the demo again.

Layouts (``--layout``): ``two-process`` (default, as the original: the token server on
``--server-port``, the web demo its HTTP client) or ``one-process`` (``web_demo.py --in-process-engine``:
the engine and the speech side in one process and one CUDA context, the speech side on a
high-priority CUDA stream; no token server port). Devices: ``--device`` for everything, or
``--llm-device`` and ``--decoder-device`` (the speech tokenizer goes with the decoder) to put the
LLM on one GPU and the speech side on another, in either layout.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from glm4voice.checkpoints import write_tiny_checkpoints
from glm4voice.defaults import (
    ENGINE_FAILED_EXIT_CODE,
    LLM_DTYPE,
    LOOPBACK_HOST,
    TOKEN_SERVER_PORT,
    WEB_DEMO_HOST,
    WEB_DEMO_PORT,
)
from glm4voice.devices import QUANTIZED_DTYPES, DeviceError, default_device, llm_dtypes, resolve_device
from glm4voice.hub import PUBLISHED_DECODER, PUBLISHED_LLM, PUBLISHED_SPEECH_TOKENIZER

logger = logging.getLogger("glm4voice.launch")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TINY_DIR = ROOT / "checkpoints" / "tiny"
SERVER_SCRIPT = ROOT / "model_server.py"
DEMO_SCRIPT = ROOT / "web_demo.py"
MODEL_SERVER = "model server"
WEB_DEMO = "web demo"
ONE_PROCESS_DEMO = "one-process demo"
TWO_PROCESS = "two-process"
ONE_PROCESS = "one-process"
LAYOUTS = (TWO_PROCESS, ONE_PROCESS)
ENGINE_OWNERS = (MODEL_SERVER, ONE_PROCESS_DEMO)
"""The processes that run the LLM engine (and exit with ENGINE_FAILED_EXIT_CODE when it dies)."""
SERVER_READY_TIMEOUT_S = 1800.0  # the real 9B model takes minutes to load from a slow disk
DEMO_READY_TIMEOUT_S = 1800.0  # the first run may download the tokenizer and decoder
POLL_INTERVAL_S = 0.5
TINY_FILES = (
    "glm-4-voice-9b/config.json",
    "glm-4-voice-9b/tokenizer.model",
    "glm-4-voice-9b/model.safetensors.index.json",
    "glm-4-voice-tokenizer/config.json",
    "glm-4-voice-tokenizer/model.safetensors",
    "glm-4-voice-decoder/config.yaml",
    "glm-4-voice-decoder/flow.pt",
    "glm-4-voice-decoder/hift.pt",
)
RANDOM_WEIGHTS_BANNER = (
    "\n"
    "  *** No checkpoints given: using TINY RANDOM checkpoints in {path} ***\n"
    "  *** The demo works end to end, but every answer (text and speech) is noise. ***\n"
    "  *** For real answers pass --model-path/--tokenizer-path/--flow-path (hub ids or folders), ***\n"
    "  *** e.g. --model-path {llm} --tokenizer-path {tok} --flow-path {dec} --device cuda:0 ***\n"
)


@dataclass(frozen=True)
class Checkpoints:
    llm: str
    speech_tokenizer: str
    decoder: str
    random_weights: bool


def choose_checkpoints(args: argparse.Namespace) -> Checkpoints:
    given = [args.model_path, args.tokenizer_path, args.flow_path]
    if all(given):
        return Checkpoints(args.model_path, args.tokenizer_path, args.flow_path, random_weights=False)
    if any(given):
        raise SystemExit("give all three of --model-path, --tokenizer-path and --flow-path, or none (tiny demo)")
    tiny_dir = Path(args.tiny_dir)
    if args.regenerate_tiny or not tiny_checkpoints_complete(tiny_dir):
        logger.info("writing tiny random checkpoints to %s", tiny_dir)
        write_tiny_checkpoints(tiny_dir, seed=0)
    print(
        RANDOM_WEIGHTS_BANNER.format(
            path=tiny_dir, llm=PUBLISHED_LLM, tok=PUBLISHED_SPEECH_TOKENIZER, dec=PUBLISHED_DECODER
        ),
        flush=True,
    )
    return Checkpoints(
        str(tiny_dir / "glm-4-voice-9b"),
        str(tiny_dir / "glm-4-voice-tokenizer"),
        str(tiny_dir / "glm-4-voice-decoder"),
        random_weights=True,
    )


def tiny_checkpoints_complete(tiny_dir: Path) -> bool:
    """All three tiny folders hold their files (an older or interrupted run may have left some out)."""
    return (tiny_dir / "README.txt").is_file() and all((tiny_dir / name).is_file() for name in TINY_FILES)


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {what} exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(POLL_INTERVAL_S)
    raise SystemExit(f"the {what} was not ready at {url} after {timeout:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m glm4voice.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", help=f"GLM-4-Voice-9B folder or hub id (e.g. {PUBLISHED_LLM})")
    parser.add_argument(
        "--tokenizer-path", help=f"speech tokenizer folder or hub id (e.g. {PUBLISHED_SPEECH_TOKENIZER})"
    )
    parser.add_argument("--flow-path", help=f"speech decoder folder or hub id (e.g. {PUBLISHED_DECODER})")
    parser.add_argument(
        "--layout",
        default=TWO_PROCESS,
        choices=LAYOUTS,
        help="two-process: model server + web demo (default, as the original); one-process: the engine and "
        "the speech side in one process, one CUDA context (README: 'Running on one GPU')",
    )
    parser.add_argument("--device", default=None, help="cuda:N or cpu for everything (default: cuda:0 if available)")
    parser.add_argument("--llm-device", default=None, help="cuda:N or cpu for the LLM engine (default: --device)")
    parser.add_argument(
        "--decoder-device",
        default=None,
        help="cuda:N or cpu for the speech decoder and speech tokenizer (default: --device)",
    )
    parser.add_argument("--dtype", default=LLM_DTYPE, choices=llm_dtypes(), help="LLM weights (default %(default)s)")
    parser.add_argument("--quant-method", default=None,
                        help="how a quantized --dtype is implemented (model_server.py --quant-method)")  # fmt: skip
    parser.add_argument(
        "--max-concurrent-turns",
        type=int,
        default=None,
        help="conversations answered at once: the model server's streams (each holds a KV cache) and the web "
        "demo's turns (and decoder graphs); fewer fit a small GPU, e.g. 4 with --dtype int4 on a 12 GB card "
        "(default: each process's own)",
    )
    parser.add_argument("--host", default=WEB_DEMO_HOST, help="web UI address (0.0.0.0 to serve the network)")
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="host names the web UI answers to besides localhost (web_demo.py --allowed-hosts; docs/API.md)",
    )
    parser.add_argument("--port", type=int, default=WEB_DEMO_PORT, help="web UI port")
    parser.add_argument(
        "--server-port", type=int, default=TOKEN_SERVER_PORT, help="model server port (loopback; two-process only)"
    )
    parser.add_argument(
        "--server-url",
        help="two-process only: use this running token server (e.g. python -m glm4voice.serve, the Ray Serve "
        "ingress) instead of starting model_server.py; it must serve the same --model-path",
    )
    parser.add_argument("--tiny-dir", default=str(DEFAULT_TINY_DIR))
    parser.add_argument("--regenerate-tiny", action="store_true")
    return parser


@dataclass(frozen=True)
class Devices:
    llm: str
    decoder: str


def choose_devices(args: argparse.Namespace) -> Devices:
    """The LLM's and the speech side's devices from ``--device``, ``--llm-device`` and
    ``--decoder-device``, each checked against this machine; :class:`DeviceError` says which flag is wrong."""
    shared = args.device or default_device()
    chosen = {}
    for flag, name in (("--device", args.device), ("--llm-device", args.llm_device),
                       ("--decoder-device", args.decoder_device)):  # fmt: skip
        if name is None:
            continue
        try:
            chosen[flag] = str(resolve_device(name))
        except DeviceError as error:
            raise DeviceError(f"{flag} {name}: {error}") from error
    base = chosen.get("--device", shared)
    return Devices(llm=chosen.get("--llm-device", base), decoder=chosen.get("--decoder-device", base))


def server_command(args: argparse.Namespace, model_path: str, device: str, dtype: str) -> list[str]:
    """model_server.py's command line: on loopback, with the launcher's model, device, dtype and turns."""
    turns = [] if args.max_concurrent_turns is None else ["--max-concurrent-streams", str(args.max_concurrent_turns)]
    return [
        sys.executable,
        str(SERVER_SCRIPT),
        "--host",
        LOOPBACK_HOST,
        "--port",
        str(args.server_port),
        "--model-path",
        model_path,
        "--device",
        device,
        "--dtype",
        dtype,
        *quant_method_args(args, dtype),
        *turns,
    ]


def quant_method_args(args: argparse.Namespace, dtype: str) -> list[str]:
    """``--quant-method`` for the engine's command, if one was asked for and ``dtype`` is still quantized
    (random weights on the CPU run in float32)."""
    return ["--quant-method", args.quant_method] if args.quant_method and dtype in QUANTIZED_DTYPES else []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        devices = choose_devices(args)
    except DeviceError as error:
        parser.error(str(error))
    if args.max_concurrent_turns is not None and args.max_concurrent_turns < 1:
        parser.error("--max-concurrent-turns must be at least 1")
    if args.server_url and args.layout == ONE_PROCESS:
        parser.error("--server-url is the token server of the two-process layout")
    from glm4voice.llm.quant import check_supported

    try:  # before anything starts: fp8 / int4 where they cannot run, with the dtypes that can
        check_supported(args.dtype, devices.llm, args.quant_method)
    except ValueError as error:  # QuantizationUnsupported, or a --quant-method the dtype does not have
        parser.error(str(error))

    checkpoints = choose_checkpoints(args)
    dtype = "float32" if checkpoints.random_weights and devices.llm == "cpu" else args.dtype
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    demo_args = [
        "--host", args.host, "--port", str(args.port), "--model-path", checkpoints.llm, "--tokenizer-path",
        checkpoints.speech_tokenizer, "--flow-path", checkpoints.decoder, "--device", devices.decoder,
    ]  # fmt: skip
    if checkpoints.random_weights:
        demo_args.append("--random-weights-notice")
    if args.max_concurrent_turns is not None:
        demo_args += ["--max-concurrent-turns", str(args.max_concurrent_turns)]
    if args.allowed_hosts:
        demo_args += ["--allowed-hosts", args.allowed_hosts]
    if args.layout == ONE_PROCESS:
        engine_args = ["--in-process-engine", "--llm-device", devices.llm, "--dtype", dtype,
                       *quant_method_args(args, dtype)]  # fmt: skip
        if args.max_concurrent_turns is not None:
            engine_args += ["--max-concurrent-streams", str(args.max_concurrent_turns)]
        commands = {ONE_PROCESS_DEMO: [sys.executable, str(DEMO_SCRIPT), *demo_args, *engine_args]}
        ready_urls: dict[str, str] = {}
    elif args.server_url:  # a token server someone else runs
        commands = {WEB_DEMO: [sys.executable, str(DEMO_SCRIPT), *demo_args, "--server-url", args.server_url]}
        ready_urls = {}
    else:
        server_url = f"http://{LOOPBACK_HOST}:{args.server_port}"
        commands = {
            MODEL_SERVER: server_command(args, checkpoints.llm, devices.llm, dtype),
            WEB_DEMO: [sys.executable, str(DEMO_SCRIPT), *demo_args, "--server-url", server_url],
        }
        ready_urls = {MODEL_SERVER: f"{server_url}/health"}
    local_host = LOOPBACK_HOST if args.host in ("0.0.0.0", "::") else args.host
    page = next(reversed(commands))  # the process that serves the page
    ready_urls[page] = f"http://{local_host}:{args.port}/"

    processes: dict[str, subprocess.Popen] = {}
    signal.signal(signal.SIGTERM, _terminate)  # stop the children on SIGTERM too, not only on Ctrl-C
    try:
        for name, command in commands.items():
            logger.info("starting the %s: %s", name, " ".join(command))
            processes[name] = subprocess.Popen(command, cwd=ROOT, env=env)
            timeout = DEMO_READY_TIMEOUT_S if name == WEB_DEMO else SERVER_READY_TIMEOUT_S
            wait_until_ready(ready_urls[name], processes[name], timeout, name)
        shown_host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0", "::") else args.host
        notice = "  (random weights: answers are noise)" if checkpoints.random_weights else ""
        print(f"\n  GLM-4-Voice demo: http://{shown_host}:{args.port}{notice}  (Ctrl-C stops it)\n", flush=True)
        return supervise(processes)
    except KeyboardInterrupt:
        return 0
    finally:
        for process in reversed(processes.values()):
            _stop(process)


def supervise(processes: dict[str, subprocess.Popen]) -> int:
    """Until one of ``processes`` (by name) exits; log which and why, and return the launcher's exit
    code: the child's own if it failed, else 1 (the demo did not end by the user's choice)."""
    while all(p.poll() is None for p in processes.values()):
        time.sleep(POLL_INTERVAL_S)
    name, ended = next((n, p) for n, p in processes.items() if p.returncode is not None)
    logger.error("%s; stopping the demo", exit_reason(name, ended.returncode))
    return ended.returncode if ended.returncode > 0 else 1


def exit_reason(name: str, code: int) -> str:
    """How a child ended, for people: ``name`` is :data:`MODEL_SERVER`, :data:`WEB_DEMO` or :data:`ONE_PROCESS_DEMO`."""
    if code < 0:
        try:
            return f"the {name} was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the {name} was killed by signal {-code}"
    if name in ENGINE_OWNERS and code == ENGINE_FAILED_EXIT_CODE:
        return f"the {name} exited with code {code}: its engine failed (the reason is in its log above)"
    return f"the {name} exited with code {code}"


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


if __name__ == "__main__":
    sys.exit(main())
