"""Benchmark of the GLM-4-Voice-9B engine (random weights, full size) and the reference-style baseline.

Prints the machine, the command, and: memory-bandwidth bound and single-stream decode tokens/s,
the GPU time and kernels (torch.profiler) of one decode step for each decode attention backend,
prefill time for 300 and 2000 prompt tokens, the time to first token of each turn of a 5-turn
conversation (prefix cache), aggregate and per-stream tokens/s at 1/8/32/64 concurrent streams,
GPU memory, the eager fallback (and whether its 256 greedy tokens equal the engine's), quantized
weights (``--quant``), a full-size safetensors load, and transformers' GLM with ``generate`` + a
streamer thread at batch 1 (how the original serves). The last lines (``=== headline ===``) repeat
the figures the issues set bars for.

Quantized weights (glm4voice.llm.quant; ``--quant int8,fp8,int4`` by default, each ``DTYPE[:METHOD]``)
are measured in the same run as bf16 and built from the same random weights: one matmul of the
largest weight per method (``quant_kernels``), the relative error of real-size layers with and
without outlier channels (``outlier_layers``), the greedy tokens and next-token distributions against
bf16 (``quality_*``: catch broken kernels; random weights say nothing about answer quality, for that
see ``python -m glm4voice.llm.quality``), then the engine: single stream, 32 streams, weight bytes.

    python bench/llm.py                           # the published 9B shape on the GPU
    python bench/llm.py --quant-only --quant fp8,int4 --budget-s 540     # bf16 + quantized only
    python bench/llm.py --config small --device cpu --quick   # a dry run of the script on a CPU
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import BenchRun, log, machine_info, synchronize
from glm4voice.devices import FLOAT_DTYPES, default_device
from glm4voice.llm import quant
from glm4voice.llm.checkpoint import load_model, published_key_names, random_model
from glm4voice.llm.config import PUBLISHED_CONFIG, GLMConfig
from glm4voice.llm.decode_attention import DECODE_ATTENTION, resolve, triton_available
from glm4voice.llm.engine import Engine, EngineConfig, SamplingParams
from glm4voice.llm.model import Linear
from glm4voice.llm.quality import compare_next_token, identical_prefix
from glm4voice.llm.quant import QUANTIZED_DTYPES, weight_bytes

CONFIGS = {
    "published": GLMConfig.published(),
    "small": GLMConfig(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, ffn_hidden_size=512,
                       vocab_size=168960, layernorm_epsilon=1e-6, seq_length=8192),
}  # fmt: skip
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
SAMPLING = dict(temperature=0.8, top_p=0.8)
QUANT_BARS = {
    "fp8": {"single_tokens_per_s": 175, "per_stream_32_min": 60, "weights_gb": 10.5},
    "int4": {"single_tokens_per_s": 190, "weights_gb": 6.0},
}
"""Issue 17's bars (H100, same run as bf16)."""
OUTLIER_CHANNELS = 4
OUTLIER_FACTOR = 100.0
INT4_ACTIVATION_OUTLIER_BAR = 0.12
"""Relative error of an int4 layer (groups of 128) on inputs with a few channels x100: about the
0.10 of plain inputs (a CPU emulation of torchao's int4 rounding at 4096x4096 gives 0.099 for both)."""
QUANT_LEVELS = (1, 32)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.config = CONFIGS[args.config]
        self.device = torch.device(args.device)
        self.run_results = BenchRun(args.out, args.budget_s)
        self.results = self.run_results.results
        self.section = self.run_results.section
        self.generator = torch.Generator().manual_seed(0)

    def prompt(self, n: int) -> list[int]:
        return torch.randint(0, 150000 if self.config.vocab_size > 150000 else self.config.vocab_size, (n,),
                             generator=self.generator).tolist()  # fmt: skip

    def sync(self) -> None:
        synchronize(self.device)

    # --- sections -----------------------------------------------------------------------------------
    def machine(self) -> dict:
        return machine_info(self.device, config=self.args.config,
                            parameters_b=round(self.config.num_parameters() / 1e9, 3))  # fmt: skip

    def bandwidth(self) -> dict:
        if self.device.type != "cuda":
            return {"note": "GPU only"}
        n = 2 * 1024**3
        src = torch.empty(n, dtype=torch.uint8, device=self.device).random_()
        dst = torch.empty_like(src)
        times = []
        for _ in range(12):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
        copy = 2 * n / statistics.median(times[2:])
        name = torch.cuda.get_device_name(self.device)
        nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in name), None)
        self.copy_bandwidth = copy
        return {"copy_read_plus_write_tb_s": round(copy / 1e12, 3), "nominal_tb_s": nominal and nominal / 1e12}

    def build(self, dtype: torch.dtype, method: quant.Method | None = None) -> dict:
        """``self.model``: the random model (seed 0: the same floating-point weights every time),
        quantized with ``method`` if given."""
        started = time.monotonic()
        self.model = None
        gc.collect()
        quantize = {} if method is None else dict(quantize=method.dtype, method=method.name)
        self.model = random_model(self.config, self.device, dtype, seed=0, **quantize)
        self.sync()
        formats = quant.weight_formats(self.model)
        return {"seconds": round(time.monotonic() - started, 1), "weight_gb": round(weight_bytes(self.model) / 1e9, 2),
                "linear_weights": formats}  # fmt: skip

    def step_bytes(self, kv_len: int) -> int:
        """Bytes a batch-1 decode step must read: every weight except the embedding table (one row
        of it), and the keys and values of kv_len positions."""
        m = self.model
        embed = m.embed.weight
        weights = weight_bytes(m) - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()
        c = self.config
        kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * kv_len * 2
        return weights + kv

    async def stream_times(self, engine, prompt, params) -> tuple[list[int], list[float], float]:
        submitted = time.perf_counter()
        stream = engine.submit(prompt, params)
        tokens, times = [], []
        async for token in stream:
            tokens.append(token)
            times.append(time.perf_counter())
        return tokens, times, submitted

    def engine_config(self, **overrides) -> EngineConfig:
        options = dict(
            device=str(self.device), dtype=self.args.dtype, max_batch_size=64, max_seq_len=4096, prefill_chunk=512
        )
        if self.args.quant_only:
            # what the quantized figures need, so that five engines warm up within one run: decode graphs for 1
            # and 32 streams (a batch between pads up to 32), attention up to 1024 positions; prefill graphs as
            # served (the slowest of 32 streams waits for the other 31 prefills, and without graphs those are
            # host-bound: torchao's eager dispatch made that figure vary 2x between runs). bf16: same settings
            options |= dict(max_batch_size=max(QUANT_LEVELS), max_seq_len=1024, cuda_graph_batch_sizes=QUANT_LEVELS)
        return EngineConfig(**(options | overrides))

    def single_stream(self, engine, new_tokens: int) -> dict:
        params = SamplingParams(**SAMPLING, max_new_tokens=new_tokens, seed=1)
        prompt = self.prompt(300)

        async def run():
            await self.stream_times(engine, prompt, SamplingParams(max_new_tokens=8))  # warm
            return await self.stream_times(engine, prompt, params)

        tokens, times, submitted = self.loop.run_until_complete(run())
        stats = engine.stats()
        rate = (len(tokens) - 1) / (times[-1] - times[0])
        kv_len = next(s for s in engine.runner.kv_lengths if s >= 300 + new_tokens)
        bytes_per_step = self.step_bytes(kv_len)
        result = {
            "prompt_tokens": 300,
            "new_tokens": len(tokens),
            "decode_tokens_per_s": round(rate, 1),
            "ttft_ms": round((times[0] - submitted) * 1e3, 1),
            "bytes_per_step_gb": round(bytes_per_step / 1e9, 3),
            "decode_attention": resolve(self.model.decode_attention, self.device, self.config.head_dim),
            "worker_decode_step_ms_all_runs": round(1e3 * stats.decode_seconds / max(1, stats.decode_steps), 3),
        }
        if hasattr(self, "copy_bandwidth"):
            bound = self.copy_bandwidth / bytes_per_step
            result |= {"bound_tokens_per_s_at_copy_bw": round(bound, 1), "fraction_of_bound": round(rate / bound, 3)}
        return result

    def prefill_times(self, engine) -> dict:
        out = {}
        for n in (300, 2000):
            prompt = self.prompt(n)

            async def ttft(prompt):
                _, times, submitted = await self.stream_times(engine, prompt, SamplingParams(max_new_tokens=1))
                return times[0] - submitted

            # a new prompt each time: a repeated one would be a prefix-cache hit
            engine_ttft = [self.loop.run_until_complete(ttft(self.prompt(n))) for _ in range(3)]
            self.loop.run_until_complete(engine.wait_idle())
            runner = engine.runner
            raw = []
            for _ in range(3):  # the worker is idle (blocked on its queue): use the runner directly
                self.sync()
                start = time.perf_counter()
                runner.prefill(0, prompt, 0, sample=True)
                raw.append(time.perf_counter() - start)
            engine.drop_prefix_cache()  # slot 0's keys and values were overwritten behind its back
            out[f"prefill_{n}_one_chunk_ms"] = round(statistics.median(raw) * 1e3, 1)
            out[f"ttft_{n}_engine_chunked_ms"] = round(statistics.median(engine_ttft) * 1e3, 1)
        return out

    def concurrency(self, engine, levels, new_tokens: int) -> dict:
        out = {}
        for n in levels:
            if n > engine.config.max_batch_size:
                continue
            prompts = [self.prompt(300) for _ in range(n)]

            async def run():
                started = time.perf_counter()
                results = await asyncio.gather(*(
                    self.stream_times(engine, p, SamplingParams(**SAMPLING, max_new_tokens=new_tokens, seed=i))
                    for i, p in enumerate(prompts)
                ))  # fmt: skip
                return results, time.perf_counter() - started

            before = engine.stats()
            results, wall = self.loop.run_until_complete(run())
            after = engine.stats()
            total = sum(len(tokens) for tokens, _, _ in results)
            per_stream = [(len(tk) - 1) / (tm[-1] - tm[0]) for tk, tm, _ in results if len(tk) > 1]
            ttft = [tm[0] - sub for _, tm, sub in results]
            window_start = max(tm[0] for _, tm, _ in results)
            window_end = min(tm[-1] for _, tm, _ in results)
            in_window = sum(sum(window_start <= t <= window_end for t in tm) for _, tm, _ in results)
            steady = in_window / (window_end - window_start) if window_end > window_start else None
            out[str(n)] = {
                "aggregate_tokens_per_s": round(total / wall, 1),
                "steady_aggregate_tokens_per_s": steady and round(steady, 1),
                "per_stream_tokens_per_s_median": round(statistics.median(per_stream), 1),
                "per_stream_tokens_per_s_min": round(min(per_stream), 1),
                "ttft_ms_median": round(statistics.median(ttft) * 1e3, 1),
                "ttft_ms_max": round(max(ttft) * 1e3, 1),
                "worker_prefill_s": round(after.prefill_seconds - before.prefill_seconds, 2),
                "worker_decode_s": round(after.decode_seconds - before.decode_seconds, 2),
                "decode_step_ms": round(1e3 * (after.decode_seconds - before.decode_seconds)
                                        / max(1, after.decode_steps - before.decode_steps), 2),
            }  # fmt: skip
            log(f"  {n} streams: {out[str(n)]}")
        return out

    def multi_turn(self, engine, turns: int = 5, reply: int = 300, user: int = 150, repeats: int = 3) -> dict:
        """Time to first token of each turn of a conversation (prompt = previous prompt + reply + a new
        user message of ``user`` tokens; the 5th turn's history is >= 2000 tokens), with the engine's
        prefix cache; against it, a prompt of the 5th turn's length that shares nothing (what every
        turn costs without the cache). Medians over ``repeats`` conversations, one at a time, each with
        its own 60-token system prompt (so every 1st turn is a full prefill)."""
        ttft: list[list[float]] = [[] for _ in range(turns)]
        unshared, lengths = [], []
        before = engine.stats()

        async def conversation():
            history = self.prompt(60)
            for turn in range(turns):
                prompt = history + self.prompt(user)
                params = SamplingParams(**SAMPLING, max_new_tokens=reply if turn < turns - 1 else 1, seed=turn)
                tokens, times, submitted = await self.stream_times(engine, prompt, params)
                ttft[turn].append(times[0] - submitted)
                if turn == turns - 1:
                    lengths.append(len(prompt))
                    _, times, submitted = await self.stream_times(
                        engine, self.prompt(len(prompt)), SamplingParams(max_new_tokens=1)
                    )
                    unshared.append(times[0] - submitted)
                history = prompt + tokens

        for _ in range(repeats):
            self.loop.run_until_complete(conversation())
        after = engine.stats()
        ms = [round(statistics.median(t) * 1e3, 1) for t in ttft]
        return {
            "ttft_ms_median_per_turn": ms,
            "turn5_minus_turn1_ms": round(ms[-1] - ms[0], 1),
            "turn5_prompt_tokens": statistics.median(lengths),
            "ttft_ms_same_length_unshared": round(statistics.median(unshared) * 1e3, 1),
            "prefix_hits": after.prefix_hits - before.prefix_hits,
            "prefix_tokens_reused": after.prefix_tokens_reused - before.prefix_tokens_reused,
            "continuation_graphs": len(getattr(engine.runner, "continued_graphs", {})),
            "repeats": repeats,
        }

    def memory(self, engine=None, allocated_before: int = 0) -> dict:
        out = {"weights_gb": round(weight_bytes(self.model) / 1e9, 2)}
        if self.device.type != "cuda":
            return out
        peak = torch.cuda.max_memory_allocated(self.device)
        out |= {
            "max_allocated_gb": round(peak / 1e9, 2),
            "engine_peak_over_start_gb": round((peak - allocated_before) / 1e9, 2),
            "reserved_gb": round(torch.cuda.memory_reserved(self.device) / 1e9, 2),
        }
        if engine is not None:
            out["kv_cache_gb"] = round(engine.runner.cache.nbytes() / 1e9, 2)
        return out

    def engine_section(self, dtype_label: str, levels, method: str | None = None) -> dict:
        quick = self.args.quick
        allocated_before = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            allocated_before = torch.cuda.memory_allocated(self.device)
        started = time.monotonic()
        config = self.engine_config(dtype=dtype_label, quant_method=method)
        engine = Engine.from_model(self.model, config, stop_ids=())
        self.loop.run_until_complete(engine.start())
        result = {"start_warmup_s": round(time.monotonic() - started, 1), "graphs": len(engine.runner.graphs)}
        try:
            result["single_stream"] = self.single_stream(engine, 64 if quick else 512)
            log(f"  single stream: {result['single_stream']}")
            if dtype_label not in QUANTIZED_DTYPES and not self.args.quant_only:
                result["prefill"] = self.prefill_times(engine)
                log(f"  prefill: {result['prefill']}")
                result["multi_turn"] = self.multi_turn(engine, reply=64 if quick else 300, repeats=2 if quick else 3)
                log(f"  multi-turn (prefix cache): {result['multi_turn']}")
            result["concurrency"] = self.concurrency(engine, levels, 32 if quick else 256)
            greedy = SamplingParams(temperature=0, max_new_tokens=self.greedy_steps)
            result["greedy_tokens"] = self.loop.run_until_complete(
                self.stream_times(engine, self.reference_prompt, greedy)
            )[0]
            reference = self.results.get("engine", {}).get("greedy_tokens")
            if reference and dtype_label in QUANTIZED_DTYPES:
                result["greedy_identical_prefix_vs_bf16"] = identical_prefix(reference, result["greedy_tokens"])
            if self.device.type == "cuda" and dtype_label in QUANTIZED_DTYPES:
                result["profile"] = self.profile_step(engine.runner)  # where a quantized step's time goes
            result["memory"] = self.memory(engine, allocated_before)
        finally:
            self.loop.run_until_complete(engine.stop())
            del engine
            gc.collect()
        return result

    def eager_section(self, graph_tokens: list[int]) -> dict:
        """The eager path (no compile, no graphs, the reference matmul attention): its speed, and how
        many of its greedy tokens equal the engine's (bf16 on random weights may part ways)."""
        shipped, self.model.decode_attention = self.model.decode_attention, "matmul"
        engine = Engine.from_model(
            self.model, self.engine_config(eager=True, max_batch_size=8, max_seq_len=1024), stop_ids=()
        )
        self.loop.run_until_complete(engine.start())
        greedy = SamplingParams(temperature=0, max_new_tokens=self.greedy_steps)
        try:
            tokens, times, _ = self.loop.run_until_complete(self.stream_times(engine, self.reference_prompt, greedy))
        finally:
            self.loop.run_until_complete(engine.stop())
            self.model.decode_attention = shipped
        agree = next((i for i, (a, b) in enumerate(zip(tokens, graph_tokens)) if a != b), len(tokens))
        return {
            "decode_tokens_per_s": round((len(tokens) - 1) / (times[-1] - times[0]), 1),
            "greedy_tokens_equal_to_graph_engine": agree,
            "of": len(tokens),
        }

    def decode_microbench(self) -> dict:
        """GPU time of one decode step (CUDA graph replays, no host work) for each decode
        attention variant, and a kernel profile of each; the engine's variant again with cuBLASLt
        preferred for the weight matmuls (its algorithms for one-row products may avoid the split-K
        reduce kernels that cuBLAS adds)."""
        out, best = {}, None
        variants = [v for v in DECODE_ATTENTION if v != "auto" and (v != "triton" or triton_available())]
        for variant in variants:
            out[variant], out[f"profile_{variant}"] = self.time_decode_step(variant)
            log(f"  {variant}: {out[variant]}")
            if best is None or out[variant]["b1_kv1024_ms"] < out[best]["b1_kv1024_ms"]:
                best = variant
        used = resolve(self.args.decode_attention, self.device, self.config.head_dim)
        blas = getattr(torch.backends.cuda, "preferred_blas_library", None)
        if blas is not None:
            previous = blas()
            try:
                blas("cublaslt")
                out["cublaslt"], out["profile_cublaslt"] = self.time_decode_step(used)
                log(f"  {used} with cuBLASLt: {out['cublaslt']}")
            except Exception as error:  # an unsupported backend must not lose the section
                out["cublaslt"] = {"error": f"{type(error).__name__}: {error}"}
            finally:
                blas(previous)
        self.model.decode_attention = self.args.decode_attention  # the engine as shipped (or as asked)
        out["faster_at_batch_1"] = best
        out["engine_uses"] = used
        return out

    def time_decode_step(self, variant: str) -> tuple[dict, dict]:
        from glm4voice.llm.runner import ModelRunner

        self.model.decode_attention = variant
        runner = ModelRunner(self.model, 64, 4096, cuda_graphs=True, compile=True,
                             graph_batch_sizes=(1, 64), kv_lengths=(1024, 4096))  # fmt: skip
        runner.warm_up()
        times = {}
        for (b, kv_len), graph in sorted(runner.graphs.items()):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph.replay()
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            end.synchronize()
            times[f"b{b}_kv{kv_len}_ms"] = round(start.elapsed_time(end) / 20, 3)
        profile = self.profile_step(runner)
        del runner
        gc.collect()
        torch.cuda.empty_cache()
        return times, profile

    def profile_step(self, runner) -> dict:
        """Kernels of one compiled (not graph-replayed) decode step at batch 1, attention over 1024."""
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():
            runner._step(1, 1024)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    runner._step(1, 1024)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        device_us = [getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) for e in events]
        rows = sorted(
            ((e.key[:60], e.count / 3, us / 3 / 1e3) for e, us in zip(events, device_us)), key=lambda r: -r[2]
        )
        table = "\n".join(f"    {ms:8.3f} ms  {count:6.0f}x  {name}" for name, count, ms in rows[:18])
        log(f"  kernels of one decode step (batch 1, kv 1024), by GPU time:\n{table}")
        return {"kernels_per_step": round(sum(r[1] for r in rows)), "gpu_ms_per_step": round(sum(r[2] for r in rows), 3),
                "top": [[name, count, round(ms, 3)] for name, count, ms in rows[:12]]}  # fmt: skip

    def quant_kernels(self, methods: list[quant.Method]) -> dict:
        """One 27392x4096 layer (the largest): ms per matmul, 1 row and 300 rows, for bf16, each
        quantized method (compiled, as the engine runs it) and the fused int8's separate paths."""
        n, k = 2 * self.config.ffn_hidden_size, self.config.hidden_size
        w = torch.randn(n, k, device=self.device, dtype=torch.bfloat16) * k**-0.5
        q, scale = quant.quantize_int8(w)

        def one_row(x):
            return ((x.float()[:, None, :] * q.float()).sum(-1) * scale.float()).to(x.dtype)

        def dequant(x):
            return torch.nn.functional.linear(x, q.to(x.dtype)) * scale

        paths = {
            "bf16": lambda x: torch.nn.functional.linear(x, w),
            "int8_fused_int8pack": lambda x: torch._weight_int8pack_mm(x, q, scale),
            "int8_fused_dequant_compiled": torch.compile(dequant),
            "int8_fused_one_row_compiled": torch.compile(one_row),
        }
        for method in methods:
            if method.torchao:
                paths[method.spec.replace(":", "_") + "_compiled"] = torch.compile(_quantized_layer(w, method))
        out = {}
        for rows in (1, 300):
            x = torch.randn(rows, k, device=self.device, dtype=torch.bfloat16)
            for name, fn in paths.items():
                if name == "int8_fused_one_row_compiled" and rows != 1:
                    continue
                try:
                    fn(x)
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(10):
                        fn(x)
                    end.record()
                    end.synchronize()
                    out[f"{name}_rows{rows}_ms"] = round(start.elapsed_time(end) / 10, 3)
                except Exception as error:
                    out[f"{name}_rows{rows}"] = f"{type(error).__name__}: {str(error)[:80]}"
        return out

    def outlier_layers(self, methods: list[quant.Method]) -> dict:
        """Relative error ||y - y_ref|| / ||y_ref|| of real-size layers (gate_up 27392x4096 and down
        4096x13696; 64 input rows) per method against float32, on: plain random weights and inputs;
        activation outliers (4 input channels x100, as a few hidden channels of real LLMs are); weight
        outliers (4 input channels of the weights x100 and of the inputs /100: the same product, but
        those weights dominate their rows' scales and groups)."""
        generator = torch.Generator(device=self.device).manual_seed(7)
        shapes = {"gate_up": (2 * self.config.ffn_hidden_size, self.config.hidden_size),
                  "down": (self.config.hidden_size, self.config.ffn_hidden_size)}  # fmt: skip
        out = {}
        for layer, (n, k) in shapes.items():
            w = (torch.randn(n, k, generator=generator, device=self.device) * k**-0.5).to(torch.bfloat16)
            x = torch.randn(64, k, generator=generator, device=self.device).to(torch.bfloat16)
            channels = torch.randperm(k, generator=generator, device=self.device)[:OUTLIER_CHANNELS]
            x_act, w_out, x_in = x.clone(), w.clone(), x.clone()
            x_act[:, channels] *= OUTLIER_FACTOR
            w_out[:, channels] *= OUTLIER_FACTOR
            x_in[:, channels] /= OUTLIER_FACTOR
            cases = {"plain": (w, x), "activation_outliers": (w, x_act), "weight_outliers": (w_out, x_in)}
            out[layer] = {}
            for case, (weight, inputs) in cases.items():
                reference = inputs.float() @ weight.float().T
                errors = {"bf16": _relative_error(torch.nn.functional.linear(inputs, weight), reference)}
                for method in methods:
                    try:
                        errors[method.spec] = _relative_error(_quantized_layer(weight, method)(inputs), reference)
                    except Exception as error:
                        errors[method.spec] = f"{type(error).__name__}: {str(error)[:80]}"
                out[layer][case] = errors
            log(f"  {layer}: {out[layer]}")
        return out

    def compiled_logits_check(self) -> dict:
        ids = torch.tensor(self.reference_prompt, device=self.device)
        eager = self.model(ids)
        self.model.compile_steps()
        compiled = self.model(ids)
        self.model.eager_steps()
        self.reference_logits = eager[-8:].clone()
        cos = torch.nn.functional.cosine_similarity(eager, compiled, dim=-1)
        return {
            "min_cosine": round(cos.min().item(), 6),
            "max_abs_diff": round((eager - compiled).abs().max().item(), 4),
            "argmax_agreement": round((eager.argmax(-1) == compiled.argmax(-1)).float().mean().item(), 4),
        }

    def baseline(self, new_tokens: int) -> dict:
        """transformers GlmForCausalLM, generate() in a thread with a token streamer, batch 1."""
        from glm4voice.llm.hf_glm import queue_streamer, to_transformers_glm

        hf = to_transformers_glm(self.model)
        hf.generation_config.eos_token_id = None

        prompt = torch.tensor([self.prompt(300)], device=self.device)
        runs = []
        for tokens_wanted in (8, new_tokens):  # the first run warms up
            streamer = queue_streamer()
            kwargs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens_wanted,
                          do_sample=True, streamer=streamer, **SAMPLING)  # fmt: skip
            failure: list[BaseException] = []
            submitted = time.perf_counter()
            thread = threading.Thread(target=_generate_streaming, args=(hf, kwargs, streamer, failure))
            thread.start()
            times = []
            while streamer.queue.get() is not None:
                times.append(time.perf_counter())
            thread.join()
            if failure:
                raise RuntimeError("transformers' generate failed") from failure[0]
            runs.append((times, submitted))
        times, submitted = runs[-1]
        del hf
        gc.collect()
        return {
            "new_tokens": len(times),
            "decode_tokens_per_s": round((len(times) - 1) / (times[-1] - times[0]), 1),
            "ttft_ms": round((times[0] - submitted) * 1e3, 1),
        }

    def loader(self) -> dict:
        """Write the model as published-format shards, load them back, compare."""
        folder = Path(tempfile.mkdtemp(prefix="glm4voice-9b-"))
        try:
            started = time.monotonic()
            from safetensors.torch import save_file

            names = published_key_names(self.model)
            params = dict(self.model.named_parameters())
            keys = list(names)
            shards, weight_map = 4, {}
            per = -(-len(keys) // shards)
            for s in range(shards):
                file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
                part = {k: params[names[k]].detach().to("cpu") for k in keys[s * per : (s + 1) * per]}
                save_file(part, str(folder / file), metadata={"format": "pt"})
                weight_map |= {k: file for k in part}
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
            raw = PUBLISHED_CONFIG if self.args.config == "published" else _chatglm_dict(self.config)
            (folder / "config.json").write_text(json.dumps(raw))
            write_s = time.monotonic() - started
            self.sync()
            started = time.monotonic()
            loaded = load_model(folder, device=self.device, dtype=self.model.dtype)
            self.sync()
            load_s = time.monotonic() - started
            logits = loaded.model(torch.tensor(self.reference_prompt, device=self.device))[-8:]
            same = torch.equal(logits, self.reference_logits)
            del loaded, logits
            gc.collect()
            return {"write_s": round(write_s, 1), "load_s": round(load_s, 1), "logits_identical": same,
                    "shard_gb": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9, 2)}  # fmt: skip
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def reference_scores(self) -> dict:
        """bf16's next-token logits along its own greedy answer (the engine's 256 tokens after the
        64-token reference prompt): what every quantized variant is scored against."""
        tokens = self.results.get("engine", {}).get("greedy_tokens")
        if not tokens:
            raise RuntimeError("the bf16 engine section gave no greedy tokens")
        self.reference_answer = tokens
        self.reference_scored = self.teacher_forced(self.model, tokens)
        return {"positions": len(tokens)}

    def teacher_forced(self, model, answer: list[int]) -> torch.Tensor:
        """float32 logits [len(answer), vocab] that predicted each token of ``answer`` after the reference prompt."""
        model.eager_steps()
        ids = torch.tensor(self.reference_prompt + list(answer), device=self.device)
        n = len(self.reference_prompt)
        return model(ids)[n - 1 : n - 1 + len(answer)]

    def quant_quality(self) -> dict:
        """The quantized model against bf16 along bf16's greedy answer: top-1 agreement, mean KL and
        the logits' cosine (random weights: a broken kernel shows KL > 1 and cosines near 0)."""
        scored = self.teacher_forced(self.model, self.reference_answer)
        comparison = compare_next_token(self.reference_scored, scored)
        cosine = torch.nn.functional.cosine_similarity(self.reference_scored, scored, dim=-1)
        return {"positions": comparison.positions, "top1_agreement": round(comparison.top1_agreement, 4),
                "mean_kl": round(comparison.mean_kl, 5), "min_cosine": round(cosine.min().item(), 5),
                "mean_cosine": round(cosine.mean().item(), 5)}  # fmt: skip

    def quant_variant(self, method: quant.Method, dtype: torch.dtype, levels) -> None:
        """Build, score and serve one quantized variant; then free it."""
        key = method.spec.replace(":", "_")
        try:
            quant.check_supported(method.dtype, self.device, method.name)
        except quant.QuantizationUnsupported as error:
            self.run_results.record(f"engine_{key}", {"skipped": str(error)})
            return
        build = self.section(f"build_{key}", lambda: self.build(dtype, method), 20)
        if "weight_gb" in build:
            if hasattr(self, "reference_scored"):
                self.section(f"quality_{key}", self.quant_quality, 5)
            self.section(f"engine_{key}", lambda: self.engine_section(method.dtype, levels, method.name), 80)
        self.model = self.reference_model
        gc.collect()
        torch.cuda.empty_cache() if self.device.type == "cuda" else None

    # --- the run ------------------------------------------------------------------------------------
    def run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.greedy_steps = 48 if self.args.quick else 256
        levels = tuple(int(n) for n in self.args.streams.split(","))
        quant_only = self.args.quant_only
        if quant_only:
            levels = QUANT_LEVELS
        methods = [quant.parse_spec(spec) for spec in self.args.quant]
        self.reference_prompt = self.prompt(64)
        self.section("machine", self.machine, 0)
        if self.args.inductor_tuning:
            from torchao.quantization.utils import recommended_inductor_config_setter

            recommended_inductor_config_setter()
        self.section("bandwidth", self.bandwidth, 5)
        dtype = torch.float16 if self.args.dtype == "float16" else torch.bfloat16
        if self.device.type == "cpu" and self.args.dtype == "float32":
            dtype = torch.float32
        self.section("build", lambda: self.build(dtype), 10)
        self.reference_model = self.model
        self.model.decode_attention = self.args.decode_attention
        if not quant_only:
            self.section("compiled_vs_eager_logits", self.compiled_logits_check, 60)
            if self.device.type == "cuda":
                self.section("decode_microbench", self.decode_microbench, 90)
        self.section("engine", lambda: self.engine_section(self.args.dtype, levels), 150)
        if not quant_only:
            graph_tokens = self.results.get("engine", {}).get("greedy_tokens", [])
            self.section("eager_fallback", lambda: self.eager_section(graph_tokens), 20)
            self.section("baseline_hf_generate", lambda: self.baseline(32 if self.args.quick else 64), 30)
        if methods:
            self.section("reference_scores", self.reference_scores, 5)
            runnable = [m for m in methods if _runs_on(m, self.device)]
            if self.device.type == "cuda":
                self.section("quant_kernels", lambda: self.quant_kernels(runnable), 60)
            every = [m for m in quant.METHODS if _runs_on(m, self.device)]  # layer-level: cheap, so all of them
            self.section("outlier_layers", lambda: self.outlier_layers(every), 20)
            for method in methods:
                self.quant_variant(method, dtype, tuple(n for n in levels if n in QUANT_LEVELS))
        if self.args.loader and not quant_only:
            self.section("loader_full_size", self.loader, 90)
        self.summary()

    def summary(self) -> None:
        r = self.results
        log("\n=== summary ===")
        log(json.dumps(r.get("machine", {})))
        for key in ("bandwidth", "compiled_vs_eager_logits", "decode_microbench", "eager_fallback", "baseline_hf_generate",
                    "quant_kernels", "outlier_layers", "loader_full_size"):  # fmt: skip
            log(f"{key}: {json.dumps(r.get(key))}")
        for key in ["engine"] + [k for k in r if k.startswith("engine_")]:
            e = r.get(key, {})
            log(f"{key}: start {e.get('start_warmup_s')} s, graphs {e.get('graphs')}, error {e.get('error')}"
                f"{', skipped: ' + e['skipped'] if 'skipped' in e else ''}")  # fmt: skip
            log(f"  single: {json.dumps(e.get('single_stream'))}")
            if e.get("prefill"):
                log(f"  prefill: {json.dumps(e.get('prefill'))}")
                log(f"  multi-turn: {json.dumps(e.get('multi_turn'))}")
            for n, c in (e.get("concurrency") or {}).items():
                log(f"  {n:>3} streams: {json.dumps(c)}")
            log(f"  memory: {json.dumps(e.get('memory'))}")
            quality = r.get("quality_" + key.removeprefix("engine_"))
            if quality:
                log(f"  vs bf16: {json.dumps(quality)}, greedy identical prefix "
                    f"{e.get('greedy_identical_prefix_vs_bf16')} of {self.greedy_steps}")  # fmt: skip
        self.headline()

    def headline(self) -> None:
        """The figures of the issues' bars, one line each."""
        r = self.results
        engine = r.get("engine", {})
        single = engine.get("single_stream") or {}
        micro = r.get("decode_microbench", {})
        used = micro.get("engine_uses") or single.get("decode_attention")
        profile = micro.get(f"profile_{used}") or {}
        log("\n=== headline ===")
        log(f"single-stream decode: {single.get('decode_tokens_per_s')} tokens/s "
            f"(bound {single.get('bound_tokens_per_s_at_copy_bw')}, fraction {single.get('fraction_of_bound')}), "
            f"attention {used}")  # fmt: skip
        if micro:
            log(f"decode step (batch 1, kv 1024): {profile.get('kernels_per_step')} kernels, "
                f"{profile.get('gpu_ms_per_step')} ms of kernel time; "
                f"graph replay {micro.get(used, {}).get('b1_kv1024_ms')} ms")  # fmt: skip
        for n in ("32", "64"):
            c = (engine.get("concurrency") or {}).get(n) or {}
            if c:
                log(f"{n} streams: per-stream median {c.get('per_stream_tokens_per_s_median')} / min "
                    f"{c.get('per_stream_tokens_per_s_min')} tokens/s, steady aggregate "
                    f"{c.get('steady_aggregate_tokens_per_s')}, decode step {c.get('decode_step_ms')} ms")  # fmt: skip
        turns = engine.get("multi_turn") or {}
        if turns:
            log(f"multi-turn TTFT per turn (ms): {turns.get('ttft_ms_median_per_turn')}; 5th - 1st: "
                f"{turns.get('turn5_minus_turn1_ms')} ms (history {turns.get('turn5_prompt_tokens')} tokens; "
                f"without the cache {turns.get('ttft_ms_same_length_unshared')} ms)")  # fmt: skip
        eager = r.get("eager_fallback", {})
        if eager:
            log(f"greedy tokens equal to the eager path: {eager.get('greedy_tokens_equal_to_graph_engine')} "
                f"of {eager.get('of')}")  # fmt: skip
        self.quant_headline()

    def quant_headline(self) -> None:
        """Quantized variants against bf16 and issue 17's bars; the int8 decision."""
        r = self.results
        variants = [k.removeprefix("engine_") for k in r if k.startswith("engine_")]
        if not variants:
            return
        log("--- quantized weights (same run, same random weights as bf16) ---")
        rows = {self.args.dtype: r.get("engine", {})} | {v.replace("_", ":", 1): r[f"engine_{v}"] for v in variants}
        for name, e in rows.items():
            if "skipped" in e or "error" in e:
                log(f"{name}: {e.get('skipped') or e.get('error')}")
                continue
            single = (e.get("single_stream") or {}).get("decode_tokens_per_s")
            c32 = (e.get("concurrency") or {}).get("32") or {}
            weights = (e.get("memory") or {}).get("weights_gb")
            line = (f"{name}: single {single} tok/s; 32 streams per-stream median "
                    f"{c32.get('per_stream_tokens_per_s_median')} / min {c32.get('per_stream_tokens_per_s_min')} tok/s; "
                    f"weights {weights} GB")  # fmt: skip
            bars = QUANT_BARS.get(name.split(":")[0])
            if bars:
                checks = [_bar("single", single, bars["single_tokens_per_s"], above=True),
                          _bar("weights", weights, bars["weights_gb"], above=False)]  # fmt: skip
                if "per_stream_32_min" in bars:
                    checks.append(_bar("32-stream min", c32.get("per_stream_tokens_per_s_min"), bars["per_stream_32_min"],
                                       above=True))  # fmt: skip
                line += "; bars: " + ", ".join(checks)
            quality = r.get("quality_" + name.replace(":", "_"))
            if quality:
                line += (f"; vs bf16: top-1 {quality.get('top1_agreement')}, mean KL {quality.get('mean_kl')}, min cosine "
                         f"{quality.get('min_cosine')}, greedy identical prefix {e.get('greedy_identical_prefix_vs_bf16')}"
                         f"/{self.greedy_steps}")  # fmt: skip
            log(line)
        fused, ao = r.get("engine_int8_fused", {}), r.get("engine_int8_torchao", {})
        if fused.get("single_stream") and ao.get("single_stream"):
            a, b = fused["single_stream"]["decode_tokens_per_s"], ao["single_stream"]["decode_tokens_per_s"]
            a32 = ((fused.get("concurrency") or {}).get("32") or {}).get("per_stream_tokens_per_s_median")
            b32 = ((ao.get("concurrency") or {}).get("32") or {}).get("per_stream_tokens_per_s_median")
            faster = b >= a and (a32 is None or b32 is None or b32 >= a32)
            log(f"int8 decision: torchao {b} vs fused {a} tok/s single, {b32} vs {a32} tok/s per stream at 32: "
                + ("torchao is at least as fast: make int8:torchao the default, delete FusedInt8Linear"
                   if faster else "keep int8:fused"))  # fmt: skip
        dynamic, one_row = r.get("engine_fp8_dynamic", {}), r.get("engine_fp8_one_row", {})
        if dynamic.get("single_stream") and one_row.get("single_stream"):
            a, b = dynamic["single_stream"]["decode_tokens_per_s"], one_row["single_stream"]["decode_tokens_per_s"]
            # 32 streams: the decode step (one_row changes one-row products only; the slowest stream's rate
            # also holds the other streams' prefills, which vary from run to run)
            a32 = ((dynamic.get("concurrency") or {}).get("32") or {}).get("decode_step_ms")
            b32 = ((one_row.get("concurrency") or {}).get("32") or {}).get("decode_step_ms")
            faster = b > a and (a32 is None or b32 is None or b32 <= 1.03 * a32)
            log(f"fp8 decision: one_row {b} vs dynamic {a} tok/s single, decode step at 32 streams {b32} vs {a32} ms: "
                + ("fp8:one_row (the default) is faster: keep it" if faster else
                   "fp8:dynamic was as fast in this run: if a second run agrees, make it the default (DEFAULT_METHODS)"))  # fmt: skip
        outliers = r.get("outlier_layers") or {}
        for layer, cases in outliers.items() if isinstance(outliers, dict) else ():
            if not isinstance(cases, dict) or "activation_outliers" not in cases:
                continue
            act, plain, wout = cases["activation_outliers"], cases["plain"], cases["weight_outliers"]
            int4 = [s for s in act if s.startswith("int4")]
            checks = [_bar(f"{s} activation outliers", act[s], INT4_ACTIVATION_OUTLIER_BAR, above=False) for s in int4
                      if isinstance(act[s], float)]  # fmt: skip
            log(f"outliers, {layer}: relative error plain {_fmt(plain)}; activation outliers {_fmt(act)}; "
                f"weight outliers {_fmt(wout)}" + ("; bars: " + ", ".join(checks) if checks else ""))  # fmt: skip


def _bar(name: str, value, bar: float, above: bool) -> str:
    if value is None:
        return f"{name} n/a"
    ok = value >= bar if above else value <= bar
    return f"{name} {'>=' if above else '<='} {bar}: {'met' if ok else 'NOT met'}"


def _fmt(errors: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in errors.items())


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return round(((y.float() - reference).norm() / reference.norm()).item(), 5)


def _generate_streaming(model, kwargs: dict, streamer, failure: list) -> None:
    """``model.generate(**kwargs)`` into ``streamer``, which also ends (with the error in ``failure``) if
    generate fails: transformers ends a streamer only on success."""
    try:
        model.generate(**kwargs)
    except BaseException as error:
        failure.append(error)
        streamer.queue.put(None)


def _quantized_layer(weight: torch.Tensor, method: quant.Method) -> Linear:
    """A Linear holding ``weight`` quantized with ``method``: the module the model's gate_up layer would
    get (the layer name decides fp8:one_row's path)."""
    holder = torch.nn.Module()
    with torch.device("meta"):
        holder.add_module("gate_up", Linear(weight.shape[1], weight.shape[0], bias=False))
    quant.quantize_linear(holder, "gate_up", weight, method)
    return holder.gate_up


def _runs_on(method: quant.Method, device: torch.device) -> bool:
    try:
        quant.check_supported(method.dtype, device, method.name)
        return True
    except quant.QuantizationUnsupported:
        return False


def default_quant(device: str, quant_only: bool) -> str:
    """With --quant-only: fp8 and int4 (the bars first: a run cut short by its budget still has them), then
    int8 both ways (the int8 decision), where this device runs them; else int8."""
    wanted = ["fp8", "int4", "int8:torchao", "int8:fused"] if quant_only else ["int8"]
    return ",".join(spec for spec in wanted if _runs_on(quant.parse_spec(spec), torch.device(device)))


def _chatglm_dict(config: GLMConfig) -> dict:
    return PUBLISHED_CONFIG | {
        "hidden_size": config.hidden_size, "num_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "multi_query_group_num": config.num_kv_heads, "kv_channels": config.head_dim,
        "ffn_hidden_size": config.ffn_hidden_size, "padded_vocab_size": config.vocab_size,
        "layernorm_epsilon": config.layernorm_epsilon, "seq_length": config.seq_length,
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="published")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="fewer tokens per measurement")
    parser.add_argument("--decode-attention", choices=DECODE_ATTENTION, default="auto",
                        help="the engine's decode attention (the microbench measures every backend)")  # fmt: skip
    parser.add_argument("--streams", default="1,8,32,64", help="concurrency levels (comma-separated)")
    parser.add_argument("--quant", default=None,
                        help="quantized variants beside bf16, comma-separated DTYPE[:METHOD] (glm4voice.llm.quant.METHODS), "
                             "or 'none'; default: int8, or with --quant-only int8:fused, int8:torchao, fp8 and int4 "
                             "where the device runs them")  # fmt: skip
    parser.add_argument("--quant-only", action="store_true",
                        help="bf16 and the --quant variants only: single stream, 32 streams, quality, memory")  # fmt: skip
    parser.add_argument("--inductor-tuning", action="store_true",
                        help="torchao's recommended inductor settings (coordinate-descent tuning; longer compiles)")  # fmt: skip
    parser.add_argument("--no-loader", dest="loader", action="store_false")
    parser.add_argument("--budget-s", type=float, default=540, help="skip sections that would run past this")
    parser.add_argument("--out", help="write the results as JSON here (after every section)")
    args = parser.parse_args(argv)
    if args.quant is None:
        args.quant = default_quant(args.device, args.quant_only)
    args.quant = [] if args.quant in ("", "none") else [spec.strip() for spec in args.quant.split(",") if spec.strip()]
    try:
        for spec in args.quant:
            quant.parse_spec(spec)
    except ValueError as error:
        parser.error(f"--quant: {error}")
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
