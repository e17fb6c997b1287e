"""Benchmark of the speech decoder (flow matching + HiFT) at the published size with random weights.

Prints the machine, the command, and: GPU correctness (CUDA-graph vs eager mel, bf16 vs float32 mel),
first-block latency for a 10- and a 25-token first block, streaming a 60 s answer (750 tokens) block by
block with the bounded prompt window and without it (the original's unbounded prompt), real-time
factors, offline decode, GPU memory, and a reference-style baseline (eager float32, unbounded prompt).

    python bench/decoder.py --out decoder.json            # on the GPU (published size)
    python bench/decoder.py --device cpu --config tiny --quick   # dry run of the script on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from cosyvoice.flow.noise import NoiseTimeline
from flow_inference import AudioDecoder
from glm4voice.audio import OUTPUT_SAMPLE_RATE, SPEECH_TOKEN_RATE
from glm4voice.checkpoints.decoder import (
    PUBLISHED_DECODER_SIZES,
    TINY_DECODER_SIZES,
    write_random_decoder,
)
from glm4voice.protocol import LOW_LATENCY_BLOCK_SIZES, ORIGINAL_BLOCK_SIZES

ANSWER_TOKENS = int(60 * SPEECH_TOKEN_RATE)  # a 60 s answer


def log(*parts) -> None:
    print(*parts, flush=True)


def schedule(sizes: tuple[int, ...], total: int) -> list[int]:
    blocks, k = [], 0
    while sum(blocks) < total:
        blocks.append(min(sizes[min(k, len(sizes) - 1)], total - sum(blocks)))
        k += 1
    return blocks


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.results: dict = {}
        self.deadline = time.monotonic() + args.budget_s
        self.codes = np.random.default_rng(0).integers(0, 16384, ANSWER_TOKENS).tolist()
        self.folder = Path(tempfile.mkdtemp(prefix="decoder-bench-"))
        self.decoders: dict[str, AudioDecoder] = {}

    # --- bookkeeping ------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def save(self) -> None:
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.results, indent=2, default=str))

    def section(self, name: str, fn, need_s: float) -> None:
        left = self.deadline - time.monotonic()
        if left < need_s:
            self.results[name] = {"skipped": f"{left:.0f} s left, needs ~{need_s:.0f} s"}
            log(f"[{name}] skipped")
            return
        log(f"[{name}] ...")
        started = time.monotonic()
        try:
            self.results[name] = fn()
        except Exception as error:  # record and go on: one broken section must not lose the rest
            self.results[name] = {"error": repr(error), "traceback": traceback.format_exc()}
            log(traceback.format_exc())
        log(f"[{name}] {time.monotonic() - started:.1f} s: {json.dumps(self.results[name], default=str)[:2000]}")
        self.save()

    # --- setup ------------------------------------------------------------------------------------
    def machine(self) -> dict:
        info = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "config": self.args.config,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        }
        if self.cuda:
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info

    def write_checkpoint(self) -> dict:
        sizes = PUBLISHED_DECODER_SIZES if self.args.config == "published" else TINY_DECODER_SIZES
        flow, hift = write_random_decoder(self.folder, sizes, seed=0)
        return {
            "flow_params_M": round(sum(p.numel() for p in flow.parameters()) / 1e6, 2),
            "hift_params_M": round(sum(p.numel() for p in hift.parameters()) / 1e6, 2),
        }

    def decoder(self, name: str) -> AudioDecoder:
        if name not in self.decoders:
            graphs = self.cuda and name.startswith("graph")
            dtype = torch.bfloat16 if "bf16" in name else torch.float32
            started = time.perf_counter()
            self.decoders[name] = AudioDecoder(
                self.folder / "config.yaml", self.folder / "flow.pt", self.folder / "hift.pt", self.device,
                dtype=dtype, cuda_graphs=graphs,
            )  # fmt: skip
            if name.endswith("_padded"):  # every length padded to a bucket (masked GroupNorm/attention)
                self.decoders[name].solver.exact_frames = 0
            if name.endswith("_compiled"):  # experimental: torch.compile for exact-length (first-block) graphs
                self.decoders[name].solver.compile_exact = True
            log(f"  loaded {name} in {time.perf_counter() - started:.1f} s")
        return self.decoders[name]

    def variants(self) -> list[str]:
        return ["graph_fp32", "graph_bf16", "eager_fp32"] if self.cuda else ["eager_fp32"]

    # --- sections ---------------------------------------------------------------------------------
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
            for name in (
                ["eager_fp32"]
                + [v for v in self.variants() if v != "eager_fp32"]
                + (["eager_bf16"] if self.cuda else [])
            ):
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
        if self.cuda:  # the whole stream, PCM
            blocks = [10, 20, 40, 80]
            pcm = {}
            for name in ("graph_fp32", "eager_fp32"):
                stream = self.decoder(name).stream(seed=0)
                pieces, start = [], 0
                for size in blocks:
                    pieces.append(stream.feed(self.codes[start : start + size]))
                    start += size
                pieces.append(stream.finish())
                pcm[name] = np.concatenate(pieces)
            out["stream_pcm_graph_vs_eager_max_abs"] = float(np.abs(pcm["graph_fp32"] - pcm["eager_fp32"]).max())
        return out

    def first_block(self) -> dict:
        out = {}
        repeats = 3 if self.args.quick else 10
        for name in self.variants() + (["graph_fp32_padded"] if self.cuda else []):
            decoder = self.decoder(name)
            for size in (10, 25):
                times = []
                for r in range(repeats + 2):  # 2 warm-up runs (graph capture)
                    stream = decoder.stream(seed=r)
                    self.sync()
                    started = time.perf_counter()
                    pcm = stream.feed(self.codes[:size])
                    elapsed = time.perf_counter() - started
                    stream.close()
                    if r >= 2:
                        times.append(elapsed)
                out[f"{name}_{size}_tokens_ms"] = round(statistics.median(times) * 1e3, 2)
                out[f"{name}_{size}_tokens_audio_ms"] = round(len(pcm) / OUTPUT_SAMPLE_RATE * 1e3, 1)
        for name in self.variants()[:2]:
            out[f"breakdown_{name}_10_tokens_ms"] = self.breakdown(name, 10)
        return out

    def breakdown(self, name: str, size: int) -> dict:
        """Per-stage times of one first block (synchronising around each stage)."""
        decoder = self.decoder(name)
        stages: dict[str, list[float]] = {}

        def timed(label, fn):
            def wrapper(*args, **kwargs):
                self.sync()
                started = time.perf_counter()
                result = fn(*args, **kwargs)
                self.sync()
                stages.setdefault(label, []).append(time.perf_counter() - started)
                return result

            return wrapper

        flow_encode, solve, vocode = decoder.flow.encode, decoder.synthesizer.solve, decoder.hift.inference
        decoder.flow.encode, decoder.synthesizer.solve, decoder.hift.inference = (
            timed("encoder", flow_encode), timed("ode", solve), timed("vocoder", vocode)
        )  # fmt: skip
        try:
            totals = []
            for r in range(5):
                stream = decoder.stream(seed=r)
                self.sync()
                started = time.perf_counter()
                stream.feed(self.codes[:size])
                totals.append(time.perf_counter() - started)
        finally:
            del decoder.flow.encode, decoder.hift.inference
            decoder.synthesizer.solve = solve
        out = {label: round(statistics.median(v[1:]) * 1e3, 2) for label, v in stages.items()}
        out["total"] = round(statistics.median(totals[1:]) * 1e3, 2)
        return out

    def kernels(self) -> dict:
        """CUDA kernels and GPU time of one eager ODE solve for a 10-token first block (68 frames)."""
        out = {}
        for name in ("eager_fp32", "eager_bf16"):
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
            out[name] = {
                "kernels_per_solve": len(kernels),
                "gpu_ms": round(sum(e.device_time_total for e in kernels) / 1e3, 2),
                "top_us": {k: round(v) for k, v in top},
            }
        return out

    def compiled_first_block(self) -> dict:
        """Experimental: exact-length graphs of a torch.compile'd estimator (first block only)."""
        decoder = self.decoder("graph_bf16_compiled")
        started = time.perf_counter()
        decoder.stream(seed=0).feed(self.codes[:10])  # compiles and captures
        out = {"compile_and_capture_s": round(time.perf_counter() - started, 1)}
        times = []
        for r in range(10):
            stream = decoder.stream(seed=r)
            self.sync()
            started = time.perf_counter()
            stream.feed(self.codes[:10])
            times.append(time.perf_counter() - started)
        out["graph_bf16_compiled_10_tokens_ms"] = round(statistics.median(times) * 1e3, 2)
        out["breakdown_ms"] = self.breakdown("graph_bf16_compiled", 10)
        reference = self.decoder("eager_fp32")
        tokens = torch.tensor([self.codes[:10]], device=self.device)
        noise = NoiseTimeline(0).take(0, 68).to(self.device)
        mels = []
        for d in (reference, decoder):
            with torch.inference_mode():
                mels.append(d.flow.inference(
                    tokens, None, tokens[:, :0], None, torch.zeros(1, 0, 80, device=self.device), None,
                    torch.zeros(1, 192, device=self.device), noise=noise, solve=d.synthesizer.solve,
                ).float())  # fmt: skip
        diff = (mels[1] - mels[0]).abs()
        out["mel_vs_eager_fp32"] = {
            "max_abs": float(diff.max()),
            "rms_rel": float(diff.pow(2).mean().sqrt() / mels[0].pow(2).mean().sqrt()),
        }
        return out

    def answer(self, name: str, sizes: tuple[int, ...], window, repeat: bool = True) -> dict:
        decoder = self.decoder(name)
        blocks = schedule(sizes, len(self.codes))
        result = {}
        for attempt in range(2 if repeat else 1):  # the first pass captures the graphs it needs
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
        out["graphs"] = {name: d.solver.captured_shapes for name, d in self.decoders.items()}
        return out

    def run(self) -> None:
        self.results["machine"] = self.machine()
        log(json.dumps(self.results["machine"]))
        self.section("checkpoint", self.write_checkpoint, 20)
        self.section("correctness", self.correctness, 30)
        self.section("first_block", self.first_block, 30)
        if self.cuda:
            self.section("kernels", self.kernels, 10)
        self.section("streaming_60s", self.streaming, 60)
        self.section("offline_60s", self.offline, 20)
        self.section("memory", self.memory, 0)
        if self.cuda:
            self.section("compiled_first_block", self.compiled_first_block, 150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=["published", "tiny"], default="published")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens (dry runs)")
    parser.add_argument("--budget-s", type=float, default=480, help="skip sections that would not fit")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        global ANSWER_TOKENS
        ANSWER_TOKENS = 120
    Bench(args).run()


if __name__ == "__main__":
    main()
