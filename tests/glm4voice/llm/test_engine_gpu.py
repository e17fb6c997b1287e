"""CUDA graphs (decode steps and whole-prompt prefills) and torch.compile give the same tokens as
eager mode (GPU only).

Self-contained (a random tiny model made on the GPU, no fixtures), so it also runs with
``pytest --noconftest`` on a machine without the audio packages."""

import asyncio

import pytest
import torch

from glm4voice.llm.checkpoint import random_model
from glm4voice.llm.config import GLMConfig
from glm4voice.llm.engine import Engine, EngineConfig, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = GLMConfig(hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=32, ffn_hidden_size=256,
                 vocab_size=4096, layernorm_epsilon=1e-6, seq_length=1024)  # fmt: skip
PROMPTS = [[5, 9, 13], list(range(100, 171)), [7] * 12, [3000, 2, 4000, 44, 9], list(range(500, 530)), [1],
           list(range(2000, 2300, 3)), [4000, 3999, 600, 601, 602, 603, 11]]  # fmt: skip


async def _collect(stream) -> list[int]:
    return [token async for token in stream]


async def _generate(model, params, **config) -> tuple[list[list[int]], list[list[int]]]:
    options = dict(device="cuda", dtype="float32", max_batch_size=8, max_seq_len=512, prefill_chunk=32,
                   cuda_graph_batch_sizes=(1, 2, 4, 8))  # fmt: skip
    async with Engine.from_model(model, EngineConfig(**(options | config)), stop_ids=()) as engine:
        alone = [await _collect(engine.submit(p, params)) for p in PROMPTS]
        streams = [engine.submit(p, params) for p in PROMPTS]
        together = await asyncio.gather(*(_collect(s) for s in streams))
        if config.get("eager") is not True:
            assert engine.runner.graphs, "no CUDA graph was captured"
            assert sorted(engine.runner.prefill_graphs) == [32], "no prefill graph (prompts of <= 32 ids) was captured"
    return alone, list(together)


@pytest.mark.parametrize("attention", ["sdpa", "matmul", "triton"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=24),
                                    SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=24, seed=7)])  # fmt: skip
def test_graphs_and_compile_equal_eager(params, attention):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_model(TINY, "cuda", torch.float32, seed=1)
    model.decode_attention = attention
    eager_alone, eager_together = asyncio.run(_generate(model, params, eager=True))
    graph_alone, graph_together = asyncio.run(_generate(model, params, compile=False))
    compiled_alone, compiled_together = asyncio.run(_generate(model, params, compile=True))
    assert eager_alone == eager_together
    assert graph_alone == graph_together == eager_alone
    assert compiled_alone == compiled_together == eager_alone


def test_bfloat16_compiled_prefill_close_to_eager():
    model = random_model(TINY, "cuda", torch.bfloat16, seed=2)
    ids = torch.tensor(PROMPTS[6], device="cuda")
    eager = model(ids)
    model.compile_steps()
    try:
        compiled = model(ids)
    finally:
        model.eager_steps()
    assert torch.nn.functional.cosine_similarity(eager, compiled, dim=-1).min() > 0.999


def test_prefix_cache_graphs_equal_eager_over_a_conversation(monkeypatch):
    """Five turns per conversation, three conversations at once: later turns start from the cached
    prefix through the continuation prefill graphs; tokens equal the eager engine's."""
    from glm4voice.llm.runner import ModelRunner

    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_model(TINY, "cuda", torch.float32, seed=3)
    replays = []
    real = ModelRunner._replay_continued
    monkeypatch.setattr(ModelRunner, "_replay_continued", lambda self, *a: replays.append(a[0]) or real(self, *a))

    async def conversation(engine, c):
        history, replies = [5, 6, 7, 8], []
        for turn in range(5):
            prompt = history + [100 + 37 * c + 11 * turn + k for k in range(20 + 7 * turn)]
            # a peaked distribution: the continuation graph's attention (the Triton decode kernel, a
            # query row per new token) rounds differently from the eager chunk's (SDPA, expanded heads)
            params = SamplingParams(temperature=0.3, top_p=0.9, max_new_tokens=40, seed=10 * c + turn)
            reply = await _collect(engine.submit(prompt, params))
            replies.append(reply)
            history = prompt + reply
        return replies

    async def run(**config):
        options = dict(device="cuda", dtype="float32", max_batch_size=4, max_seq_len=512, prefill_chunk=64,
                       cuda_graph_batch_sizes=(1, 2, 4))  # fmt: skip
        async with Engine.from_model(model, EngineConfig(**(options | config)), stop_ids=()) as engine:
            replies = await asyncio.gather(*(conversation(engine, c) for c in range(3)))
            return replies, engine.stats(), len(engine.runner.continued_graphs)

    eager, eager_stats, _ = asyncio.run(run(eager=True))
    graphs, stats, captured = asyncio.run(run(compile=False))
    assert captured > 0 and len(replays) >= 3 * 4 and stats.prefix_hits >= 3 * 4
    assert graphs == eager


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("b, kv_len", [(1, 256), (1, 4096), (8, 1024), (64, 4096), (3, 100)])
def test_triton_decode_attention_equals_matmul(dtype, tolerance, b, kv_len):
    """The published grouping (2 key/value heads of 16 query heads, head size 128) on cache views."""
    from glm4voice.llm import decode_attention as attention

    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(b * kv_len)
    layer = torch.randn(2, 64, 2, 4097, 128, generator=generator, device="cuda").to(dtype)
    q = torch.randn(b, 2, 16, 128, generator=generator, device="cuda").to(dtype)
    slots = torch.randperm(64, generator=generator, device="cuda")[:b]  # rows on any slots
    positions = torch.randint(0, kv_len, (b,), generator=generator, device="cuda")
    positions[0] = kv_len - 1
    if b > 2:
        positions[1], positions[2] = 0, 4096  # one position; an idle row at the scratch position
    mask = attention.visible_mask(positions, kv_len, torch.float32)
    keys, values = attention.gather(layer, slots, kv_len)
    expected = attention.attend_matmul(q.float(), keys.float(), values.float(), mask, 128**-0.5)
    got = attention.attend_triton(q, layer[0], layer[1], slots, positions, kv_len, 128**-0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


def test_fast_decode_path_keeps_greedy_equal_to_the_eager_path_for_256_steps():
    """Compiled per-layer functions + CUDA graphs + the Triton attention (the engine as shipped)
    against the eager engine with the reference matmul attention: the same 256 greedy tokens, alone
    and in a batch (float32, so that rounding cannot decide)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_model(TINY, "cuda", torch.float32, seed=4)
    params = SamplingParams(temperature=0, max_new_tokens=256)

    async def generate(attention, **config):
        model.decode_attention = attention
        options = dict(device="cuda", dtype="float32", max_batch_size=4, max_seq_len=512, prefill_chunk=64,
                       cuda_graph_batch_sizes=(1, 2, 4))  # fmt: skip
        async with Engine.from_model(model, EngineConfig(**(options | config)), stop_ids=()) as engine:
            alone = await _collect(engine.submit(PROMPTS[1], params))
            together = await asyncio.gather(*(_collect(engine.submit(p, params)) for p in PROMPTS[:4]))
        return alone, list(together)

    eager = asyncio.run(generate("matmul", eager=True))
    fast = asyncio.run(generate("auto", compile=True))
    model.decode_attention = "auto"
    assert len(eager[0]) == 256
    assert fast == eager


def test_bfloat16_fast_decode_step_close_to_eager():
    """bf16: one decode step of the compiled functions with the Triton attention against the eager
    functions with the matmul attention, over a prefilled cache."""
    from glm4voice.llm.model import KVCache

    model = random_model(TINY, "cuda", torch.bfloat16, seed=5)
    ids = torch.tensor(PROMPTS[6], device="cuda")
    rope = model.rope_tables(513, "cuda")
    logits = []
    for attention, compiled in (("matmul", False), ("triton", True)):
        cache = KVCache.allocate(TINY, 2, 512, torch.bfloat16, "cuda")
        model.decode_attention = attention
        model.compile_steps() if compiled else model.eager_steps()
        with torch.inference_mode():
            model.prefill(ids[:-1], cache, 1, 0, rope)
            positions = torch.tensor([cache.scratch_position, len(ids) - 1], device="cuda")
            logits.append(model.decode(torch.stack([ids[0], ids[-1]]), positions, cache, rope, kv_len=256)[1])
    model.eager_steps()
    model.decode_attention = "auto"
    assert torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=0) > 0.999
