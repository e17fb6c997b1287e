"""End to end: time to first audio (TTFA) of a spoken turn, audio real-time factor, and how many
conversations stay real time at once, on one GPU, with full-size random weights.

    python bench/e2e.py --out e2e.json                         # GPU machine (single command)
    python bench/e2e.py --device cpu --config small --quick    # dry run of the script on a CPU

What runs, as in production: ``bench/e2e_server.py`` in a child process (``model_server.py``'s
app around the engine with the published GLM-4-Voice-9B shape, bf16, CUDA graphs; the answers'
ids are forced into the 13 text / 26 audio interleave of a real conversation, see that file),
and in this process what ``web_demo.py`` loads: the speech tokenizer (published shape), the
speech decoder (published shape, bf16 estimator, CUDA graphs, bounded prompt window) and
:class:`glm4voice.pipeline.VoiceChat`, fed the 5 s spoken question ``bench/data/question_5s.wav``
(espeak-ng, ``bench/data/make_question.sh``).

Sections (each printed and written to ``--out`` as it finishes):

- ``first_block``: the decoder's first 10-token block alone: flow (encoder + 10-step ODE) and vocoder;
- ``ttfa``: single user, a new conversation per turn: TTFA from the end of the user's speech (the
  turn starts with the whole recording) to the first PCM of the answer, broken down into loading,
  speech tokenizer, prefill (request sent -> first token, HTTP included), tokens until the first
  block is complete (13 text + 10 audio), first block decode; also with the prefill CUDA graphs off;
- ``answer_30s``: one 30 s answer: audio RTF (decoder time / audio time), token rate, underruns;
- ``concurrency``: N conversations started together, each a 30 s answer; a conversation stays real
  time if a player that starts ``PLAYER_LEAD_S`` (glm4voice/defaults.py: the page's player) after
  the first chunk never runs dry; also at one level with cross-session block batching off;
- ``reference``: the reference-style pipeline measured in the same run: transformers ``generate()``
  with a streamer thread (batch 1), the original block schedule (25, 50, 100, 150, 200), float32
  eager decoder with the unbounded prompt, no seam cross-fade; TTFA and the ratio to ours
  (``--no-reference``: skipped; always with a quantized ``--llm-dtype``, whose weights transformers
  cannot run);
- ``memory``: GPU memory of both processes (nvidia-smi) and their sum: the whole demo's footprint at
  the levels run (the server's KV cache is sized by the largest level and ``--max-seq-len``; the
  decoder's CUDA graphs cover batches up to the largest level).

Quantized LLM weights (``--llm-dtype fp8`` / ``int4`` / ``int8``, glm4voice.llm.quant) run the same way;
their TTFA sits beside bf16's when both runs are made on the same machine::

    python bench/e2e.py --llm-dtype bfloat16 --levels 1,8 --no-reference --unbatched-level 0 --out e2e_bf16.json
    python bench/e2e.py --llm-dtype fp8 --levels 1,8 --unbatched-level 0 --out e2e_fp8.json
    python bench/e2e.py --llm-dtype int4 --levels 4 --max-seq-len 8192 --unbatched-level 0 --out e2e_int4_4.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import BenchRun, free_port, log, machine_info, median, time_call
from flow_inference import AudioDecoder
from glm4voice.audio import OUTPUT_SAMPLE_RATE, SPEECH_TOKEN_RATE, load_audio
from glm4voice.checkpoints.decoder import PUBLISHED_DECODER_SIZES, TINY_DECODER_SIZES, write_random_decoder
from glm4voice.checkpoints.text import write_tiny_text_tokenizer
from glm4voice.client import AsyncTokenClient, TokenClient
from glm4voice.decoder.options import graph_batch_sizes_for
from glm4voice.defaults import PLAYER_LEAD_S
from glm4voice.devices import default_device, llm_dtypes
from glm4voice.llm.quant import QUANTIZED_DTYPES
from glm4voice.pipeline import (
    AssistantAudio,
    GenerationOptions,
    PipelineConfig,
    TurnFailed,
    TurnFinished,
    UserSpeech,
    VoiceChat,
)
from glm4voice.protocol import (
    AUDIO_TOKENS_PER_SEGMENT,
    LOW_LATENCY_BLOCK_SIZES,
    ORIGINAL_BLOCK_SIZES,
    TEXT_TOKENS_PER_SEGMENT,
)
from glm4voice.text_tokenizer import GLMTokenizer

logger = logging.getLogger("bench.e2e")

QUESTION = ROOT / "bench" / "data" / "question_5s.wav"
SERVER_READY_TIMEOUT_S = 420


def answer_length(audio_tokens: int) -> int:
    """max_new_tokens of a forced answer with ``audio_tokens`` audio tokens (13/26 interleave, then the
    end-of-turn id)."""
    k = audio = 0
    while audio < audio_tokens:
        audio += (k % (TEXT_TOKENS_PER_SEGMENT + AUDIO_TOKENS_PER_SEGMENT)) >= TEXT_TOKENS_PER_SEGMENT
        k += 1
    return k + 1


# --- one turn's figures ---------------------------------------------------------------------------------


def turn_record(events: list, lead: float) -> dict:
    """TTFA breakdown, audio RTF and playback underruns of one turn from its events."""
    end = events[-1]
    if isinstance(end, TurnFailed):
        return {"failed": f"{end.kind.value}: {end.message}"}
    assert isinstance(end, TurnFinished), end
    t = end.timings
    chunks = [e for e in events if isinstance(e, AssistantAudio)]
    record = {
        "ttfa": t.first_audio,
        "load": t.input_loaded,
        "tokenize": _gap(t.input_loaded, t.speech_tokenized),
        "prompt": _gap(t.speech_tokenized, t.request_sent),
        "prefill": _gap(t.request_sent, t.first_token),
        "tokens_to_first_block": _gap(t.first_token, t.first_block_ready),
        "first_block_decode": _gap(t.first_block_ready, t.first_audio),
        "tokens": t.tokens,
        "audio_s": round(end.audio_seconds, 3),
        "token_rate": round((t.tokens - 1) / (t.last_token - t.first_token), 2) if t.tokens > 1 else None,
        "decode_s": round(sum(b.decoded - b.decode_started for b in t.blocks), 4),
    }
    record["audio_rtf"] = round(record["decode_s"] / end.audio_seconds, 4) if end.audio_seconds else None
    # the web player: starts `lead` after the first chunk; a chunk later than its slot is an underrun
    underruns, slack, first_late = 0, float("inf"), None
    if chunks:
        start = chunks[0].elapsed + lead
        for chunk in chunks:
            due = start + chunk.start_sample / OUTPUT_SAMPLE_RATE
            slack = min(slack, due - chunk.elapsed)
            if chunk.elapsed > due:
                underruns += 1
                first_late = (
                    first_late
                    if first_late is not None
                    else (chunk.block_index, chunk.start_sample / OUTPUT_SAMPLE_RATE)
                )
                start += chunk.elapsed - due  # the player restarts from now (lead aside)
    record["underruns"] = underruns
    record["first_underrun"] = first_late
    record["blocks"] = [b.codes for b in t.blocks if b.index is not None]
    record["min_slack_s"] = round(slack, 4) if chunks else None
    return record


def _gap(a, b):
    return None if a is None or b is None else round(b - a, 4)


async def run_turn(chat: VoiceChat, question, options: GenerationOptions, lead: float) -> dict:
    session = chat.new_session()
    events = [event async for event in chat.run_turn(session, UserSpeech(question), options)]
    return turn_record(events, lead)


async def run_together(chat, question, count: int, max_new_tokens: int, lead: float, seed0: int) -> list[dict]:
    options = [GenerationOptions(max_new_tokens=max_new_tokens, seed=seed0 + i) for i in range(count)]
    return list(await asyncio.gather(*(run_turn(chat, question, o, lead) for o in options)))


def summarize(records: list[dict], keys=("ttfa", "load", "tokenize", "prompt", "prefill",
                                         "tokens_to_first_block", "first_block_decode")) -> dict:  # fmt: skip
    ok = [r for r in records if "failed" not in r]
    out = {"turns": len(records), "failed": len(records) - len(ok)}
    for key in keys:
        out[key] = median(r.get(key) for r in ok)
    if ok:
        ttfas = sorted(r["ttfa"] for r in ok if r.get("ttfa") is not None)
        if ttfas:
            out["ttfa_p90"] = round(ttfas[min(len(ttfas) - 1, int(0.9 * len(ttfas)))], 4)
            out["ttfa_max"] = round(ttfas[-1], 4)
    return out


# --- the bench ------------------------------------------------------------------------------------------


class E2EBench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.run_results = BenchRun(args.out, args.budget_s)
        self.results = self.run_results.results
        self.section = self.run_results.record
        self.left_s = self.run_results.left_s
        self.started = self.run_results.started
        self.tmp = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
        self.lead = PLAYER_LEAD_S  # the web player's first-frame lead (its jitter buffer)
        self.server: subprocess.Popen | None = None
        self.url = ""

    # --- set-up ------------------------------------------------------------------------------------
    def machine(self) -> dict:
        return machine_info(self.device, config=self.args.config, player_start_lead_s=self.lead)

    def start_server(self) -> None:
        tokenizer_dir = self.tmp / "text-tokenizer"
        write_tiny_text_tokenizer(tokenizer_dir)
        self.tokenizer_dir = tokenizer_dir
        if self.args.token_server_url:  # e.g. Ray Serve's ingress (bench/ray_e2e.py --serve-only)
            self.url = self.args.token_server_url.rstrip("/")
            return
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable, str(ROOT / "bench" / "e2e_server.py"), "--port", str(port),
            "--tokenizer-dir", str(tokenizer_dir), "--config", self.args.config, "--device", self.args.device,
            "--dtype", self.args.llm_dtype, "--max-streams", str(max(self.args.levels)),
            "--max-seq-len", str(self.args.max_seq_len),
        ] + ([] if self.args.reference else ["--no-reference"])  # fmt: skip
        log_path = Path(self.args.server_log or self.tmp / "server.log")
        log(f"starting the token server: {' '.join(command)} (log: {log_path})")
        self.server_log = open(log_path, "w")
        self.server = subprocess.Popen(command, stdout=self.server_log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_server(self) -> dict:
        started = time.perf_counter()
        with TokenClient(self.url) as client:
            deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
            while True:
                if self.server is not None and self.server.poll() is not None:
                    raise RuntimeError(f"the token server exited with {self.server.returncode}; see its log")
                try:
                    health = client.wait_until_ready(timeout=5)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
        log(f"token server ready after {time.perf_counter() - started:.1f} s more")
        return health

    def build_speech_tokenizer(self):
        sys.path.insert(0, str(ROOT))
        from bench.speech_tokenizer import build

        started = time.perf_counter()
        tokenizer = build("full" if self.args.config == "published" else "tiny", self.device)
        log(f"speech tokenizer ({self.args.config}) in {time.perf_counter() - started:.1f} s")
        return tokenizer

    def build_decoders(self) -> tuple[AudioDecoder, AudioDecoder | None]:
        sizes = (
            PUBLISHED_DECODER_SIZES
            if self.args.config == "published"
            else replace(TINY_DECODER_SIZES, vocab_size=16384)
        )
        folder = self.tmp / "decoder"
        write_random_decoder(folder, sizes, seed=0)
        files = (folder / "config.yaml", folder / "flow.pt", folder / "hift.pt")
        # CUDA graphs for the batches the largest level can make (as many blocks as conversations), as
        # web_demo.py --max-concurrent-turns sizes them
        batches = graph_batch_sizes_for(max(self.args.levels))
        ours = AudioDecoder(*files, self.device, dtype=torch.bfloat16 if self.cuda else torch.float32,
                            graph_batch_sizes=batches)  # fmt: skip
        reference = None
        if self.args.reference:
            reference = AudioDecoder(*files, self.device, dtype=torch.float32, prompt_window=None, cuda_graphs=False,
                                     seam_crossfade=False)  # fmt: skip
        return ours, reference

    # --- sections ----------------------------------------------------------------------------------
    def first_block(self, decoder: AudioDecoder) -> dict:
        """The first 10-token block of a new stream: total, and the vocoder's share."""
        codes = [(37 * k) % decoder.num_codes for k in range(LOW_LATENCY_BLOCK_SIZES[0])]
        vocoder_times = []
        inner = decoder.synthesizer.vocode  # the vocoder stage (a CUDA graph replay for first blocks)

        def timed(*a, **k):
            out, seconds = time_call(lambda: inner(*a, **k), self.device)
            vocoder_times.append(seconds)
            return out

        totals = []
        decoder.synthesizer.vocode = timed
        try:
            for i in range(3 + self.args.repeats):
                stream = decoder.stream(seed=i)
                pcm, seconds = time_call(lambda: stream.feed(codes), self.device)
                totals.append(seconds)
                stream.close()
                assert pcm.size, "the first block gave no audio"
        finally:
            del decoder.synthesizer.vocode
        totals, vocoder_times = totals[3:], vocoder_times[3:]
        return {
            "tokens": len(codes),
            "total_s": median(totals),
            "vocoder_s": median(vocoder_times),
            "flow_s": round(median(totals) - median(vocoder_times), 4),
            "audio_s": round(pcm.size / OUTPUT_SAMPLE_RATE, 3),
        }

    def first_block_beside_generation(self, decoder: AudioDecoder) -> dict:
        """The first block again while the token server generates one answer (GPU shared by two processes)."""
        import threading

        stop = threading.Event()
        tokens = []

        def generate():
            with TokenClient(self.url) as client:
                for token in client.stream(prompt_token_ids=[1, 2, 3] * 40, max_new_tokens=800, seed=1):
                    tokens.append(token)
                    if stop.is_set():
                        break

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while len(tokens) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            return {**self.first_block(decoder), "tokens_streamed_meanwhile": len(tokens)}
        finally:
            stop.set()
            thread.join(30)

    async def run_async(self, chat: VoiceChat, reference: VoiceChat | None) -> None:
        args = self.args
        question = QUESTION
        lead = self.lead
        short = answer_length(LOW_LATENCY_BLOCK_SIZES[0] + LOW_LATENCY_BLOCK_SIZES[1])
        long = answer_length(int(args.answer_seconds * SPEECH_TOKEN_RATE))
        log(f"answers: short {short} tokens, long {long} tokens ({args.answer_seconds:g} s of audio)")

        # warm-up: the pipeline once, then a batch at the largest level for the server's graphs
        for i in range(2):
            record = await run_turn(chat, question, GenerationOptions(max_new_tokens=short, seed=900 + i), lead)
            log(f"  warm-up turn: {record}")
        await run_together(chat, question, min(8, max(args.levels)), short, lead, 950)

        # single user
        records = []
        for i in range(args.repeats):
            records.append(await run_turn(chat, question, GenerationOptions(max_new_tokens=short, seed=i), lead))
        self.section("ttfa", {**summarize(records), "turns_detail": records})

        async with httpx.AsyncClient(base_url=self.url) as control:
            toggled = await control.post("/bench/prefill_graphs", json={"on": False})
            if toggled.status_code == 200 and toggled.json().get("lengths"):
                records = []
                for i in range(max(3, args.repeats // 2)):
                    options = GenerationOptions(max_new_tokens=short, seed=100 + i)
                    records.append(await run_turn(chat, question, options, lead))
                self.section("ttfa_prefill_eager", summarize(records))
            await control.post("/bench/prefill_graphs", json={"on": True})

        record = await run_turn(chat, question, GenerationOptions(max_new_tokens=long, seed=7), lead)
        self.section("answer_long", record)

        # concurrency: every level, stop after two levels in a row that are not real time
        levels, misses = [], 0
        for count in args.levels:
            if self.left_s() < 60 + args.answer_seconds:
                log(f"skipping level {count}: {self.left_s():.0f} s of budget left")
                break
            calls0, jobs0 = chat.blocks.calls, chat.blocks.jobs
            t0 = time.perf_counter()
            records = await run_together(chat, question, count, long, lead, 1000 * count)
            level = self._level(count, records, time.perf_counter() - t0, chat, calls0, jobs0)
            levels.append(level)
            self.section(f"concurrency_{count}", level)
            misses = 0 if level["all_real_time"] else misses + 1
            if misses >= 2:
                break
        real_time = [lv["conversations"] for lv in levels if lv["all_real_time"]]
        self.section("concurrency", {"levels": [lv["conversations"] for lv in levels],
                                     "max_all_real_time": max(real_time, default=0)})  # fmt: skip

        # the same level with one block at a time (no cross-session batching)
        if args.unbatched_level and self.left_s() > 90 + args.answer_seconds:
            unbatched = VoiceChat(chat.text_tokenizer, chat.speech_tokenizer, chat.decoder, chat.client,
                                  replace(chat.config, decode_batch=1))  # fmt: skip
            try:
                t0 = time.perf_counter()
                records = await run_together(unbatched, question, args.unbatched_level, long, lead, 77000)
                level = self._level(args.unbatched_level, records, time.perf_counter() - t0, unbatched, 0, 0)
                self.section(f"concurrency_{args.unbatched_level}_unbatched", level)
            finally:
                unbatched.close()

        # the reference-style pipeline
        if reference is not None and self.left_s() > 60:
            ref_short = answer_length(ORIGINAL_BLOCK_SIZES[0]) + 2
            records = []
            warm = await run_turn(reference, question, GenerationOptions(max_new_tokens=ref_short, seed=500), lead)
            log(f"  reference warm-up turn: {warm}")
            for i in range(args.reference_turns):
                options = GenerationOptions(max_new_tokens=ref_short, seed=600 + i)
                records.append(await run_turn(reference, question, options, lead))
            ours = self.results["ttfa"]["ttfa"]
            ref = summarize(records)
            ref["ratio_to_ours"] = round(ref["ttfa"] / ours, 2) if ref.get("ttfa") and ours else None
            ref["turns_detail"] = records
            self.section("reference", ref)

    def _level(self, count: int, records: list[dict], wall: float, chat: VoiceChat, calls0: int, jobs0: int) -> dict:
        ok = [r for r in records if "failed" not in r]
        calls, jobs = chat.blocks.calls - calls0, chat.blocks.jobs - jobs0
        return {
            "conversations": count,
            "wall_s": round(wall, 2),
            "failed": len(records) - len(ok),
            "failures": sorted({r["failed"] for r in records if "failed" in r})[:3],
            "with_underrun": sum(1 for r in ok if r["underruns"]),
            "first_underruns": sorted(r["first_underrun"] for r in ok if r["first_underrun"])[:6],
            "blocks_example": ok[0]["blocks"][:8] if ok else None,
            "all_real_time": len(ok) == count and not any(r["underruns"] for r in ok),
            "min_slack_s": min((r["min_slack_s"] for r in ok if r["min_slack_s"] is not None), default=None),
            "ttfa_p50": median(r["ttfa"] for r in ok),
            "ttfa_max": max((r["ttfa"] for r in ok), default=None),
            "token_rate_p50": median(r["token_rate"] for r in ok),
            "token_rate_min": min((r["token_rate"] for r in ok if r["token_rate"]), default=None),
            "audio_rtf_p50": median(r["audio_rtf"] for r in ok),
            "mean_decode_batch": round(jobs / calls, 2) if calls else None,
        }

    def run(self) -> int:
        args = self.args
        self.section("machine", self.machine())
        try:
            self.start_server()
            speech_tokenizer = self.build_speech_tokenizer()
            ours, reference_decoder = self.build_decoders()
            batches = ours.graph_batch_sizes if self.cuda else (1,)
            first_sizes = (LOW_LATENCY_BLOCK_SIZES[0], AUDIO_TOKENS_PER_SEGMENT)  # quick start, or the whole first run
            warm = ours.warm_up(LOW_LATENCY_BLOCK_SIZES, batches, first_block_sizes=first_sizes)
            log(f"decoder graphs warmed up in {warm:.1f} s")
            self.section("first_block", self.first_block(ours))
            question = load_audio(QUESTION)
            self.section("question", {"seconds": round(question.duration, 2),
                                      "speech_tokens": len(speech_tokenizer.tokenize(question))})  # fmt: skip
            health = self.wait_server()
            self.section("server", {k: health.get(k) for k in ("device", "dtype", "max_concurrent_streams")})
            self.section("first_block_while_generating", self.first_block_beside_generation(ours))
            text_tokenizer = GLMTokenizer.from_pretrained(self.tokenizer_dir)
            return asyncio.run(self._chats(text_tokenizer, speech_tokenizer, ours, reference_decoder))
        finally:
            self.memory()
            if self.server is not None:
                self.server.terminate()
                try:
                    self.server.wait(30)
                except subprocess.TimeoutExpired:
                    self.server.kill()
            log(f"total {time.monotonic() - self.started:.0f} s")

    async def _chats(self, text_tokenizer, speech_tokenizer, ours, reference_decoder) -> int:
        max_level = max(self.args.levels)
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(AsyncTokenClient(self.url, max_connections=2 * max_level + 8))
            chat = VoiceChat(text_tokenizer, speech_tokenizer, ours, client, PipelineConfig())
            stack.callback(chat.close)
            reference = None
            if reference_decoder is not None:
                reference_client = await stack.enter_async_context(AsyncTokenClient(self.url + "/reference"))
                reference = VoiceChat(text_tokenizer, speech_tokenizer, reference_decoder, reference_client,
                                      PipelineConfig(block_sizes=ORIGINAL_BLOCK_SIZES, decode_batch=1, adaptive_blocks=False))  # fmt: skip
                stack.callback(reference.close)
            await self.run_async(chat, reference)
        return 0

    def memory(self) -> None:
        if not self.cuda:
            return
        info = {"bench_process_peak_gb": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
            used = [int(line.split(",")[1].split()[0]) for line in info["nvidia_smi"] if line.count(",") == 1]
            info["both_processes_gb"] = round(sum(used) * 2**20 / 1e9, 2)  # the whole demo at these levels
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
            info["nvidia_smi"] = str(error)
        info |= {"llm_dtype": self.args.llm_dtype, "levels": self.args.levels, "max_seq_len": self.args.max_seq_len}
        self.section("memory", info)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--config", choices=("published", "small"), default="published",
                        help="model shapes: published (GPU) or small (CPU dry run)")  # fmt: skip
    parser.add_argument("--llm-dtype", default=None, choices=llm_dtypes(),
                        help="the token server's --dtype (default: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    parser.add_argument("--max-seq-len", type=int, default=1024, help="the token server's KV cache length per stream")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the reference-style pipeline (implied by a quantized --llm-dtype)")  # fmt: skip
    parser.add_argument("--levels", default="1,8,16,32,48,64", help="concurrent conversations to try")
    parser.add_argument("--answer-seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=10, help="single-user TTFA turns")
    parser.add_argument("--reference-turns", type=int, default=3)
    parser.add_argument("--unbatched-level", type=int, default=32, help="0: skip the no-batching comparison")
    parser.add_argument("--budget-s", type=float, default=560, help="skip sections that would not fit")
    parser.add_argument("--quick", action="store_true", help="CPU dry run: short answers, few levels")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--server-log", help="the token server's log file (default: in a temp folder)")
    parser.add_argument("--token-server-url", help="a running token server with forced answers instead of "
                        "bench/e2e_server.py (e.g. bench/ray_e2e.py --serve-only: Ray Serve's ingress)")  # fmt: skip
    args = parser.parse_args()
    args.levels = sorted({int(n) for n in args.levels.split(",")})
    if args.llm_dtype is None:
        args.llm_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.llm_dtype in QUANTIZED_DTYPES and args.reference:
        args.reference = False  # transformers' GLM (the reference server) runs float weights only
    if args.token_server_url:
        args.reference = False  # served by bench/e2e_server.py only
    if args.quick:
        args.answer_seconds, args.repeats, args.reference_turns = min(args.answer_seconds, 4.0), 2, 1
        args.levels, args.unbatched_level = [1, 2], 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return E2EBench(args).run()


if __name__ == "__main__":
    sys.exit(main())
