"""Decode attention backends: the pure-torch paths agree, the dispatch picks the right one, and the
Triton split-K kernel equals the reference (on the CPU through Triton's interpreter when Triton is
installed; on the GPU in test_engine_gpu.py)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glm4voice.llm import decode_attention as attention

ROOT = Path(__file__).resolve().parents[3]


def cache_layer(b, kv_heads, group, head_dim, dtype=torch.float32, slots=5, capacity=300, seed=0):
    """Queries [b, KV, G, d] and one layer of a cache laid out like KVCache's, [2, slots, KV, capacity, d]."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.randn(2, slots, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    q = torch.randn(b, kv_heads, group, head_dim, generator=generator).to(dtype)
    return q, layer


def reference(q, layer, slots, positions, kv_len):
    """Plain per-row, per-head softmax attention in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        n = min(int(positions[i]) + 1, kv_len)
        k, v = layer[0, int(slots[i]), :, :n].double(), layer[1, int(slots[i]), :, :n].double()  # [KV, n, d]
        weights = torch.softmax(q[i].double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        out[i] = weights @ v
    return out


@pytest.mark.parametrize("backend", ["matmul", "sdpa"])
@pytest.mark.parametrize("slots", [[0, 1, 2], [4, 0, 2]], ids=["slots-in-order", "any-slots"])
def test_torch_backends_equal_the_reference(backend, slots):
    q, layer = cache_layer(b=3, kv_heads=2, group=4, head_dim=16)
    slots, positions = torch.tensor(slots), torch.tensor([0, 17, 299])  # the last row is idle: sees all 40
    out = attention.attend(backend, q, layer, slots, positions, 40, 16**-0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference(q, layer, slots, positions, 40), rtol=1e-5, atol=1e-5)


def test_auto_resolves_by_device_and_triton(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert attention.resolve("auto", cpu, 128) == "matmul"
    monkeypatch.setattr(attention, "triton_available", lambda: True)
    assert attention.resolve("auto", cuda, 128) == "triton"
    assert attention.resolve("auto", cuda, 96) == "matmul"  # not a power of two
    assert attention.resolve("auto", cpu, 128) == "matmul"
    monkeypatch.setattr(attention, "triton_available", lambda: False)
    assert attention.resolve("auto", cuda, 128) == "matmul"
    assert attention.resolve("sdpa", cuda, 128) == "sdpa"
    with pytest.raises(ValueError, match="decode attention"):
        attention.resolve("flash", cpu, 128)


@pytest.mark.parametrize("rows, kv_len", [(2, 1), (2, 64), (2, 1024), (2, 8192), (128, 4096), (128, 256), (7, 300)])
def test_split_plan_covers_every_position_once(rows, kv_len):
    splits, per_split = attention.split_plan(rows, kv_len)
    assert per_split % attention.BLOCK_N == 0 and splits >= 1
    assert (splits - 1) * per_split < kv_len <= splits * per_split  # no empty trailing split
    blocks = -(-kv_len // attention.BLOCK_N)
    # enough programs for one stream, but never more than MAX_SPLITS (kernel 2 merges them one by one)
    most = min(blocks, attention.MAX_SPLITS)
    assert splits <= most and (rows * splits >= attention.TARGET_PROGRAMS or splits == most)


def test_model_decode_uses_the_resolved_backend(tiny_llm, monkeypatch):
    """The decode step asks the dispatch (with the model's setting and device) and calls that backend."""
    calls = []
    real = attention.attend
    monkeypatch.setattr(attention, "attend", lambda backend, *a, **k: calls.append(backend) or real(backend, *a, **k))
    model = tiny_llm.model
    from glm4voice.llm.model import KVCache

    cache = KVCache.allocate(model.config, 3, 16, torch.float32, "cpu")
    rope = model.rope_tables(17)
    with torch.inference_mode():
        for setting in ("auto", "sdpa"):
            model.decode_attention = setting
            model.decode(torch.tensor([3, 4]), torch.tensor([0, 16]), cache, rope, kv_len=8, slots=torch.tensor([2, 0]))
    model.decode_attention = "auto"
    layers = model.config.num_layers
    assert calls == ["matmul"] * layers + ["sdpa"] * layers


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from glm4voice.llm import decode_attention as attention
    from tests.glm4voice.llm.test_decode_attention import cache_layer, reference

    cases = [  # b, KV, G, d, kv_len, slots, positions
        (1, 2, 16, 32, 200, [3], [150]),
        (3, 2, 2, 16, 300, [0, 1, 2], [0, 63, 299]),
        (2, 1, 4, 16, 5, [4, 1], [2, 299]),
        (4, 2, 8, 32, 130, [2, 0, 4, 1], [129, 64, 65, 1]),
    ]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for b, kv, g, d, kv_len, slots, positions in cases:
            q, layer = cache_layer(b, kv, g, d, dtype=dtype)
            slots, positions = torch.tensor(slots), torch.tensor(positions)
            out = attention.attend_triton(q, layer[0], layer[1], slots, positions, kv_len, d**-0.5)
            expected = reference(q, layer, slots, positions, kv_len)
            assert out.dtype == dtype and out.shape == q.shape
            error = (out.double() - expected).abs().max().item()
            assert error < tolerance, (dtype, b, kv, g, d, kv_len, error)

    # a continued prefill chunk (each row a query at its own position) equals the masked-SDPA path
    from glm4voice.llm.checkpoint import random_model
    from glm4voice.llm.config import GLMConfig
    from glm4voice.llm.model import KVCache

    config = GLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden_size=128,
                       vocab_size=256, layernorm_epsilon=1e-6, seq_length=256)
    model = random_model(config, "cpu", torch.float32, seed=1)
    rope = model.rope_tables(129)
    history = torch.arange(1, 71) % 250
    ids = torch.tensor([9, 8, 7, 6, 5, 0, 0, 0])  # 5 real ids, 3 padding
    calls = []
    kernel = attention.attend_triton
    attention.attend_triton = lambda *args: calls.append(args[0].shape) or kernel(*args)
    with torch.inference_mode():
        results = {}
        for backend in ("matmul", "triton"):
            model.decode_attention = backend
            cache = KVCache.allocate(config, 2, 128, torch.float32, "cpu")
            model.prefill(history, cache, 1, 0, rope)
            logits = model.prefill_continued_chunk(ids, torch.tensor([1, 70, 5]), cache, rope, 128)
            results[backend] = logits, cache.kv[:, :, 1, :, :75].clone()
    assert calls == [(8, 2, 2, 16)] * config.num_layers, calls  # every row of every layer, in one call each
    assert (results["triton"][0] - results["matmul"][0]).abs().max().item() < 1e-4
    torch.testing.assert_close(results["triton"][1], results["matmul"][1], rtol=1e-5, atol=1e-5)
    print("triton interpreter ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_equals_the_reference_in_the_interpreter():
    """The Triton kernels run by Triton's CPU interpreter (set before Triton is imported, hence the
    subprocess): split-K partials and their merge equal plain attention, padded query groups,
    several splits, rows on any slots, rows that see one position and idle rows that see all; and a
    continued prefill chunk through them equals its masked-SDPA path."""
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "triton interpreter ok" in result.stdout
