"""Benchmark of the speech decoder (flow matching + HiFT) at the published size with random weights.

One command prints the machine, the command and, section by section (each also written to ``--out``):

- ``first_block``: a new stream's first block alone (10 tokens, and 25), time from ``feed(codes)`` to
  PCM on the host: total, flow (encoder, length regulator, ODE) and vocoder, medians of ``--runs``
  (>= 20) after warm-up, for each variant: first-block CUDA graphs (default), the ODE alone graphed
  (the decoder before first-block graphs), torch.compile inside the first-block graphs, float32, eager;
- ``throughput``: ``feed_many`` batches of 1 ... 64 streams: a batch of first blocks, and steady-state
  40-token blocks with the 100-token prompt window: ms per call and audio seconds per second;
- ``warm_up``: a fresh decoder's ``warm_up`` for the low-latency schedule and every graphed batch size:
  seconds, graphs captured, GPU memory they take;
- ``correctness`` (mel of each variant against eager float32, PCM of whole streams), ``kernels`` (CUDA
  kernels of one eager ODE solve), ``streaming_60s`` (a 60 s answer block by block: bounded and the
  original's unbounded prompt, against a reference-style eager float32 baseline), ``offline_60s``.

    python bench/decoder.py --out decoder.json                   # GPU, published size (~8 min)
    python bench/decoder.py --sections first_block,throughput    # the two headline sections only
    python bench/decoder.py --device cpu --config tiny --quick   # dry run of the script on a CPU

Sections that would not fit in ``--budget-s`` are skipped (and say so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import BenchRun, log, machine_info, synchronize
from cosyvoice.flow.noise import NoiseTimeline
from flow_inference import AudioDecoder
from glm4voice.audio import OUTPUT_SAMPLE_RATE, SPEECH_TOKEN_RATE
from glm4voice.checkpoints.decoder import (
    PUBLISHED_DECODER_SIZES,
    TINY_DECODER_SIZES,
    write_random_decoder,
)
from glm4voice.devices import default_device
from glm4voice.protocol import LOW_LATENCY_BLOCK_SIZES, ORIGINAL_BLOCK_SIZES

ANSWER_TOKENS = int(60 * SPEECH_TOKEN_RATE)  # a 60 s answer
QUICK_ANSWER_TOKENS = 300  # --quick
SECTIONS = ("first_block", "throughput", "warm_up", "correctness", "kernels", "streaming_60s", "offline_60s")
THROUGHPUT_BLOCK = 40
"""Tokens of the steady-state blocks in ``throughput`` (after a prompt of the default 100-token window)."""
VARIANTS: dict[str, dict] = {
    "eager_fp32": {"dtype": torch.float32, "cuda_graphs": False},
    "graph_fp32": {"dtype": torch.float32},
    "graph_bf16": {"dtype": torch.bfloat16},
    "ode_graph_bf16": {"dtype": torch.bfloat16, "graph_first_blocks": False},
    "graph_bf16_compiled": {"dtype": torch.bfloat16, "compile_first_blocks": True},
    "graph_bf16_max-autotune-no-cudagraphs": {
        "dtype": torch.bfloat16,
        "compile_first_blocks": "max-autotune-no-cudagraphs",
    },
}
"""Decoders by name: "graph" = the default CUDA graphs (whole first blocks, ODE of longer blocks);
"ode_graph" = only the ODE graphed (the decoder before first-block graphs); "compiled" = torch.compile
of the estimator and vocoder inside the first-block graphs; "bf16" = the estimator in bfloat16."""


def schedule(sizes: tuple[int, ...], total: int) -> list[int]:
    blocks, k = [], 0
    while sum(blocks) < total:
        blocks.append(min(sizes[min(k, len(sizes) - 1)], total - sum(blocks)))
        k += 1
    return blocks


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.run_record = BenchRun(args.out, args.budget_s)
        self.results = self.run_record.results
        answer_tokens = QUICK_ANSWER_TOKENS if args.quick else ANSWER_TOKENS
        self.codes = np.random.default_rng(0).integers(0, 16384, answer_tokens).tolist()
        self.folder = Path(tempfile.mkdtemp(prefix="decoder-bench-"))
        self.decoders: dict[str, AudioDecoder] = {}

    # --- bookkeeping ------------------------------------------------------------------------------
    def sync(self) -> None:
        synchronize(self.device)

    def section(self, name: str, fn: Callable[[], dict], need_s: float) -> None:
        if name in self.args.sections:
            self.run_record.section(name, fn, need_s)

    # --- setup ------------------------------------------------------------------------------------
    def machine(self) -> dict:
        return machine_info(
            self.device,
            config=self.args.config,
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )

    def write_checkpoint(self) -> dict:
        sizes = PUBLISHED_DECODER_SIZES if self.args.config == "published" else TINY_DECODER_SIZES
        flow, hift = write_random_decoder(self.folder, sizes, seed=0)
        return {
            "flow_params_M": round(sum(p.numel() for p in flow.parameters()) / 1e6, 2),
            "hift_params_M": round(sum(p.numel() for p in hift.parameters()) / 1e6, 2),
        }

    def load(self, name: str, **extra) -> AudioDecoder:
        base = name.removesuffix("_padded")
        options = dict(VARIANTS[base], **extra)
        if not self.cuda:
            options = {"dtype": options["dtype"], "cuda_graphs": False}
        started = time.perf_counter()
        decoder = AudioDecoder(
            self.folder / "config.yaml", self.folder / "flow.pt", self.folder / "hift.pt", self.device, **options
        )
        if name.endswith("_padded"):  # every ODE length padded to a bucket (masked GroupNorm/attention)
            decoder.solver.exact_frames = 0
        log(f"  loaded {name} in {time.perf_counter() - started:.1f} s")
        return decoder

    def decoder(self, name: str) -> AudioDecoder:
        if name not in self.decoders:
            self.decoders[name] = self.load(name)
        return self.decoders[name]

    def variants(self) -> list[str]:
        return ["graph_fp32", "graph_bf16", "eager_fp32"] if self.cuda else ["eager_fp32"]

    # --- first block --------------------------------------------------------------------------------
    def first_block(self) -> dict:
        """Per variant: the first block's total, flow and vocoder times (medians after warm-up)."""
        names = ["graph_bf16", "ode_graph_bf16", "graph_fp32", "eager_fp32"] if self.cuda else ["eager_fp32"]
        if self.cuda:
            names += [
                f"graph_bf16_{mode}" if mode != "default" else "graph_bf16_compiled" for mode in self.args.compile_modes
            ]
        out = {}
        for name in names:
            need = 150 if "compiled" in name or "autotune" in name else 15
            if self.run_record.left_s() < need:
                out[name] = {"skipped": f"{self.run_record.left_s():.0f} s left"}
                continue
            decoder = self.decoder(name)
            started = time.perf_counter()
            out[name] = {f"{size}_tokens": self.time_first_block(decoder, size) for size in (10, 25)}
            out[name]["warm_up_and_timing_s"] = round(time.perf_counter() - started, 1)
            if name.startswith(("eager", "graph_fp32")) or "compiled" in name or "autotune" in name:
                self.release(name)  # keep GPU memory for the later sections
            log(f"  {name}: {json.dumps(out[name])}")
        return out

    def time_first_block(self, decoder: AudioDecoder, size: int) -> dict:
        codes = self.codes[:size]
        runs = self.args.runs
        for r in range(3):  # captures (and compiles), then steady state
            stream = decoder.stream(seed=r)
            stream.feed(codes)
            stream.close()
        totals = []
        for r in range(runs):
            stream = decoder.stream(seed=r)
            self.sync()
            started = time.perf_counter()
            pcm = stream.feed(codes)
            totals.append(time.perf_counter() - started)
            stream.close()
        stages = self.stage_times(decoder, codes, runs)
        return {
            "total_ms": ms(statistics.median(totals)),
            "total_p90_ms": ms(float(np.percentile(totals, 90))),
            "flow_ms": ms(statistics.median(stages["flow"])),
            "vocoder_ms": ms(statistics.median(stages["vocoder"])),
            "runs": runs,
            "audio_ms": round(len(pcm) / OUTPUT_SAMPLE_RATE * 1e3, 1),
        }

    def stage_times(self, decoder: AudioDecoder, codes: list[int], runs: int) -> dict[str, list[float]]:
        """Flow and vocoder stage of ``runs`` first blocks, synchronising around each stage (separate
        runs from the totals, which are not slowed by these synchronisations)."""
        synth = decoder.synthesizer
        stages: dict[str, list[float]] = {"flow": [], "vocoder": []}

        def timed(label: str, fn):
            def wrapper(*args, **kwargs):
                self.sync()
                started = time.perf_counter()
                result = fn(*args, **kwargs)
                self.sync()
                stages[label].append(time.perf_counter() - started)
                return result

            return wrapper

        synth.flow_mel, synth.vocode = timed("flow", synth.flow_mel), timed("vocoder", synth.vocode)
        try:
            for r in range(runs):
                stream = decoder.stream(seed=r)
                stream.feed(codes)
                stream.close()
        finally:
            del synth.flow_mel, synth.vocode
        return stages

    def release(self, name: str) -> None:
        self.decoders.pop(name, None)
        if self.cuda:
            torch.cuda.empty_cache()

    # --- batches ------------------------------------------------------------------------------------
    def throughput(self) -> dict:
        """feed_many at each graphed batch size: first blocks, and steady-state 40-token blocks."""
        decoder = self.decoder("graph_bf16" if self.cuda else "eager_fp32")
        sizes = decoder.graph_batch_sizes if self.cuda and not self.args.quick else (1, 2, 4)
        repeats = 2 if self.args.quick else 3
        out = {}
        for batch in sizes:
            if self.run_record.left_s() < 20:
                out[str(batch)] = {"skipped": f"{self.run_record.left_s():.0f} s left"}
                continue
            first = []
            for attempt in range(1 + repeats):  # the first attempt captures this batch's graphs
                streams = [decoder.stream(seed=1000 * attempt + i) for i in range(batch)]
                first.append(self.timed_call(decoder, [(s, self.codes[:10]) for s in streams]))
                for stream in streams:
                    stream.close()
            streams = [decoder.stream(seed=i) for i in range(batch)]
            start = 0
            for size in (10, 20, THROUGHPUT_BLOCK, THROUGHPUT_BLOCK):  # to the steady state: a full prompt window
                self.timed_call(decoder, [(s, self.codes[start : start + size]) for s in streams])
                start += size
            steady = []
            for _ in range(1 + repeats):
                steady.append(
                    self.timed_call(decoder, [(s, self.codes[start : start + THROUGHPUT_BLOCK]) for s in streams])
                )
                start += THROUGHPUT_BLOCK
            for stream in streams:
                stream.close()
            first_s, steady_s = statistics.median(first[1:]), statistics.median(steady[1:])
            audio_s = batch * THROUGHPUT_BLOCK / SPEECH_TOKEN_RATE
            out[str(batch)] = {
                "first_block_call_ms": ms(first_s),
                "steady_block_call_ms": ms(steady_s),
                "steady_audio_s_per_s": round(audio_s / steady_s, 1),
                "steady_blocks_per_s": round(batch / steady_s, 1),
            }
            log(f"  batch {batch}: {out[str(batch)]}")
        out["steady_block"] = {
            "tokens": THROUGHPUT_BLOCK,
            "prompt_tokens": decoder.prompt_window,
            "audio_s": THROUGHPUT_BLOCK / SPEECH_TOKEN_RATE,
        }
        return out

    def timed_call(self, decoder: AudioDecoder, jobs) -> float:
        self.sync()
        started = time.perf_counter()
        results = decoder.feed_many(jobs)
        elapsed = time.perf_counter() - started
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return elapsed

    def warm_up(self) -> dict:
        """A fresh decoder's warm_up (low-latency schedule, every graphed batch size): time and memory."""
        for name in list(self.decoders):  # measure the warm-up's memory on its own
            self.release(name)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        decoder = self.load("graph_bf16")
        self.sync()
        allocated = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        reserved = torch.cuda.memory_reserved(self.device) if self.cuda else 0
        seconds = decoder.warm_up(LOW_LATENCY_BLOCK_SIZES)
        self.sync()
        out = {
            "block_sizes": list(LOW_LATENCY_BLOCK_SIZES),
            "batch_sizes": list(decoder.graph_batch_sizes),
            "seconds": round(seconds, 1),
            "graphs": {kind: len(shapes) for kind, shapes in decoder.captured_graphs.items()},
        }
        if self.cuda:
            gib = 2**30
            out["weights_GiB"] = round(allocated / gib, 3)
            out["graphs_allocated_GiB"] = round((torch.cuda.memory_allocated(self.device) - allocated) / gib, 3)
            out["graphs_reserved_GiB"] = round((torch.cuda.memory_reserved(self.device) - reserved) / gib, 3)
            out["peak_allocated_GiB"] = round(torch.cuda.max_memory_allocated(self.device) / gib, 3)
        self.decoders["graph_bf16"] = decoder
        return out

    # --- accuracy, kernels, long answers --------------------------------------------------------------
    def correctness(self) -> dict:
        """Same tokens, prompt and noise: the mel of each variant against eager float32."""
        out = {}
        for prompt_tokens, new_tokens in ((0, 10), (0, 50), (100, 60)) if not self.args.quick else ((0, 20),):
            reference = None
            tokens = torch.tensor([self.codes[: prompt_tokens + new_tokens]], device=self.device)
            frames = self.decoder("eager_fp32").mel_frames(prompt_tokens + new_tokens)
            prompt_frames = self.decoder("eager_fp32").mel_frames(prompt_tokens) - 34 if prompt_tokens else 0
            prompt_mel = (
                torch.randn(1, prompt_frames, 80, generator=torch.Generator().manual_seed(1)).to(self.device) - 5
            )
            noise = NoiseTimeline(0).take(0, frames).to(self.device)
            names = (
                ["eager_fp32"]
                + [v for v in self.variants() if v != "eager_fp32"]
                + (["graph_fp32_padded"] if self.cuda else [])
            )
            for name in names:
                decoder = self.decoder(name)
                with torch.inference_mode():
                    mel = decoder.flow.inference(
                        tokens[:, prompt_tokens:], None, tokens[:, :prompt_tokens], None, prompt_mel, None,
                        torch.zeros(1, 192, device=self.device), noise=noise, solve=decoder.synthesizer.solve,
                    ).float()  # fmt: skip
                if reference is None:
                    reference = mel
                    continue
                diff = (mel - reference).abs()
                out[f"{name}_vs_eager_fp32_prompt{prompt_tokens}"] = {
                    "max_abs": float(diff.max()),
                    "rms_rel": float(diff.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()),
                    "mel_range": [float(reference.min()), float(reference.max())],
                }
        if self.cuda:  # whole streams, PCM: the graphed paths (first-block graphs included) against eager
            pcm = {}
            for name in ("graph_fp32", "ode_graph_bf16", "graph_bf16", "eager_fp32"):
                stream = self.decoder(name).stream(seed=0)
                pieces, start = [], 0
                for size in (10, 20, 40, 80):
                    pieces.append(stream.feed(self.codes[start : start + size]))
                    start += size
                pieces.append(stream.finish())
                pcm[name] = np.concatenate(pieces)
            out["stream_pcm_graph_fp32_vs_eager_fp32_max_abs"] = float(
                np.abs(pcm["graph_fp32"] - pcm["eager_fp32"]).max()
            )
            out["stream_pcm_graph_bf16_vs_ode_graph_bf16_max_abs"] = float(
                np.abs(pcm["graph_bf16"] - pcm["ode_graph_bf16"]).max()
            )
        return out

    def kernels(self) -> dict:
        """CUDA kernels and GPU time of one eager ODE solve for a 10-token first block (68 frames)."""
        out = {}
        for name in ("eager_fp32", "ode_graph_bf16"):
            cfm = self.decoder(name).flow.decoder
            frames = 68
            z, mu, cond = (torch.randn(1, 80, frames, device=self.device) for _ in range(3))
            spks = torch.randn(1, 80, device=self.device)
            t_span = cfm.time_span(10, device=self.device)
            with torch.inference_mode():
                cfm.solve(z, mu, None, spks, cond, t_span)
                self.sync()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    cfm.solve(z, mu, None, spks, cond, t_span)
                    self.sync()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            by_name: dict[str, float] = {}
            for e in kernels:
                by_name[e.name[:60]] = by_name.get(e.name[:60], 0.0) + e.device_time_total
            top = sorted(by_name.items(), key=lambda item: -item[1])[:8]
            out[name.replace("ode_graph", "eager")] = {
                "kernels_per_solve": len(kernels),
                "gpu_ms": round(sum(e.device_time_total for e in kernels) / 1e3, 2),
                "top_us": {k: round(v) for k, v in top},
            }
        return out

    def answer(self, name: str, sizes: tuple[int, ...], window, repeat: bool = True) -> dict:
        decoder = self.decoder(name)
        blocks = schedule(sizes, len(self.codes))
        result = {}
        for _ in range(2 if repeat else 1):  # the first pass captures the graphs it needs
            stream = decoder.stream(seed=0, prompt_window=window)
            times, samples, start = [], 0, 0
            for size in blocks:
                self.sync()
                started = time.perf_counter()
                pcm = stream.feed(self.codes[start : start + size])
                times.append(time.perf_counter() - started)
                samples += len(pcm)
                start += size
            started = time.perf_counter()
            samples += len(stream.finish())
            finish = time.perf_counter() - started
            total = sum(times) + finish
            result = {
                "blocks": blocks,
                "block_ms": [round(t * 1e3, 1) for t in times],
                "finish_ms": round(finish * 1e3, 1),
                "total_s": round(total, 3),
                "audio_s": round(samples / OUTPUT_SAMPLE_RATE, 2),
                "rtf": round(total / (samples / OUTPUT_SAMPLE_RATE), 4),
                "first_block_ms": round(times[0] * 1e3, 1),
            }
        return result

    def streaming(self) -> dict:
        out = {}
        for name in self.variants():
            if name == "eager_fp32" and self.cuda:
                continue
            for schedule_name, sizes in (("low_latency", LOW_LATENCY_BLOCK_SIZES), ("original", ORIGINAL_BLOCK_SIZES)):
                for window in (self.decoder(name).prompt_window, None):
                    key = f"{name}_{schedule_name}_window{window}"
                    out[key] = self.answer(name, sizes, window)
                    log(f"  {key}: rtf {out[key]['rtf']}, blocks ms {out[key]['block_ms']}")
        if self.cuda:  # reference-style baseline: eager float32, the original's unbounded prompt and schedule
            out["baseline_eager_fp32_original_windowNone"] = self.answer(
                "eager_fp32", ORIGINAL_BLOCK_SIZES, None, repeat=False
            )
            out["eager_fp32_low_latency_window100"] = self.answer(
                "eager_fp32", LOW_LATENCY_BLOCK_SIZES, 100, repeat=False
            )
        return out

    def offline(self) -> dict:
        out = {}
        codes = self.codes if not self.args.quick else self.codes[:100]
        for name in self.variants():
            decoder = self.decoder(name)
            times = []
            for _ in range(2):
                self.sync()
                started = time.perf_counter()
                pcm = decoder.decode(codes, seed=0)
                times.append(time.perf_counter() - started)
            out[name] = {
                "s": round(times[-1], 3),
                "audio_s": round(len(pcm) / OUTPUT_SAMPLE_RATE, 2),
                "rtf": round(times[-1] / (len(pcm) / OUTPUT_SAMPLE_RATE), 4),
            }
        return out

    def memory(self) -> dict:
        if not self.cuda:
            return {}
        out = {"max_allocated_GiB": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)}
        out["allocated_GiB"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 2)
        out["graphs"] = {name: {k: len(v) for k, v in d.captured_graphs.items()} for name, d in self.decoders.items()}
        return out

    def run(self) -> None:
        self.run_record.record("machine", self.machine())
        self.run_record.record("checkpoint", self.write_checkpoint())
        self.section("first_block", self.first_block, 30)
        self.section("throughput", self.throughput, 40)
        self.section("warm_up", self.warm_up, 150 if self.cuda and not self.args.quick else 10)
        self.section("correctness", self.correctness, 30)
        if self.cuda:
            self.section("kernels", self.kernels, 10)
        self.section("streaming_60s", self.streaming, 60)
        self.section("offline_60s", self.offline, 20)
        self.run_record.record("memory", self.memory())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--config", choices=["published", "tiny"], default="published")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens (dry runs)")
    parser.add_argument("--runs", type=int, default=30, help="timed first blocks per variant (medians)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument(
        "--compile-modes", default="default",
        help="torch.compile modes of first-block graphs to time (comma-separated; '' for none), e.g. "
        "default,max-autotune-no-cudagraphs",
    )  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=520, help="skip sections that would not fit")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = args.sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    for mode in args.compile_modes:
        if mode != "default" and f"graph_bf16_{mode}" not in VARIANTS:
            parser.error(f"unknown compile mode {mode!r}")
    if args.quick:
        args.runs = min(args.runs, 5)
    Bench(args).run()


if __name__ == "__main__":
    main()
