"""Conversations at once on Ray Serve: how many stay real time with one engine replica and one speech
replica per GPU (``glm4voice.serve``, placement ``shared``), measured where the audio arrives.

    python bench/ray_e2e.py --levels 32,48,64 --out ray_e2e.json        # GPU machine, every GPU used
    python bench/ray_e2e.py --device cpu --config small --quick          # dry run of the script on a CPU
    python bench/ray_e2e.py --serve-only --speech-replicas 0 --port 8000   # only the engines, for bench/e2e.py:
    python bench/e2e.py --token-server-url http://127.0.0.1:8000           #   its turns, these engines
    python bench/ray_e2e.py --serve-only & python bench/ray_e2e.py --connect   # start and measure apart

What runs: a local Ray cluster with the Serve applications of ``python -m glm4voice.serve``. Engine
replicas build the published GLM-4-Voice-9B shape with random bf16 weights on their GPU and force the
answers into the 13 text / 26 audio interleave (``bench/e2e_server.py``'s ``PatternBackend``: the
engine samples every token as in production, the forced id goes on the wire); speech replicas load a
random decoder of the published shape (bf16 estimator, CUDA graphs, warmed up) and the tiny speech
tokenizer (the answers are forced, so the question's codes change nothing; the published tokenizer
would add ~15 ms to each question). Each conversation sends the spoken question
``bench/data/question_5s.wav`` through :class:`glm4voice.serve.turns.RemoteVoiceChat` (the way the
ingress's OpenAI routes run turns): a speech replica tokenizes it, this process builds the prompt, the
least busy speech replica runs the answer (its tokens from the least busy engine) and streams its events
back, and each audio chunk is stamped here on arrival.

A conversation stays real time if a player that starts ``PLAYER_LEAD_S`` after its first chunk never
runs dry (``bench/e2e.py``'s ``turn_record``, on arrival times here).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # replicas
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.common import BenchRun, log, machine_info, median
from glm4voice.defaults import PLAYER_LEAD_S

logger = logging.getLogger("bench.ray_e2e")

QUESTION = ROOT / "bench" / "data" / "question_5s.wav"
OBJECT_STORE_BYTES = 2 << 30
"""Ray's shared-memory object store: the answers' audio chunks pass through it (a container's /dev/shm may
be small; Ray's default is 30% of the memory)."""


# --- the engine replicas' backend (glm4voice.serve's --engine-factory) ------------------------------------


def published_engine(settings):
    """A replica's token backend: the published shape, random weights, forced answers."""
    return _pattern_engine(settings, "published")


def small_engine(settings):
    """The same with bench/llm.py's small shape (CPU dry runs)."""
    return _pattern_engine(settings, "small")


def _pattern_engine(settings, shape: str):
    from bench.e2e_server import build_backend

    options = argparse.Namespace(
        host=settings.host, port=settings.port, tokenizer_dir=settings.model_path, config=shape, device=settings.device,
        dtype=settings.dtype, quant_method=settings.quant_method, max_streams=settings.max_concurrent_streams,
        max_seq_len=settings.max_seq_len,
        eager=settings.eager, reference=False,
    )  # fmt: skip
    backend, _settings, _tokenizer, _model = build_backend(options)
    return backend


# --- the app ------------------------------------------------------------------------------------------------


def write_checkpoints(folder: Path, shape: str, text_only: bool = False) -> dict[str, Path]:
    """The text tokenizer (the engines' vocabulary), the tiny speech tokenizer and a random decoder."""
    from dataclasses import replace

    from glm4voice.checkpoints.decoder import PUBLISHED_DECODER_SIZES, TINY_DECODER_SIZES, write_random_decoder
    from glm4voice.checkpoints.speech_tokenizer import write_tiny_speech_tokenizer
    from glm4voice.checkpoints.text import write_tiny_text_tokenizer

    paths = {"text": folder / "text-tokenizer", "speech": folder / "speech-tokenizer", "decoder": folder / "decoder"}
    vocab = write_tiny_text_tokenizer(paths["text"])
    if text_only:
        return paths
    write_tiny_speech_tokenizer(paths["speech"], vocab, seed=0)
    sizes = PUBLISHED_DECODER_SIZES if shape == "published" else replace(TINY_DECODER_SIZES, vocab_size=16384)
    write_random_decoder(paths["decoder"], sizes, seed=0)
    return paths


def serve_config(args, paths: dict[str, Path], gpus: int):
    from glm4voice.serve.config import Placement, ReplicaSpec, ServeConfig, gpu_shares, speech_pipeline
    from glm4voice.server.settings import ServerSettings

    replicas = max(1, gpus) if args.replicas is None else args.replicas
    speech_replicas = replicas if args.speech_replicas is None else args.speech_replicas
    engine_gpus, speech_gpus = gpu_shares(Placement(args.placement)) if gpus else (0.0, 0.0)
    streams = max(args.levels)  # room for every conversation on one engine: Ray's routing spreads them
    server = ServerSettings(
        host="127.0.0.1", port=args.port, model_path=str(paths["text"]), dtype=args.llm_dtype,
        device="cuda:0" if gpus else "cpu", max_concurrent_streams=streams, max_queue=4 * streams, max_seq_len=1024,
        max_new_tokens_cap=8192, log_level="warning",
    )  # fmt: skip
    return ServeConfig(
        server=server, tokenizer_path=str(paths["speech"]), flow_path=str(paths["decoder"]), pipeline=speech_pipeline(),
        engine=ReplicaSpec(replicas, None, engine_gpus), speech=ReplicaSpec(speech_replicas, None, speech_gpus),
        max_concurrent_turns=streams, engine_factory=f"bench.ray_e2e:{args.config}_engine",
    )  # fmt: skip


# --- one conversation, measured at the client -------------------------------------------------------------


async def run_turn(chat, question, options, lead: float) -> dict:
    """One spoken turn through the speech replicas; events stamped on arrival here."""
    from bench.e2e import turn_record
    from glm4voice.pipeline import AssistantAudio, TurnFailed, TurnFinished, TurnTimings, UserSpeech
    from glm4voice.protocol import Conversation

    started = time.perf_counter()
    since = lambda: time.perf_counter() - started  # noqa: E731
    try:
        user_input = await chat.prepare_input(UserSpeech(question))
    except Exception as error:  # TurnError (every speech replica busy, ...): recorded as a failed turn
        return {"failed": f"input: {error}"}
    tokenized = since()
    prompt = Conversation(chat.text_tokenizer, chat.special).prompt_for(user_input)
    events = []
    sent = since()
    async for event in chat.generate(prompt, options):
        now = since()
        if isinstance(event, AssistantAudio):
            event = dataclasses.replace(event, elapsed=now)
        elif isinstance(event, (TurnFinished, TurnFailed)):  # the replica's clock started at `sent`
            shifted = {f.name: getattr(event.timings, f.name) for f in dataclasses.fields(TurnTimings)}
            shifted = {k: (v + sent if isinstance(v, float) else v) for k, v in shifted.items()}
            shifted.update(input_loaded=0.0, speech_tokenized=tokenized, input_ready=sent, first_audio=None)
            firsts = [e.elapsed for e in events if isinstance(e, AssistantAudio)]
            shifted["first_audio"] = firsts[0] if firsts else None  # on arrival
            timings = dataclasses.replace(event.timings, **shifted)
            event = dataclasses.replace(event, timings=timings, elapsed=now)
        events.append(event)
    return turn_record(events, lead)


async def run_level(chat, count: int, max_new_tokens: int, lead: float, seed0: int) -> list[dict]:
    from glm4voice.audio import load_audio
    from glm4voice.pipeline import GenerationOptions

    question = load_audio(QUESTION)
    options = [GenerationOptions(max_new_tokens=max_new_tokens, seed=seed0 + i) for i in range(count)]
    return list(await asyncio.gather(*(run_turn(chat, (question.samples, question.sample_rate), o, lead)
                                       for o in options)))  # fmt: skip


def level_summary(count: int, records: list[dict], wall: float, decoder: tuple[int, int]) -> dict:
    ok = [r for r in records if "failed" not in r]
    calls, blocks = decoder
    return {
        "conversations": count,
        "wall_s": round(wall, 2),
        "failed": len(records) - len(ok),
        "failures": sorted({r["failed"] for r in records if "failed" in r})[:3],
        "with_underrun": sum(1 for r in ok if r["underruns"]),
        "all_real_time": len(ok) == count and not any(r["underruns"] for r in ok),
        "min_slack_s": min((r["min_slack_s"] for r in ok if r["min_slack_s"] is not None), default=None),
        "ttfa_p50": median(r["ttfa"] for r in ok),
        "ttfa_max": max((r["ttfa"] for r in ok if r["ttfa"] is not None), default=None),
        "token_rate_p50": median(r["token_rate"] for r in ok),
        "token_rate_min": min((r["token_rate"] for r in ok if r["token_rate"]), default=None),
        "audio_rtf_p50": median(r["audio_rtf"] for r in ok),
        "mean_decode_batch": round(blocks / calls, 2) if calls else None,
    }


async def replica_stats(handle) -> list[dict]:
    return await handle.broadcast("stats").results_async(timeout_s=60, return_exceptions=True)


async def decoder_totals(speech) -> tuple[int, int]:
    stats = [s for s in await replica_stats(speech) if isinstance(s, dict)]
    return sum(s["decoder_calls"] for s in stats), sum(s["blocks_decoded"] for s in stats)


async def bench(args, run: BenchRun) -> None:
    from ray import serve

    from bench.e2e import answer_length
    from glm4voice.audio import SPEECH_TOKEN_RATE
    from glm4voice.protocol import LOW_LATENCY_BLOCK_SIZES
    from glm4voice.serve.config import ENGINE_APP, ENGINE_DEPLOYMENT, SERVE_APP, SPEECH_DEPLOYMENT
    from glm4voice.serve.tokens import tokenizer_folder
    from glm4voice.serve.turns import RemoteVoiceChat
    from glm4voice.text_tokenizer import GLMTokenizer

    speech = serve.get_deployment_handle(SPEECH_DEPLOYMENT, app_name=SERVE_APP)
    engines = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=ENGINE_APP)
    tokenizer = GLMTokenizer.from_pretrained(tokenizer_folder(args.paths["text"]))
    from glm4voice.serve.config import speech_pipeline

    chat = RemoteVoiceChat(speech, tokenizer, speech_pipeline())
    lead = PLAYER_LEAD_S
    short = answer_length(LOW_LATENCY_BLOCK_SIZES[0] + LOW_LATENCY_BLOCK_SIZES[1])
    long = answer_length(int(args.answer_seconds * SPEECH_TOKEN_RATE))
    for i in range(2):  # warm-up: every replica's first turns
        log(f"  warm-up: {await run_level(chat, max(2, 2 * args.replicas_started), short, lead, 900 + 10 * i)}")
    records = [(await run_level(chat, 1, short, lead, i))[0] for i in range(args.repeats)]
    run.record("ttfa_one_user", {"ttfa_p50": median(r.get("ttfa") for r in records), "turns": records})
    levels, misses = [], 0
    for count in args.levels:
        if run.left_s() < 60 + args.answer_seconds:
            log(f"skipping level {count}: {run.left_s():.0f} s of budget left")
            break
        before = await decoder_totals(speech)
        t0 = time.perf_counter()
        records = await run_level(chat, count, long, lead, 1000 * count)
        after = await decoder_totals(speech)
        level = level_summary(count, records, time.perf_counter() - t0, (after[0] - before[0], after[1] - before[1]))
        level["engine_streams"] = {
            s["replica"]: s["streams"] for s in await replica_stats(engines) if isinstance(s, dict)
        }
        levels.append(level)
        run.record(f"concurrency_{count}", level)
        misses = 0 if level["all_real_time"] else misses + 1
        if misses >= 2:
            break
    real_time = [lv["conversations"] for lv in levels if lv["all_real_time"]]
    run.record(
        "concurrency",
        {"levels": [lv["conversations"] for lv in levels], "max_all_real_time": max(real_time, default=0)},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when there is a GPU) or cpu")
    parser.add_argument("--config", choices=("published", "small"), default="published")
    parser.add_argument("--llm-dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--replicas", type=int, default=None, help="engine and speech replicas (default: one per GPU)")
    parser.add_argument("--speech-replicas", type=int, default=None,
                        help="default: as many as engine replicas (0 with --serve-only: engines for bench/e2e.py)")  # fmt: skip
    parser.add_argument("--placement", choices=("shared", "separate"), default="shared")
    parser.add_argument("--levels", default="16,32,48,64", help="concurrent conversations to try")
    parser.add_argument("--answer-seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=5, help="single-user turns")
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--port", type=int, default=8000, help="the app's HTTP port")
    parser.add_argument("--serve-only", action="store_true", help="start the app and serve until Ctrl-C/SIGTERM")
    parser.add_argument("--connect", action="store_true",
                        help="measure the app that a running --serve-only (same --levels) started on this machine")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="CPU dry run: short answers, few levels")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    import torch

    gpus = (
        torch.cuda.device_count() if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu" else 0
    )
    args.levels = sorted({int(n) for n in args.levels.split(",")})
    args.llm_dtype = args.llm_dtype or ("bfloat16" if gpus else "float32")
    if args.quick:
        args.answer_seconds, args.repeats, args.levels = min(args.answer_seconds, 4.0), 2, [1, 2]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = BenchRun(args.out, args.budget_s)
    run.record("machine", machine_info(torch.device("cuda" if gpus else "cpu"), config=args.config, gpus=gpus,
                                       placement=args.placement, player_start_lead_s=PLAYER_LEAD_S))  # fmt: skip
    import ray
    from ray import serve

    from glm4voice.serve.app import deploy

    args.paths = write_checkpoints(Path(tempfile.mkdtemp(prefix="ray-e2e-")), args.config, text_only=args.connect)
    config = serve_config(args, args.paths, gpus)
    args.replicas_started = config.engine.replicas
    if args.connect:  # the cluster and its app belong to the --serve-only process
        ray.init(address="auto", log_to_driver=False)
        try:
            asyncio.run(bench(args, run))
        finally:
            ray.shutdown()
        return 0
    ray.init(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=args.serve_only,
             object_store_memory=OBJECT_STORE_BYTES)  # fmt: skip
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, _interrupt)
    try:
        started = time.perf_counter()
        deploy(config)
        run.record("startup", {"seconds": round(time.perf_counter() - started, 1), "engine_replicas": config.engine.replicas,
                               "engine_gpus": config.engine.gpus, "speech_gpus": config.speech.gpus})  # fmt: skip
        if args.serve_only:
            log(f"serving on http://127.0.0.1:{args.port} (Ctrl-C stops it); text tokenizer: {args.paths['text']}")
            while True:
                signal.pause()
        asyncio.run(bench(args, run))
    except KeyboardInterrupt:
        log("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
