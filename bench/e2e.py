"""End to end: time to first audio (TTFA) of a spoken turn, audio real-time factor, and how many
conversations stay real time at once, on one GPU, with full-size random weights.

    python bench/e2e.py --out e2e.json                         # GPU machine (the default sections)
    python bench/e2e.py --sections layouts,turns --out a.json  # chosen sections (each call <= 10 min)
    python bench/e2e.py --device cpu --config small --quick    # dry run of the script on a CPU

What runs, as in production: the token side in the chosen layout (``--layout``, bench/e2e_tokens.py):
``two-process``, ``bench/e2e_server.py`` in a child process (``model_server.py``'s app around the
engine with the published GLM-4-Voice-9B shape, bf16, CUDA graphs), reached over HTTP; or
``one-process`` (default), the same engine and app in this process, reached by the in-process client
(``web_demo.py --in-process-engine``'s layout: one CUDA context, the speech side on the highest-priority
CUDA stream). The answers' ids are forced into the 13 text / 26 audio interleave of a real
conversation (see bench/e2e_server.py). In this process, what ``web_demo.py`` loads: the speech
tokenizer (published shape), the speech decoder (published shape, bf16 estimator, CUDA graphs,
bounded prompt window) and :class:`glm4voice.pipeline.VoiceChat`, fed the 5 s spoken question
``bench/data/question_5s.wav`` (espeak-ng, ``bench/data/make_question.sh``). Every spoken turn gets
its own variant of the recording (shifted by a few ms), so prompts differ as different users' do
and the engine's prefix cache reuses only what real conversations share (the system prompt, a
conversation's own history); sections report the prefix tokens reused.

Sections (``--sections``, each printed and written to ``--out`` as it finishes; default: the first six):

- ``first_block``: the decoder's first 10-token block alone: flow (encoder + 10-step ODE) and vocoder;
  and again while the token side generates (``first_block_while_generating``);
- ``ttfa``: single user, a new conversation per turn: TTFA from the end of the user's speech (the
  turn starts with the whole recording) to the first PCM of the answer, broken down into loading,
  speech tokenizer, prefill (request sent -> first token), tokens until the first block is complete
  (13 text + 10 audio), first block decode; also with the prefill CUDA graphs off;
- ``answer_long``: one 30 s answer: audio RTF (decoder time / audio time), token rate, underruns;
- ``concurrency``: N conversations started together (``--levels``), each a 30 s answer, each level
  ``--all-at-once-runs`` times in a row; a conversation stays real time if a player that starts
  ``PLAYER_LEAD_S`` (glm4voice/defaults.py: the page's player) after the first chunk never runs dry;
- ``unbatched``: one level with cross-session block batching off;
- ``reference``: the reference-style pipeline measured in the same run (two-process token server's
  ``/reference``): transformers ``generate()`` with a streamer thread (batch 1), the original block
  schedule (25, 50, 100, 150, 200), float32 eager decoder with the unbounded prompt, no seam
  cross-fade; TTFA and the ratio to ours (``--no-reference``: skipped; always with a quantized
  ``--llm-dtype``, whose weights transformers cannot run);
- ``layouts``: both layouts in the same run, one after the other (the child server is stopped
  before the in-process engine is built): single-user TTFA p50/p95 (``--layout-turns`` turns each)
  and the first block while the token side generates;
- ``turns``: the 5th turn of spoken conversations whose history is >= ``--history-tokens`` (answers
  long enough to get there) against their 1st turn: TTFA p50 of each, and the engine's prefix reuse;
- ``poisson``: realistic load (bench/e2e_load.py): conversations arrive as a Poisson process at each
  rate of ``--poisson-rates`` (per second), with think time between turns, several turns each, spoken
  and typed; per rate TTFA p50/p95/p99, underruns, token rate and mean concurrent conversations; the
  capacity is the highest rate with TTFA p95 <= 500 ms and no underrun, as concurrent conversations.

Always, at the end of each layout's part: ``memory`` (``memory_<layout>`` for the other layout): GPU
memory of the processes (nvidia-smi) and their sum: the whole demo's footprint (the engine's KV cache
is sized by its slots, ``--max-streams`` or the largest level, and ``--max-seq-len``; the decoder's
CUDA graphs cover batches up to as many).

Quantized LLM weights (``--llm-dtype fp8`` / ``int4`` / ``int8``, glm4voice.llm.quant) run the same way;
their TTFA sits beside bf16's when both runs are made on the same machine::

    python bench/e2e.py --llm-dtype bfloat16 --levels 1,8 --no-reference --unbatched-level 0 --out e2e_bf16.json
    python bench/e2e.py --llm-dtype fp8 --levels 1,8 --unbatched-level 0 --out e2e_fp8.json
    python bench/e2e.py --llm-dtype int4 --levels 4 --max-seq-len 8192 --unbatched-level 0 --out e2e_int4_4.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import BenchRun, log, machine_info, median, time_call
from bench.e2e_load import (
    TYPED_QUESTIONS,
    LoadShape,
    capacity,
    percentile,
    plan_load,
    rate_figures,
)
from bench.e2e_server import answer_length
from bench.e2e_tokens import (
    LAYOUTS,
    ONE_PROCESS,
    TWO_PROCESS,
    ChildTokenServer,
    ExternalTokenServer,
    InProcessTokens,
)
from bench.e2e_trace import gpu_timeline, loop_lags
from flow_inference import AudioDecoder
from glm4voice.audio import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, SPEECH_TOKEN_RATE, Audio, load_audio
from glm4voice.checkpoints.decoder import PUBLISHED_DECODER_SIZES, TINY_DECODER_SIZES, write_random_decoder
from glm4voice.checkpoints.text import write_tiny_text_tokenizer
from glm4voice.client import AsyncTokenClient
from glm4voice.decoder.options import graph_batch_sizes_for
from glm4voice.defaults import PLAYER_LEAD_S
from glm4voice.devices import default_device, llm_dtypes, prefer_expandable_segments
from glm4voice.llm.quant import QUANTIZED_DTYPES, method_for
from glm4voice.memory import MemoryOwners, memory_report
from glm4voice.pipeline import (
    AssistantAudio,
    BlockTiming,
    GenerationOptions,
    InputAccepted,
    PipelineConfig,
    TurnFailed,
    TurnFinished,
    UserSpeech,
    UserText,
    VoiceChat,
)
from glm4voice.protocol import AUDIO_TOKENS_PER_SEGMENT, LOW_LATENCY_BLOCK_SIZES, ORIGINAL_BLOCK_SIZES
from glm4voice.text_tokenizer import GLMTokenizer

logger = logging.getLogger("bench.e2e")

QUESTION = ROOT / "bench" / "data" / "question_5s.wav"
SECTIONS = ("first_block", "ttfa", "answer_long", "concurrency", "unbatched", "reference", "layouts", "turns",
            "poisson")  # fmt: skip
DEFAULT_SECTIONS = SECTIONS[:6]
SHORT_SEQ_LEN = 1024
"""The engine's positions per stream by default: one question and a 30 s answer fit."""
LONG_SEQ_LEN = 4096
"""... for the turns and poisson sections: a conversation's history grows by every turn."""
TURNS_PER_CONVERSATION = 5
"""The ``turns`` section compares the 5th turn of a conversation with its 1st."""
BLOCK_PATH_BLOCKS = 4
"""A turn's record keeps the path of this many first blocks (``block_path``: where a gap came from)."""


def question_variant(question: Audio, variant: int) -> Audio:
    """The question recording shifted earlier by ``variant`` mod one speech token's samples (1280 at
    16 kHz), padded with silence to the same length: the speech tokenizer sees other frames, so the
    codes (and the prompt) differ from other variants' while the question stays the same length."""
    samples_per_token = int(INPUT_SAMPLE_RATE / SPEECH_TOKEN_RATE)
    shift = (variant * 37) % samples_per_token
    samples = np.concatenate([question.samples[shift:], np.zeros(shift, dtype=question.samples.dtype)])
    return Audio(samples, question.sample_rate)


# --- one turn's figures ---------------------------------------------------------------------------------


def turn_record(events: list, lead: float) -> dict:
    """TTFA breakdown, audio RTF and playback underruns of one turn from its events (seconds from the
    turn's start; ``playback_end_s``: when a player that started ``lead`` after the first chunk, and
    restarted after each underrun, has played the whole answer)."""
    end = events[-1]
    accepted = next((e for e in events if isinstance(e, InputAccepted)), None)
    if isinstance(end, TurnFailed):
        return {"failed": f"{end.kind.value}: {end.message}", "elapsed": end.elapsed}
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
        "prompt_tokens": accepted.prompt_tokens if accepted is not None else None,
        "tokens": t.tokens,
        "audio_s": round(end.audio_seconds, 3),
        "token_rate": round((t.tokens - 1) / (t.last_token - t.first_token), 2) if t.tokens > 1 else None,
        "decode_s": round(sum(b.decoded - b.decode_started for b in t.blocks), 4),
        "elapsed": end.elapsed,
    }
    record["audio_rtf"] = round(record["decode_s"] / end.audio_seconds, 4) if end.audio_seconds else None
    # the web player: starts `lead` after the first chunk; a chunk later than its slot is an underrun
    underruns, slack, first_late = 0, float("inf"), None
    start = None
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
    first = next((b for b in t.blocks if b.index == 0), None)
    # the first block's time between being cut and reaching the listener: held back from the decoder by
    # the turn's pacing (PipelineConfig.decode_held_first_block off), then waiting for and running its
    # decoder call, then its audio kept back until later blocks are decoded (a held first block, or a
    # covered start)
    record["first_block_held"] = _gap(first.ready, first.decode_started) if first else None
    record["first_block_call"] = _gap(first.decode_started, first.decoded) if first else None
    record["first_audio_kept"] = _gap(first.decoded, _sent(first)) if first else None
    # the listener started with the next block too (the pacing held the first one back)
    second = next((b for b in t.blocks if b.index == 1), None)
    record["first_block_with_next"] = bool(first and second and _sent(second) == _sent(first))
    record["underruns"] = underruns
    record["first_underrun"] = first_late
    record["blocks"] = [b.codes for b in t.blocks if b.index is not None]
    record["urgent_blocks"] = sum(1 for b in t.blocks if b.urgent)  # later blocks sent with the first ones
    # the first blocks' path (seconds from the turn's start): cut, handed to the decoder, decoded, sent
    record["block_path"] = [
        [b.index, round(b.ready, 4), round(b.decode_started, 4), round(b.decoded, 4), round(_sent(b), 4)]
        for b in t.blocks
        if b.index is not None and b.index < BLOCK_PATH_BLOCKS
    ]
    # every block: [index, audio tokens, handed to the decoder, decoded] (what the decoder did, turn by turn)
    record["blocks_decoded"] = [
        [b.index, b.codes, round(b.decode_started, 4), round(b.decoded, 4)] for b in t.blocks if b.index is not None
    ]
    record["min_slack_s"] = round(slack, 4) if chunks else None
    record["playback_end_s"] = round(start + end.audio_seconds, 4) if start is not None else end.elapsed
    return record


def _sent(block: BlockTiming) -> float:
    """When a block's audio went to the listener."""
    return block.decoded if block.sent is None else block.sent


def time_on(fn: Callable[[], object], stream) -> tuple[object, float]:
    """``fn()`` and its wall time, the work queued on ``stream`` included on both ends (None: a CPU)."""
    if stream is None:
        return time_call(fn, "cpu")
    stream.synchronize()
    started = time.perf_counter()
    result = fn()
    stream.synchronize()
    return result, time.perf_counter() - started


def _gap(a, b):
    return None if a is None or b is None else round(b - a, 4)


async def run_turn(chat: VoiceChat, question, options: GenerationOptions, lead: float, session=None) -> dict:
    session = chat.new_session() if session is None else session
    request = question if isinstance(question, (UserSpeech, UserText)) else UserSpeech(question)
    events = [event async for event in chat.run_turn(session, request, options)]
    return turn_record(events, lead)


def summarize(records: list[dict], keys=("ttfa", "load", "tokenize", "prompt", "prefill",
                                         "tokens_to_first_block", "first_block_decode")) -> dict:  # fmt: skip
    ok = [r for r in records if "failed" not in r]
    out = {"turns": len(records), "failed": len(records) - len(ok)}
    out["urgent_blocks"] = sum(r.get("urgent_blocks", 0) for r in ok)  # later blocks sent with the first ones
    if len(ok) < len(records):
        out["failures"] = sorted({r["failed"] for r in records if "failed" in r})[:3]
    for key in keys:
        out[key] = median(r.get(key) for r in ok)
    ttfas = [r["ttfa"] for r in ok if r.get("ttfa") is not None]
    if ttfas:
        out |= {f"ttfa_p{q}": percentile(ttfas, q) for q in (50, 90, 95, 99)}
        out["ttfa_max"] = percentile(ttfas, 100)
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
        self.section_async = self.run_results.section_async
        self.left_s = self.run_results.left_s
        self.started = self.run_results.started
        self.tmp = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
        self.lead = PLAYER_LEAD_S  # the web player's first-frame lead (its jitter buffer)
        self.sections = args.sections
        self.layout_results: dict[str, dict] = {}
        self.reference_result: dict | None = None
        self.question: Audio | None = None
        self.child: ChildTokenServer | None = None
        self.variants = iter(range(1, 10**9))

    # --- set-up ------------------------------------------------------------------------------------
    def machine(self) -> dict:
        return machine_info(self.device, config=self.args.config, player_start_lead_s=self.lead,
                            layout=self.args.layout, sections=list(self.sections), llm_device=self.args.llm_device,
                            llm_dtype=self.args.llm_dtype, llm_quant_method=self.args.llm_quant_method,
                            max_seq_len=self.args.max_seq_len,
                            mixed_decoder_batches=self.args.mixed_decoder_batches,
                            later_block_graphs=self.args.later_block_graphs, pipeline=self.args.pipeline)  # fmt: skip

    def build_speech_tokenizer(self):
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
        # CUDA graphs for the batches as many conversations as the engine's slots can make (as many blocks
        # as conversations), as web_demo.py --max-concurrent-turns sizes them
        batches = graph_batch_sizes_for(self.max_streams)
        ours = AudioDecoder(*files, self.device, dtype=torch.bfloat16 if self.cuda else torch.float32,
                            graph_batch_sizes=batches, mixed_batches=self.args.mixed_decoder_batches,
                            graph_later_blocks=self.args.later_block_graphs and self.cuda)  # fmt: skip
        reference = None
        if self.wants_reference:
            reference = AudioDecoder(*files, self.device, dtype=torch.float32, prompt_window=None, cuda_graphs=False,
                                     seam_crossfade=False)  # fmt: skip
        return ours, reference

    @property
    def batched(self) -> bool:
        """Sections with many conversations at once (the decoder's and the engine's large batches)."""
        return bool({"concurrency", "unbatched", "poisson"} & set(self.sections))

    def decoder_batches(self, decoder: AudioDecoder) -> tuple[int, ...]:
        """The batch sizes whose decoder graphs are captured before measuring: every graphed size for
        the many-conversation sections, else batch 1 (captures take ~2 s each at the published size;
        single-user sections decode one block at a time)."""
        if not self.cuda:
            return (1,)
        return tuple(decoder.graph_batch_sizes) if self.batched else (1,)

    def spoken(self) -> UserSpeech:
        """The next variant of the spoken question (see :func:`question_variant`)."""
        return UserSpeech(question_variant(self.question, next(self.variants)))

    def phases(self) -> list[str]:
        """The layouts this run needs, in the order they run (two-process first: its child process and
        its GPU memory are gone before the in-process engine is built)."""
        needed = {self.args.layout} if set(self.sections) - {"first_block", "layouts", "reference"} else set()
        if "first_block" in self.sections:
            needed.add(self.args.layout)
        if "layouts" in self.sections:
            needed |= set(LAYOUTS)
        if self.wants_reference:
            needed.add(TWO_PROCESS)
        return [layout for layout in LAYOUTS if layout in needed]

    @property
    def max_streams(self) -> int:
        """The engine's stream slots: ``--max-streams``, else the largest level."""
        return self.args.max_streams or max(self.args.levels)

    @property
    def wants_reference(self) -> bool:
        return "reference" in self.sections and self.args.reference

    def token_side(self, layout: str):
        if self.args.token_server_url:
            return ExternalTokenServer(self.args.token_server_url)
        if layout == TWO_PROCESS:
            if self.child is None:
                log_path = Path(self.args.server_log or self.tmp / "server.log")
                self.child = ChildTokenServer(self.args, self.tokenizer_dir, log_path, self.max_streams)
            return self.child
        return InProcessTokens(self.args, self.tokenizer_dir, self.max_streams)

    # --- sections ----------------------------------------------------------------------------------
    def first_block(self, decoder: AudioDecoder) -> dict:
        """The first 10-token block of a new stream: total, and the vocoder's share."""
        codes = [(37 * k) % decoder.num_codes for k in range(LOW_LATENCY_BLOCK_SIZES[0])]
        vocoder_times = []
        inner = decoder.synthesizer.vocode  # the vocoder stage (a CUDA graph replay for first blocks)
        # waits for the decoder's own stream only: a device-wide sync would also wait for the LLM's
        # steps when the engine runs in this process
        stream_of_decoder = decoder.cuda_stream

        def timed(*a, **k):
            out, seconds = time_on(lambda: inner(*a, **k), stream_of_decoder)
            vocoder_times.append(seconds)
            return out

        totals = []
        decoder.synthesizer.vocode = timed
        try:
            for i in range(3 + self.args.repeats):
                stream = decoder.stream(seed=i)
                pcm, seconds = time_on(lambda: stream.feed(codes), stream_of_decoder)
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
            "stream_priority": decoder.cuda_stream.priority if decoder.cuda_stream is not None else None,
        }

    async def first_block_beside_generation(self, decoder: AudioDecoder, client) -> dict:
        """The first block again while the token side generates one answer (two processes time-slice
        the GPU; one process runs the decoder on its high-priority stream)."""
        tokens = []
        enough = asyncio.Event()

        async def generate():
            async with aclosing(client.stream(prompt_token_ids=[1, 2, 3] * 40, max_new_tokens=800, seed=1)) as stream:
                async for _ in stream:
                    tokens.append(1)
                    if len(tokens) >= 20:
                        enough.set()

        task = asyncio.create_task(generate())
        try:
            await asyncio.wait_for(enough.wait(), 120)
            # in a worker thread: the event loop keeps taking the engine's tokens meanwhile
            result = await asyncio.to_thread(self.first_block, decoder)
            return {**result, "tokens_streamed_meanwhile": len(tokens)}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def single_user(self, chat: VoiceChat, turns: int, seed0: int, tokens=None) -> dict:
        """``turns`` single-user turns, each a new conversation with its own question variant."""
        short = answer_length(LOW_LATENCY_BLOCK_SIZES[0] + LOW_LATENCY_BLOCK_SIZES[1])
        before = await tokens.engine_stats() if tokens is not None else None
        records = [
            await run_turn(chat, self.spoken(), GenerationOptions(max_new_tokens=short, seed=seed0 + i), self.lead)
            for i in range(turns)
        ]
        out = {**summarize(records), "turns_detail": records}
        if before is not None:
            out |= prefix_reuse(before, await tokens.engine_stats(), turns)
        return out

    async def warm_up(self, chat: VoiceChat) -> None:
        """The pipeline once, then a batch at the largest level (the engine's and decoder's batch paths)."""
        short = answer_length(LOW_LATENCY_BLOCK_SIZES[0] + LOW_LATENCY_BLOCK_SIZES[1])
        for i in range(2):
            record = await run_turn(
                chat, self.spoken(), GenerationOptions(max_new_tokens=short, seed=900 + i), self.lead
            )
            log(f"  warm-up turn: {_brief(record)}")
        if self.batched:
            await self.together(chat, min(8, max(self.args.levels)), short, 950)

    async def together(self, chat: VoiceChat, count: int, max_new_tokens: int, seed0: int) -> list[dict]:
        options = [GenerationOptions(max_new_tokens=max_new_tokens, seed=seed0 + i) for i in range(count)]
        return list(await asyncio.gather(*(run_turn(chat, self.spoken(), o, self.lead) for o in options)))

    async def layout_phase(self, layout: str, decoder: AudioDecoder, text_tokenizer, speech_tokenizer,
                           reference_decoder) -> None:  # fmt: skip
        args = self.args
        max_streams = self.max_streams
        tokens = self.token_side(layout)
        try:
            health = await tokens.start()
            self.section(f"server_{layout.replace('-', '_')}", {
                "layout": layout, **{k: health.get(k) for k in ("device", "dtype", "max_concurrent_streams")},
                "max_seq_len": args.max_seq_len})  # fmt: skip
            client = tokens.client(max_connections=2 * max_streams + 8)
            chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, client, PipelineConfig(**args.pipeline))
            try:
                await self.warm_up(chat)
                if "layouts" in self.sections:
                    await self.layout_figures(layout, chat, decoder, client, tokens)
                if layout == args.layout:
                    await self.main_sections(chat, decoder, client, tokens)
                if layout == TWO_PROCESS and self.wants_reference and reference_decoder is not None:
                    await self.reference(text_tokenizer, speech_tokenizer, reference_decoder, tokens)
            finally:
                chat.close()
                await client.aclose()
            self.memory(
                layout, speech_tokenizer.memory_owners() + decoder.memory_owners() + tokens.memory_owners()
            )  # while the token side still holds its memory
        finally:
            await tokens.stop()

    async def layout_figures(self, layout: str, chat, decoder, client, tokens) -> None:
        """This layout's part of the ``layouts`` section (recorded once both layouts have run)."""
        figures = {"layout": layout}
        try:
            figures["first_block_while_generating"] = await self.first_block_beside_generation(decoder, client)
            figures |= await self.single_user(chat, self.args.layout_turns, 3000, tokens)
        except Exception as error:
            log(traceback.format_exc())
            figures["error"] = f"{type(error).__name__}: {error}"
        figures.pop("turns_detail", None)
        self.layout_results[layout] = figures
        log(f"[layouts: {layout}] {figures}")

    async def main_sections(self, chat: VoiceChat, decoder, client, tokens) -> None:
        args = self.args
        long = answer_length(int(args.answer_seconds * SPEECH_TOKEN_RATE))
        if "first_block" in self.sections:
            await self.section_async("first_block_while_generating", lambda: self._beside(decoder, client, tokens))
        if "ttfa" in self.sections:
            await self.section_async("ttfa", lambda: self.single_user(chat, args.repeats, 0, tokens))
            for name, changes in args.variants:  # the same turns with other pipeline settings, for comparison
                variant = with_config(chat, **changes)
                try:
                    await self.section_async(f"ttfa_{name}", lambda: self.single_user(variant, args.repeats, 0, tokens))
                finally:
                    variant.close()
            await self.section_async("ttfa_prefill_eager", lambda: self.prefill_eager(chat, tokens))
        if "answer_long" in self.sections:
            await self.section_async(
                "answer_long",
                lambda: run_turn(chat, self.spoken(), GenerationOptions(max_new_tokens=long, seed=7), self.lead),
                need_s=args.answer_seconds + 10,
            )
        if "turns" in self.sections:
            await self.section_async("turns", lambda: self.turns(chat, tokens), need_s=60)
        if "concurrency" in self.sections:
            await self.concurrency(chat, long)
        if "unbatched" in self.sections and args.unbatched_level:
            await self.section_async(
                f"concurrency_{args.unbatched_level}_unbatched",
                lambda: self.unbatched(chat, long),
                need_s=90 + args.answer_seconds,
            )
        if "poisson" in self.sections:
            await self.poisson(chat, tokens)

    async def _beside(self, decoder, client, tokens) -> dict:
        return {"layout": tokens.layout, **await self.first_block_beside_generation(decoder, client)}

    async def prefill_eager(self, chat: VoiceChat, tokens) -> dict:
        if not await tokens.set_prefill_graphs(False):
            return {"skipped": "no prefill graphs (eager engine or a CPU)"}
        try:
            return summarize((await self.single_user(chat, max(3, self.args.repeats // 2), 100))["turns_detail"])
        finally:
            await tokens.set_prefill_graphs(True)

    async def concurrency(self, chat: VoiceChat, long: int) -> None:
        """Every level ``--all-at-once-runs`` times in a row; stop after two levels in a row that are not
        real time in every run."""
        args = self.args
        levels, misses = [], 0
        for count in args.levels:
            need = (1 + len(args.variants)) * args.all_at_once_runs * (args.answer_seconds + 15) + 30
            if self.left_s() < need:
                log(f"skipping level {count}: {self.left_s():.0f} s of budget left, needs ~{need:.0f} s")
                break
            level = await self.all_at_once(chat, count, long)
            for name, changes in args.variants:  # the same level with other pipeline settings, for comparison
                variant = with_config(chat, **changes)
                try:
                    self.section(f"concurrency_{count}_{name}", {"changes": changes,
                                                                 **await self.all_at_once(variant, count, long)})  # fmt: skip
                finally:
                    variant.close()
            levels.append(level)
            self.section(f"concurrency_{count}", level)
            misses = 0 if level["all_real_time"] else misses + 1
            if misses >= 2:
                break
        real_time = [lv["conversations"] for lv in levels if lv["all_real_time"]]
        self.section("concurrency", {"levels": [lv["conversations"] for lv in levels], "runs": args.all_at_once_runs,
                                     "max_all_real_time": max(real_time, default=0)})  # fmt: skip

    async def all_at_once(self, chat: VoiceChat, count: int, long: int) -> dict:
        """``count`` conversations started in the same instant, ``--all-at-once-runs`` times in a row."""
        runs = []
        for run in range(self.args.all_at_once_runs):
            calls0, jobs0, stats0 = chat.blocks.calls, chat.blocks.jobs, chat.decoder.stats.snapshot()
            t0 = time.perf_counter()
            records = await self.together(chat, count, long, 1000 * count + 100 * run)
            runs.append(self._level(count, records, time.perf_counter() - t0, chat, calls0, jobs0))
            runs[-1]["decoder"] = chat.decoder.stats.since(stats0)
            runs[-1]["decoder"]["graphs"] = graph_counts(chat.decoder)  # captures while listeners waited show here
            log(f"  {count} at once, run {run + 1}: {runs[-1]['underruns']} underruns, "
                f"{runs[-1]['with_underrun']} conversations ran dry, {runs[-1]['failed']} failed; "
                f"decoder {runs[-1]['decoder']}")  # fmt: skip
        return combine_runs(runs)

    async def unbatched(self, chat: VoiceChat, long: int) -> dict:
        unbatched = with_config(chat, decode_batch=1)
        try:
            t0 = time.perf_counter()
            records = await self.together(unbatched, self.args.unbatched_level, long, 77000)
            return self._level(self.args.unbatched_level, records, time.perf_counter() - t0, unbatched, 0, 0)
        finally:
            unbatched.close()

    async def turns(self, chat: VoiceChat, tokens) -> dict:
        """The 5th turn against the 1st of the same spoken conversations (history >= --history-tokens)."""
        args = self.args
        short = answer_length(LOW_LATENCY_BLOCK_SIZES[0] + LOW_LATENCY_BLOCK_SIZES[1])
        # answers of turns 1-4 long enough for the history to reach the target (prompts add ~75 each)
        reply = max(short, math.ceil(args.history_tokens / (TURNS_PER_CONVERSATION - 1)))
        first, fifth, histories, reuse = [], [], [], []
        for c in range(args.turn_conversations):
            if self.left_s() < 45:
                log("turns: budget left too small for another conversation")
                break
            session = chat.new_session()
            for turn in range(1, TURNS_PER_CONVERSATION + 1):
                # turns 1-4 only build the history: read at full speed, not paced for a listener
                last = turn == TURNS_PER_CONVERSATION
                options = GenerationOptions(max_new_tokens=short if last else reply, seed=5000 + 10 * c + turn,
                                            paced=last)  # fmt: skip
                history = len(session.conversation.history)
                before = await tokens.engine_stats()
                record = await run_turn(chat, self.spoken(), options, self.lead, session)
                after = await tokens.engine_stats()
                if "failed" in record:
                    raise RuntimeError(f"conversation {c}, turn {turn} failed: {record['failed']}")
                if turn == 1:
                    first.append(record)
                elif turn == TURNS_PER_CONVERSATION:
                    fifth.append(record)
                    histories.append(history)
                    reuse.append(after.get("prefix_tokens_reused", 0) - before.get("prefix_tokens_reused", 0))
        one, five = summarize(first), summarize(fifth)
        delta = None if one.get("ttfa") is None or five.get("ttfa") is None else round(five["ttfa"] - one["ttfa"], 4)
        return {
            "conversations": len(fifth),
            "reply_tokens_turns_1_to_4": reply,
            "history_tokens_at_turn_5_min": min(histories, default=None),
            "history_target": args.history_tokens,
            "history_ok": bool(histories) and min(histories) >= args.history_tokens,
            "prefix_tokens_reused_turn_5_min": min(reuse, default=None),
            "first_turn": one,
            "fifth_turn": five,
            "ttfa_p50_first_s": one.get("ttfa"),
            "ttfa_p50_fifth_s": five.get("ttfa"),
            "fifth_minus_first_p50_s": delta,
            "within_15_ms": delta is not None and abs(delta) <= 0.015,
        }

    async def poisson(self, chat: VoiceChat, tokens) -> None:
        args = self.args
        shape = LoadShape(turns=args.poisson_turns, spoken_fraction=args.poisson_spoken, think_mean_s=args.think_s,
                          answer_mean_s=args.poisson_answer_s, spoken_input_s=self.question.duration,
                          lead_s=self.lead)  # fmt: skip
        rates, misses = [], 0
        for rate in args.poisson_rates:
            need = (1 + len(args.variants)) * (args.poisson_window_s + 1.5 * shape.answer_mean_s + 15)
            if self.left_s() < need:
                log(f"poisson: skipping rate {rate}/s: {self.left_s():.0f} s of budget left, needs ~{need:.0f} s")
                break
            figures = await self.section_async(
                f"poisson_{rate:g}", lambda: self.poisson_rate(chat, tokens, shape, rate)
            )
            if "error" in figures:
                break
            for name, changes in args.variants:  # the same rate with other pipeline settings, for comparison
                variant = with_config(chat, **changes)
                try:
                    await self.section_async(
                        f"poisson_{rate:g}_{name}", lambda: self.poisson_rate(variant, tokens, shape, rate)
                    )
                finally:
                    variant.close()
            rates.append(figures)
            misses = 0 if figures["passes"] else misses + 1
            if misses >= 2:
                break
        shape_figures = {"turns": shape.turns, "spoken_fraction": shape.spoken_fraction,
                         "think_mean_s": shape.think_mean_s, "answer_mean_s": shape.answer_mean_s,
                         "lifetime_s": round(shape.lifetime_s, 1), "window_s": args.poisson_window_s}  # fmt: skip
        self.section("poisson", {**capacity(rates), "shape": shape_figures, "target_conversations": 64,
                                 "meets_target": capacity(rates)["capacity_conversations"] >= 64})  # fmt: skip

    async def poisson_rate(self, chat: VoiceChat, tokens, shape: LoadShape, rate: float) -> dict:
        args = self.args
        plans, warm_s = plan_load(rate, args.poisson_window_s, shape, seed=args.poisson_seed, warm_start=True)
        window_s = args.poisson_window_s
        log(f"  poisson {rate:g}/s: {len(plans)} conversations over {window_s:g} s, measured from {warm_s:.1f} s")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cut_ins = chat.blocks.cut_ins  # the pipeline's counts so far (a pipeline may run several rates)
        yields = chat.blocks.yields
        finishes = chat.blocks.finishes
        turns: list[dict] = []
        conversations: list[tuple[float, float]] = []
        counts = {}
        decoder_at = {}

        async def snapshot(name: str, at: float) -> None:
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            decoder_at[name] = chat.decoder.stats.snapshot()
            counts[name] = (await tokens.engine_stats()).get("tokens_generated")

        async def converse(plan) -> None:
            await asyncio.sleep(max(0.0, t0 + plan.arrival_s - loop.time()))
            session = chat.new_session()
            next_input = loop.time() - t0
            start = next_input if plan.began_s is None else plan.began_s  # (under way at time 0)
            end = start
            for turn in plan.turns:
                turn_start = next_input + turn.input_s
                if turn_start > window_s:  # no new turn after the window: the user leaves
                    break
                await asyncio.sleep(max(0.0, t0 + turn_start - loop.time()))
                if turn.spoken:
                    request = UserSpeech(question_variant(self.question, turn.variant))
                else:
                    request = UserText(TYPED_QUESTIONS[turn.variant % len(TYPED_QUESTIONS)])
                options = GenerationOptions(
                    max_new_tokens=answer_length(round(turn.answer_s * SPEECH_TOKEN_RATE)), seed=turn.seed
                )
                began = loop.time() - t0
                record = await run_turn(chat, request, options, self.lead, session)
                record.update(start_s=round(began, 4), spoken=turn.spoken)
                failed = "failed" in record  # (a failed turn ends its conversation now)
                record["playback_end_s"] = round(loop.time() - t0 if failed else began + record["playback_end_s"], 4)
                turns.append(record)
                end = record["playback_end_s"]
                if failed:
                    break
                next_input = end + turn.think_s
            conversations.append((start, end))

        # the decoder's calls and finishes, the engine's prefills (one-process layout) and the event
        # loop's late wake-ups, listed beside the slow turns (bench/e2e_trace.py)
        backend = getattr(tokens, "backend", None)
        runner = backend.engine.runner if backend is not None else None
        done = asyncio.Event()
        lags: list[list[float]] = []

        async def load() -> None:
            try:
                await asyncio.gather(snapshot("warm", warm_s), snapshot("end", window_s), *(converse(p) for p in plans))
            finally:
                done.set()

        with gpu_timeline(chat.blocks.decoder, runner, t0) as timeline:
            await asyncio.gather(load(), loop_lags(t0, done, lags))
        timeline["loop_lags"] = lags
        tokens_in_window = None
        if counts.get("warm") is not None and counts.get("end") is not None:
            tokens_in_window = counts["end"] - counts["warm"]
        figures = rate_figures(rate, turns, conversations, warm_s, window_s, tokens_in_window, timeline=timeline)
        if {"warm", "end"} <= decoder_at.keys():  # the decoder's batches in the measured window
            figures["decoder"] = decoder_at["end"].since(decoder_at["warm"])
            figures["decoder"]["busy_share"] = round(figures["decoder"]["busy_s"] / max(window_s - warm_s, 1e-9), 3)
        figures["decoder_graphs"] = graph_counts(chat.decoder)
        # this rate's blocks that cut in (PipelineConfig.first_blocks_cut_in)
        figures["first_blocks_cut_in"] = chat.blocks.cut_ins - cut_ins
        figures["later_calls_yielded"] = chat.blocks.yields - yields  # PipelineConfig.later_calls_yield
        figures["finishes_queued"] = chat.blocks.finishes - finishes  # PipelineConfig.queue_finishes
        figures["run_s"] = round(loop.time() - t0, 1)
        return figures

    async def reference(self, text_tokenizer, speech_tokenizer, reference_decoder, tokens) -> None:
        """The reference-style pipeline against the two-process server's ``/reference`` (recorded at the
        end of the run, with the ratio to our TTFA)."""
        if self.left_s() < 60:
            self.reference_result = {"skipped": f"{self.left_s():.0f} s left"}
            return
        ref_short = answer_length(ORIGINAL_BLOCK_SIZES[0]) + 2
        async with AsyncTokenClient(tokens.reference_url) as client:
            reference = VoiceChat(text_tokenizer, speech_tokenizer, reference_decoder, client,
                                  PipelineConfig(block_sizes=ORIGINAL_BLOCK_SIZES, decode_batch=1, adaptive_blocks=False))  # fmt: skip
            try:
                warm = await run_turn(reference, self.spoken(), GenerationOptions(max_new_tokens=ref_short, seed=500),
                                      self.lead)  # fmt: skip
                log(f"  reference warm-up turn: {_brief(warm)}")
                records = []
                for i in range(self.args.reference_turns):
                    options = GenerationOptions(max_new_tokens=ref_short, seed=600 + i)
                    records.append(await run_turn(reference, self.spoken(), options, self.lead))
            finally:
                reference.close()
        self.reference_result = {**summarize(records), "turns_detail": records}

    def _level(self, count: int, records: list[dict], wall: float, chat: VoiceChat, calls0: int, jobs0: int) -> dict:
        ok = [r for r in records if "failed" not in r]
        calls, jobs = chat.blocks.calls - calls0, chat.blocks.jobs - jobs0
        return {
            "conversations": count,
            "wall_s": round(wall, 2),
            "failed": len(records) - len(ok),
            "failures": sorted({r["failed"] for r in records if "failed" in r})[:3],
            "underruns": sum(r["underruns"] for r in ok),
            "with_underrun": sum(1 for r in ok if r["underruns"]),
            "first_underruns": sorted(r["first_underrun"] for r in ok if r["first_underrun"])[:6],
            "blocks_example": ok[0]["blocks"][:8] if ok else None,
            "all_real_time": len(ok) == count and not any(r["underruns"] for r in ok),
            "min_slack_s": min((r["min_slack_s"] for r in ok if r["min_slack_s"] is not None), default=None),
            "ttfa_p50": median(r["ttfa"] for r in ok),
            "ttfa_p95": percentile([r["ttfa"] for r in ok], 95),
            "ttfa_max": max((r["ttfa"] for r in ok), default=None),
            "token_rate_p50": median(r["token_rate"] for r in ok),
            "token_rate_min": min((r["token_rate"] for r in ok if r["token_rate"]), default=None),
            "audio_rtf_p50": median(r["audio_rtf"] for r in ok),
            "mean_decode_batch": round(jobs / calls, 2) if calls else None,
        }

    # --- the run -----------------------------------------------------------------------------------
    def run(self) -> int:
        self.section("machine", self.machine())
        try:
            return asyncio.run(self.main())
        finally:
            log(f"total {time.monotonic() - self.started:.0f} s")

    async def main(self) -> int:
        try:
            return await self.measure()
        finally:
            if self.child is not None:  # launched early; stopped here if a failure came first
                await self.child.stop()

    async def measure(self) -> int:
        args = self.args
        self.tokenizer_dir = self.tmp / "text-tokenizer"
        write_tiny_text_tokenizer(self.tokenizer_dir)
        text_tokenizer = GLMTokenizer.from_pretrained(self.tokenizer_dir)
        phases = self.phases()
        if phases and phases[0] == TWO_PROCESS:  # its own process: it loads while the decoder warms up here
            self.token_side(TWO_PROCESS).launch()
        speech_tokenizer = self.build_speech_tokenizer()
        ours, reference_decoder = self.build_decoders()
        batches = self.decoder_batches(ours)
        first_sizes = (LOW_LATENCY_BLOCK_SIZES[0], AUDIO_TOKENS_PER_SEGMENT)  # quick start, or the whole first run
        warm = ours.warm_up(LOW_LATENCY_BLOCK_SIZES, batches, first_block_sizes=first_sizes)
        log(f"decoder graphs warmed up in {warm:.1f} s")
        if "first_block" in self.sections:
            if self.child is not None:  # idle before the decoder is measured alone (it loads and compiles)
                await self.child.start()
            self.run_results.section("first_block", lambda: self.first_block(ours))
        self.question = load_audio(QUESTION)
        self.section("question", {"seconds": round(self.question.duration, 2),
                                  "speech_tokens": len(speech_tokenizer.tokenize(self.question))})  # fmt: skip
        for layout in phases:
            if self.left_s() < 60:
                log(f"skipping the {layout} layout: {self.left_s():.0f} s of budget left")
                continue
            try:
                await self.layout_phase(layout, ours, text_tokenizer, speech_tokenizer, reference_decoder)
            except Exception as error:
                log(traceback.format_exc())
                self.section(f"{layout.replace('-', '_')}_failed", {"error": f"{type(error).__name__}: {error}"})
        if "layouts" in self.sections:
            self.section("layouts", layouts_summary(self.layout_results))
        if self.reference_result is not None:
            ours_ttfa = (self.results.get("ttfa") or {}).get("ttfa") or self.layout_results.get(args.layout, {}).get(
                "ttfa"
            )
            ref = self.reference_result
            ref["ratio_to_ours"] = round(ref["ttfa"] / ours_ttfa, 2) if ref.get("ttfa") and ours_ttfa else None
            self.section("reference", ref)
        return 0

    def memory(self, layout: str, owners: MemoryOwners) -> None:
        """GPU memory of this layout's processes (``memory`` for ``--layout``, ``memory_<layout>`` else):
        nvidia-smi's figure for each process, and where this process's memory goes (``this_process``,
        see glm4voice.memory; the engine's parts with it in the one-process layout; the two-process
        layout's token server logs its own at startup)."""
        if not self.cuda:
            return
        info = {
            "layout": layout,
            "bench_process_peak_gb": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2),
            "this_process": memory_report(self.device, owners),
        }
        try:
            smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
            used = [int(line.split(",")[1].split()[0]) for line in info["nvidia_smi"] if line.count(",") == 1]
            info["both_processes_gb"] = round(sum(used) * 2**20 / 1e9, 2)  # the whole demo at these levels
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
            info["nvidia_smi"] = str(error)
        info |= {"llm_dtype": self.args.llm_dtype, "levels": self.args.levels, "max_seq_len": self.args.max_seq_len,
                 "max_streams": self.max_streams}  # fmt: skip
        self.section("memory" if layout == self.args.layout else f"memory_{layout.replace('-', '_')}", info)


def graph_counts(decoder: AudioDecoder) -> dict[str, int]:
    """How many CUDA graphs of each kind the decoder has captured so far."""
    return {kind: len(shapes) for kind, shapes in decoder.captured_graphs.items()}


def with_config(chat: VoiceChat, **changes) -> VoiceChat:
    """A pipeline on ``chat``'s models and client with other :class:`PipelineConfig` settings (close it)."""
    return VoiceChat(chat.text_tokenizer, chat.speech_tokenizer, chat.decoder, chat.client,
                     replace(chat.config, **changes))  # fmt: skip


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``name:field=value,field=value;name2:...`` -> [(name, {field: value})], each value converted to the
    type of the :class:`PipelineConfig` field's default."""
    defaults = PipelineConfig()
    variants = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, settings = part.partition(":")
        if not name.isidentifier() or not settings:
            raise argparse.ArgumentTypeError(f"a variant is name:field=value,..., got {part!r}")
        changes: dict = {}
        for setting in settings.split(","):
            key, _, value = setting.partition("=")
            key = key.strip()
            if not hasattr(defaults, key):
                raise argparse.ArgumentTypeError(f"PipelineConfig has no field {key!r}")
            default = getattr(defaults, key)
            if isinstance(default, bool):
                changes[key] = value.strip().lower() in ("1", "true", "yes", "on")
            else:  # a number (decode_batch is None by default: an int)
                kind = type(default) if isinstance(default, (int, float)) else int
                try:
                    changes[key] = None if default is None and value.strip().lower() == "none" else kind(value)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"variant {name}: {key}={value!r} is not a number") from None
        try:
            replace(defaults, **changes)  # validates
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"variant {name}: {error}") from None
        variants.append((name, changes))
    return variants


def combine_runs(runs: list[dict]) -> dict:
    """A level's record over its consecutive runs: the first run's figures, then the worst of every run
    (real time only if every run was) and each run's underruns."""
    combined = dict(runs[0])
    combined |= {
        "runs": len(runs),
        "real_time_runs": sum(1 for r in runs if r["all_real_time"]),
        "all_real_time": all(r["all_real_time"] for r in runs),
        "underruns_per_run": [r["underruns"] for r in runs],
        "with_underrun_per_run": [r["with_underrun"] for r in runs],
        "failed_per_run": [r["failed"] for r in runs],
        "underruns": sum(r["underruns"] for r in runs),
        "with_underrun": max(r["with_underrun"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "token_rate_min": min((r["token_rate_min"] for r in runs if r["token_rate_min"] is not None), default=None),
        "ttfa_max": max((r["ttfa_max"] for r in runs if r["ttfa_max"] is not None), default=None),
        "min_slack_s": min((r["min_slack_s"] for r in runs if r["min_slack_s"] is not None), default=None),
    }
    if len(runs) > 1:
        keys = (
            "wall_s",
            "underruns",
            "with_underrun",
            "failed",
            "ttfa_p50",
            "ttfa_max",
            "token_rate_min",
            "min_slack_s",
            "decoder",
        )
        combined["per_run"] = [{k: r.get(k) for k in keys} for r in runs]
    return combined


def prefix_reuse(before: dict, after: dict, turns: int) -> dict:
    """The engine's prefix-cache figures over ``turns`` turns (from its stats before and after)."""
    reused = after.get("prefix_tokens_reused", 0) - before.get("prefix_tokens_reused", 0)
    prompt = after.get("prompt_tokens", 0) - before.get("prompt_tokens", 0)
    out = {"prefix_tokens_reused_per_turn": round(reused / turns, 1) if turns else None,
           "prompt_tokens_computed_per_turn": round(prompt / turns, 1) if turns else None}  # fmt: skip
    for key in ("make_way_calls", "make_way_pauses"):  # one-process layout: the engine's pauses for first blocks
        if key in after:
            out[key] = after[key] - before.get(key, 0)
    return out


def layouts_summary(results: dict[str, dict]) -> dict:
    """Both layouts' single-user figures side by side, and one-process minus two-process."""
    summary = {layout: results.get(layout, {"skipped": "did not run"}) for layout in LAYOUTS}
    one, two = results.get(ONE_PROCESS, {}), results.get(TWO_PROCESS, {})
    for key in ("ttfa_p50", "ttfa_p95"):
        if one.get(key) is not None and two.get(key) is not None:
            summary[f"{key}_one_minus_two_process_s"] = round(one[key] - two[key], 4)
    blocks = [r.get("first_block_while_generating", {}).get("total_s") for r in (one, two)]
    if None not in blocks:
        summary["first_block_while_generating_one_minus_two_process_s"] = round(blocks[0] - blocks[1], 4)
    return summary


def _brief(record: dict) -> dict:
    return {k: record.get(k) for k in ("ttfa", "prefill", "tokens_to_first_block", "first_block_decode", "failed")
            if k in record}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device(), help="the speech side (tokenizer, decoder)")
    parser.add_argument("--llm-device", default=None, help="the LLM engine (default: --device)")
    parser.add_argument("--config", choices=("published", "small"), default="published",
                        help="model shapes: published (GPU) or small (CPU dry run)")  # fmt: skip
    parser.add_argument("--llm-dtype", default=None, choices=llm_dtypes(),
                        help="the engine's --dtype (default: bfloat16 on CUDA, float32 on CPU)")  # fmt: skip
    parser.add_argument("--llm-quant-method", default=None,
                        help="how a quantized --llm-dtype is implemented (model_server.py --quant-method)")  # fmt: skip
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the reference-style pipeline (implied by a quantized --llm-dtype)")  # fmt: skip
    parser.add_argument("--layout", choices=LAYOUTS, default=ONE_PROCESS,
                        help="the token side of the sections but layouts, reference (default %(default)s)")  # fmt: skip
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, from {', '.join(SECTIONS)} (default %(default)s)")  # fmt: skip
    parser.add_argument("--levels", default="1,8,16,32,48,64", help="concurrent conversations to try")
    parser.add_argument("--all-at-once-runs", type=int, default=1, help="consecutive runs of each concurrency level")
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default=[],
        help="ttfa, concurrency and poisson: the single-user turns, each level and each rate also with other pipeline settings, "
        "e.g. 'rate56:min_token_rate=56.25;batch16:decode_batch=16' (PipelineConfig fields)",
    )
    parser.add_argument(
        "--pipeline",
        type=lambda text: parse_variants(f"base:{text}")[0][1],
        default={},
        help="every section's pipeline settings in place of the defaults, e.g. 'cover_start=1' (PipelineConfig "
        "fields; --variants change these)",
    )
    parser.add_argument("--answer-seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=10, help="single-user TTFA turns")
    parser.add_argument("--layout-turns", type=int, default=20, help="single-user TTFA turns per layout (layouts)")
    parser.add_argument("--turn-conversations", type=int, default=6, help="conversations of the turns section")
    parser.add_argument("--history-tokens", type=int, default=2000, help="history before the 5th turn, at least")
    parser.add_argument("--poisson-rates", default="1.2,1.6", help="conversation arrivals per second to try")
    parser.add_argument("--poisson-window-s", type=float, default=90.0, help="arrivals for this long per rate")
    parser.add_argument("--poisson-turns", type=int, default=3, help="turns per conversation")
    parser.add_argument("--poisson-spoken", type=float, default=0.7, help="share of spoken turns (else typed)")
    parser.add_argument("--poisson-answer-s", type=float, default=12.0, help="mean answer length, seconds of speech")
    parser.add_argument("--think-s", type=float, default=3.0, help="mean think time after an answer has played")
    parser.add_argument("--poisson-seed", type=int, default=0)
    parser.add_argument("--reference-turns", type=int, default=3)
    parser.add_argument("--unbatched-level", type=int, default=32, help="0: skip the no-batching comparison")
    parser.add_argument(
        "--no-mixed-decoder-batches",
        dest="mixed_decoder_batches",
        action="store_false",
        help="batch only decoder blocks of the same shape (AudioDecoder mixed_batches=False)",
    )
    parser.add_argument(
        "--later-block-graphs",
        action="store_true",
        help="the encoder and vocoder of later blocks replay CUDA graphs (AudioDecoder graph_later_blocks=True; CUDA only)",
    )
    parser.add_argument(
        "--max-streams", type=int, default=None, help="the engine's stream slots (default: the largest level)"
    )
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="KV cache per stream (default 4096 with turns or poisson, else 1024)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=560, help="skip sections that would not fit")
    parser.add_argument("--quick", action="store_true", help="CPU dry run: short answers, few levels, short load")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--server-log", help="the two-process token server's log file (default: in a temp folder)")
    parser.add_argument("--token-server-url", help="a running token server with forced answers as the token side "
                        "(e.g. Ray Serve's ingress: bench/ray_e2e.py --serve-only); not with layouts, reference")  # fmt: skip
    args = parser.parse_args(argv)
    args.sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.levels = sorted({int(n) for n in args.levels.split(",")})
    args.poisson_rates = sorted({float(r) for r in args.poisson_rates.split(",")})
    if args.all_at_once_runs < 1:
        parser.error("--all-at-once-runs must be at least 1")
    args.llm_device = args.llm_device or args.device
    if args.llm_dtype is None:
        args.llm_dtype = "bfloat16" if args.llm_device.startswith("cuda") else "float32"
    try:
        method_for(args.llm_dtype, args.llm_quant_method)
    except ValueError as error:
        parser.error(f"--llm-quant-method: {error}")
    if args.llm_dtype in QUANTIZED_DTYPES and args.reference:
        args.reference = False  # transformers' GLM (the reference server) runs float weights only
    if args.token_server_url:  # its one layout: reached over HTTP; no /reference
        args.layout, args.reference = TWO_PROCESS, False
        args.sections = tuple(s for s in args.sections if s not in ("layouts", "reference"))
    if args.max_seq_len is None:  # conversations of several turns need the room
        args.max_seq_len = LONG_SEQ_LEN if {"turns", "poisson"} & set(args.sections) else SHORT_SEQ_LEN
    if args.quick:
        args.answer_seconds, args.repeats, args.reference_turns = min(args.answer_seconds, 4.0), 2, 1
        args.levels, args.unbatched_level, args.layout_turns = [1, 2], 2, 2
        args.turn_conversations, args.history_tokens = 1, 120
        args.poisson_rates, args.poisson_window_s, args.poisson_turns = [0.3], 12.0, 2
        args.poisson_answer_s, args.think_s = 2.0, 0.5
        args.max_streams, args.max_seq_len = 4, SHORT_SEQ_LEN
    return args


def main(argv: list[str] | None = None) -> int:
    prefer_expandable_segments()  # as the demo's processes do
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return E2EBench(args).run()


if __name__ == "__main__":
    sys.exit(main())
