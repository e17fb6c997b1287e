"""GLM-4-Voice on Ray Serve: the token server's HTTP surface and the OpenAI-compatible API, served by
engine replicas (one per GPU) and speech replicas on a Ray cluster.

    python -m glm4voice.serve --model-path THUDM/glm-4-voice-9b --tokenizer-path THUDM/glm-4-voice-tokenizer \\
        --flow-path THUDM/glm-4-voice-decoder --device cuda --engine-replicas 2

By default it starts a Ray cluster on this machine (``--address local``) and stops it on Ctrl-C or
SIGTERM; ``--address auto`` or ``--address HOST:PORT`` deploys onto a running cluster instead (e.g.
KubeRay's) and deletes the two applications on exit. The HTTP surface (``POST /generate_stream``,
``/health``, ``/metrics``, ``/v1/...``, ``/replicas``) is on ``--host``/``--port`` (Ray Serve's
proxy). See the README, "Serving many users".
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType, ModuleType

from glm4voice import serving
from glm4voice.devices import AUTO, DECODER_DTYPE_CHOICES, default_device, llm_dtypes
from glm4voice.hub import PUBLISHED_DECODER, PUBLISHED_LLM, PUBLISHED_SPEECH_TOKENIZER
from glm4voice.pipeline import PipelineConfig
from glm4voice.serve.config import SERVE_PORT, Placement, ReplicaSpec, ServeConfig, gpu_shares, speech_pipeline
from glm4voice.server.settings import ServerSettings

logger = logging.getLogger("glm4voice.serve")

LOCAL = "local"


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerSettings()
    parser = argparse.ArgumentParser(
        prog="python -m glm4voice.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    # models (as model_server.py and web_demo.py take them)
    add("--model-path", default=PUBLISHED_LLM, help="glm-4-voice-9b folder or hub id (default %(default)s)")
    add("--tokenizer-path", default=PUBLISHED_SPEECH_TOKENIZER, help="speech tokenizer folder or hub id")
    add("--flow-path", default=PUBLISHED_DECODER, help="speech decoder folder or hub id")
    add("--device", default=None, help="cuda or cpu, for every replica (default: cuda if this machine has a GPU)")
    add("--dtype", default=defaults.dtype, choices=llm_dtypes(), help="LLM weights (default %(default)s)")
    add("--quant-method", default=None, help="how a quantized --dtype is implemented (model_server.py --quant-method)")
    add("--decoder-dtype", default=AUTO, choices=DECODER_DTYPE_CHOICES, help="speech decoder estimator precision")
    add("--block-sizes", default=",".join(str(s) for s in PipelineConfig().block_sizes),
        help="audio tokens per decoded block (default %(default)s)")  # fmt: skip
    # the cluster
    add("--address", default=LOCAL,
        help="'local' (default): start a Ray cluster on this machine and stop it on exit; 'auto' or HOST:PORT: "
             "deploy onto a running cluster")  # fmt: skip
    add("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    add("--num-gpus", type=int, default=None, help="GPUs of the local cluster (default: all)")
    # replicas and placement
    add("--engine-replicas", type=int, default=1, help="token engine replicas (one GPU each; default 1)")
    add("--max-engine-replicas", type=int, default=None,
        help="autoscale the engines between --engine-replicas and this, on ongoing requests")  # fmt: skip
    add("--speech-replicas", type=int, default=None,
        help="speech replicas (default: as many as engine replicas; 0: no speech side, no /v1 routes)")  # fmt: skip
    add("--max-speech-replicas", type=int, default=None, help="autoscale the speech side up to this")
    add("--placement", default=Placement.SHARED.value, choices=[p.value for p in Placement],
        help="GPU only: speech replicas beside the engines on their GPUs (shared, default) or on GPUs of their "
             "own (separate)")  # fmt: skip
    add("--speech-gpus", type=float, default=None,
        help="GPU share of a speech replica (default: 0.4 shared, 1 separate)")  # fmt: skip
    add("--engine-cpus", type=float, default=0.0, help="CPUs reserved per engine replica (default 0)")
    add("--speech-cpus", type=float, default=0.0, help="CPUs reserved per speech replica (default 0)")
    add("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas (default 1)")
    # the token server's limits, per engine replica
    add("--max-concurrent-streams", type=int, default=defaults.max_concurrent_streams,
        help="streams one engine replica generates at once (default %(default)s)")  # fmt: skip
    add("--max-queue", type=int, default=defaults.max_queue,
        help="requests that may wait for a free replica; more get 503 (default %(default)s)")  # fmt: skip
    add("--queue-timeout", type=float, default=defaults.queue_timeout_s,
        help="seconds a request may wait for a replica before 503 (default %(default)s)")  # fmt: skip
    add("--max-seq-len", type=int, default=defaults.max_seq_len, help="prompt + generated tokens per stream")
    add("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: max-seq-len - 1)")
    add("--max-new-tokens-cap", type=int, default=defaults.max_new_tokens_cap, help="largest max_new_tokens")
    add("--max-concurrent-turns", type=int, default=None,
        help="turns one speech replica runs at once (default 32 with a GPU, 8 on a CPU)")  # fmt: skip
    add("--eager", action="store_true", help="no CUDA graphs / compilation in the engines")
    add("--retry-after", type=int, default=defaults.retry_after_s, help="Retry-After seconds on 503")
    add("--engine-factory", default=None, help="module:function building a replica's token backend (benchmarks)")
    # the HTTP surface
    add("--host", default="127.0.0.1", help="address of Ray Serve's HTTP proxy (default %(default)s)")
    add("--port", type=int, default=SERVE_PORT, help="its port (default %(default)s)")
    add("--allowed-hosts", default="", help="host names answered besides the loopback names and --host")
    add("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The validated config (ValueError with a message for bad combinations)."""
    device = args.device or default_device()
    if device not in ("cpu", "cuda", "cuda:0"):
        raise ValueError(f"--device must be cuda or cpu (Ray gives each replica its own GPU), got {device!r}")
    on_gpu = device.startswith("cuda")
    placement = Placement(args.placement)
    engine_gpus, speech_gpus = gpu_shares(placement, args.speech_gpus) if on_gpu else (0.0, 0.0)
    server = ServerSettings(
        host=args.host, port=args.port, model_path=args.model_path, dtype=args.dtype, quant_method=args.quant_method,
        device="cuda:0" if on_gpu else "cpu", max_concurrent_streams=args.max_concurrent_streams,
        max_queue=args.max_queue, queue_timeout_s=args.queue_timeout, max_seq_len=args.max_seq_len,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens_cap=args.max_new_tokens_cap, eager=args.eager,
        retry_after_s=args.retry_after, log_level=args.log_level,
        allowed_hosts=serving.allowed_hosts_from_args(args),
    )  # fmt: skip
    speech_replicas = args.engine_replicas if args.speech_replicas is None else args.speech_replicas
    block_sizes = tuple(int(s) for s in args.block_sizes.split(",") if s.strip())
    return ServeConfig(
        server=server, tokenizer_path=args.tokenizer_path, flow_path=args.flow_path,
        decoder_dtype=args.decoder_dtype, pipeline=speech_pipeline(block_sizes=block_sizes),
        engine=ReplicaSpec(args.engine_replicas, args.max_engine_replicas, engine_gpus, args.engine_cpus),
        speech=ReplicaSpec(speech_replicas, args.max_speech_replicas, speech_gpus, args.speech_cpus),
        max_concurrent_turns=args.max_concurrent_turns, ingress_replicas=args.ingress_replicas,
        engine_factory=args.engine_factory,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to the internet
    import ray

    from glm4voice.serve.app import deploy, undeploy

    signals = (signal.SIGINT, signal.SIGTERM)
    own_cluster = args.address == LOCAL
    try:
        if own_cluster:
            ray.init(address=LOCAL, num_cpus=args.num_cpus, num_gpus=args.num_gpus, include_dashboard=False)
        else:
            ray.init(address=args.address)
        for sig in signals:  # after ray.init, which installs handlers of its own
            signal.signal(sig, _interrupt)
        deploy(config)
        shown = "localhost" if config.server.host in ("127.0.0.1", "0.0.0.0", "::") else config.server.host
        print(f"\n  GLM-4-Voice on Ray Serve: http://{shown}:{config.server.port}  ({config.engine.replicas} engine "
              f"and {config.speech.replicas} speech replicas; Ctrl-C stops it)\n", flush=True)  # fmt: skip
        while True:  # until SIGINT or SIGTERM (_interrupt)
            signal.pause()
    except KeyboardInterrupt:
        logger.info("stopping")
    except RuntimeError as error:  # a deployment that could not start (e.g. its checkpoint is missing)
        logger.error("cannot serve: %s", error)
        return 1
    finally:
        for sig in signals:  # a second Ctrl-C does not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        _shut_down(ray, own_cluster, undeploy)
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _shut_down(ray: ModuleType, own_cluster: bool, undeploy: Callable[[], None]) -> None:
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if own_cluster:
            serve.shutdown()  # type: ignore[no-untyped-call]
        else:
            undeploy()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
