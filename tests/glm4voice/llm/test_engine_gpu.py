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


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
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
            # a peaked distribution: the continuation graph's attention (grouped heads, one masked SDPA
            # over the attention length) rounds differently from the eager chunk's (expanded heads)
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
