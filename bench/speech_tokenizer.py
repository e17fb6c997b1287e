"""Speech tokenizer throughput: seconds of audio tokenized per second, tokens/s, real-time factor.

    python -m bench.speech_tokenizer                          # full-size config, CUDA if available
    python -m bench.speech_tokenizer --device cpu --batch-sizes 1 --iters 2
    python -m bench.speech_tokenizer --config tiny --device cpu
    python -m bench.speech_tokenizer --compare-dtypes         # codes that bf16 / TF32 change

(from the repository root; or ``python bench/speech_tokenizer.py`` after ``pip install -e .``)

Random weights in the published layout (``config.json`` of THUDM/glm-4-voice-tokenizer; 16 of 32
Whisper-large-v3 encoder layers, 16384 codes). Each utterance is ``--seconds`` of a synthetic
voiced signal (default 30 s: one full Whisper window, the most work per piece). "end-to-end" is
``SpeechTokenizer.tokenize_batch`` on 16 kHz float arrays (log-mel features + encoder + code
search + copies); "encoder" is the model call alone on prepared features.
"""

from __future__ import annotations

import argparse
import functools
import math
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from bench.common import machine_info, machine_line, timed
from glm4voice.audio import INPUT_SAMPLE_RATE, SPEECH_TOKEN_RATE
from glm4voice.checkpoints.speech_tokenizer import (
    PUBLISHED_PREPROCESSOR_CONFIG,
    init_random_weights,
    published_config,
    tiny_config,
)
from glm4voice.devices import default_device
from speech_tokenizer import SpeechTokenizer, TokenizerOptions, WhisperVQEncoder


def voiced_signal(seconds: float, seed: int) -> np.ndarray:
    """Gliding harmonics with a syllable-rate envelope and a little noise (deterministic)."""
    rng = np.random.default_rng(seed)
    time_axis = np.arange(int(seconds * INPUT_SAMPLE_RATE)) / INPUT_SAMPLE_RATE
    f0 = 110.0 + (40.0 * seed) % 90.0
    phase = 2 * np.pi * (f0 * time_axis - 50.0 * np.cos(2 * np.pi * 0.6 * time_axis) / (2 * np.pi * 0.6))
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * (2.5 + 0.1 * seed) * time_axis)) ** 2
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(len(time_axis))).astype(np.float32)


def build(config_name: str, device: torch.device, seed: int = 0) -> SpeechTokenizer:
    from transformers import WhisperFeatureExtractor

    config = published_config() if config_name == "full" else tiny_config(published_config().quantize_vocab_size)
    with torch.device("meta"):
        model = WhisperVQEncoder(config)
    model.to_empty(device=device).eval().requires_grad_(False)
    init_random_weights(model, seed)
    return SpeechTokenizer(
        model, WhisperFeatureExtractor(**PUBLISHED_PREPROCESSOR_CONFIG), TokenizerOptions(batch_size=64)
    )


def prepared_features(tokenizer: SpeechTokenizer, waves: list[np.ndarray]):
    fe = tokenizer.feature_extractor
    out = fe(
        waves, sampling_rate=INPUT_SAMPLE_RATE, padding="longest", pad_to_multiple_of=tokenizer.samples_per_token,
        return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    return out["input_features"].to(tokenizer.device), out["attention_mask"].to(tokenizer.device)


def throughput(tokenizer: SpeechTokenizer, batch: int, seconds: float, iters: int, warmup: int) -> dict[str, float]:
    device = tokenizer.device
    waves = [voiced_signal(seconds, seed) for seed in range(batch)]
    audio_seconds = batch * seconds
    tokens = batch * math.ceil(len(waves[0]) / tokenizer.samples_per_token)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    e2e = timed(lambda: tokenizer.tokenize_batch([(w, INPUT_SAMPLE_RATE) for w in waves]), device, iters, warmup)
    features, mask = prepared_features(tokenizer, waves)
    with torch.inference_mode():
        encoder = timed(lambda: tokenizer.model(features, mask), device, iters, warmup)
    e2e_s, enc_s = statistics.median(e2e), statistics.median(encoder)
    result = {
        "audio_s_per_s": audio_seconds / e2e_s,
        "tokens_per_s": tokens / e2e_s,
        "rtf": e2e_s / audio_seconds,
        "latency_ms": 1000 * e2e_s,
        "encoder_audio_s_per_s": audio_seconds / enc_s,
        "encoder_ms": 1000 * enc_s,
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def compare_dtypes(config_name: str, device: torch.device, batch: int, seconds: float, iters: int, warmup: int) -> None:
    """Codes under lower precision vs strict float32 (same random weights, same audio)."""
    waves = [voiced_signal(seconds, seed) for seed in range(batch)]
    modes = [("fp32 strict (no TF32)", torch.float32, False, False)]
    if device.type == "cuda":
        modes += [
            ("fp32 default (cuDNN conv TF32)", torch.float32, False, True),
            ("tf32 (matmul+conv)", torch.float32, True, True),
            ("bf16 encoder, fp32 code search", torch.bfloat16, False, True),
        ]
    else:
        modes += [("bf16 encoder, fp32 code search", torch.bfloat16, False, False)]
    base = build(config_name, device)
    state = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    reference = None
    print(f"\ncodes vs strict fp32, {batch} x {seconds:g} s, {config_name} config, {device}:")
    print(f"  {'mode':34s} {'codes differing':>22s} {'encoder audio s/s':>18s}")
    for name, dtype, matmul_tf32, conv_tf32 in modes:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = conv_tf32
        with torch.device("meta"):
            model = WhisperVQEncoder(base.model.config)
        model.load_state_dict(state, assign=True)
        model.eval().requires_grad_(False).to(device)
        for key, parameter in model.named_parameters():
            if key != "codebook.weight":  # the code search stays float32, as from_pretrained(dtype=...) does
                parameter.data = parameter.data.to(dtype)
        tok = SpeechTokenizer(model, base.feature_extractor, TokenizerOptions(batch_size=64))
        codes = np.concatenate([np.array(c) for c in tok.tokenize_batch([(w, INPUT_SAMPLE_RATE) for w in waves])])
        features, mask = prepared_features(tok, waves)
        with torch.inference_mode():
            run = functools.partial(model, features.to(dtype), mask)
            enc = statistics.median(timed(run, device, iters, warmup))
        if reference is None:
            reference = codes
        differing = int((codes != reference).sum())
        print(
            f"  {name:34s} {differing:>7d} of {len(codes):<6d} ({100 * differing / len(codes):5.2f}%) {batch * seconds / enc:18.1f}"
        )
        if dtype == torch.float32 and conv_tf32 == (device.type == "cuda"):  # the default settings
            singles = np.concatenate([np.array(tok.tokenize((w, INPUT_SAMPLE_RATE))) for w in waves])
            batched_vs_single = int((singles != codes).sum())
            print(f"  {'  same, one utterance per call':34s} {batched_vs_single:>7d} differ from the batched run")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--config", choices=("full", "tiny"), default="full")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,16 on CUDA, 1 on CPU)")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per utterance")
    parser.add_argument("--iters", type=int, default=None, help="timed repetitions (default 10 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compare-dtypes", action="store_true", help="also count codes that bf16 / TF32 change")
    parser.add_argument("--compare-batch", type=int, default=16)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,16" if cuda else "1")).split(",")]
    iters = args.iters or (10 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    torch.manual_seed(0)

    print("bench/speech_tokenizer.py")
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("machine:", machine_line(machine_info(device)))
    start = time.perf_counter()
    tokenizer = build(args.config, device)
    config = tokenizer.model.config
    params = sum(p.numel() for p in tokenizer.model.parameters())
    print(
        f"model: {args.config} config, d_model {config.d_model}, {config.quantize_position} layers built "
        f"(of {config.encoder_layers}), {config.quantize_vocab_size} codes, {params / 1e6:.1f} M parameters, "
        f"{tokenizer.model.dtype}, random weights (built in {time.perf_counter() - start:.1f} s); "
        f"{tokenizer.samples_per_token} samples/token = {SPEECH_TOKEN_RATE} tokens/s of audio"
    )
    print(f"input: {args.seconds:g} s per utterance, median of {iters} runs after {warmup} warm-up\n")
    header = f"{'batch':>5s} {'audio s/s':>10s} {'tokens/s':>10s} {'RTF':>8s} {'latency ms':>11s} {'encoder audio s/s':>18s} {'encoder ms':>11s}"
    print(header + (f" {'peak GPU MiB':>13s}" if cuda else ""))
    for batch in batch_sizes:
        r = throughput(tokenizer, batch, args.seconds, iters, warmup)
        line = (
            f"{batch:5d} {r['audio_s_per_s']:10.1f} {r['tokens_per_s']:10.0f} {r['rtf']:8.4f} {r['latency_ms']:11.1f} "
            f"{r['encoder_audio_s_per_s']:18.1f} {r['encoder_ms']:11.1f}"
        )
        print(line + (f" {r['peak_gpu_mib']:13.0f}" if cuda else ""), flush=True)
    if args.compare_dtypes:
        del tokenizer
        compare_dtypes(args.config, device, args.compare_batch, args.seconds, iters, warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
