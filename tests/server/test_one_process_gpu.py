"""The one-process layout on a GPU (skipped without one): the speech side's streams have the device's
highest priority, and the LLM engine and the speech decoder share one CUDA context without changing
each other's results: a first block decoded (and its CUDA graphs captured) while the engine generates
equals the same block decoded alone, and the engine's greedy tokens equal those it gives alone. The
memory report tells their graph pools apart."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest
import torch

from flow_inference import AudioDecoder
from glm4voice.client import InProcessTokenClient
from glm4voice.devices import high_priority_stream
from glm4voice.llm.engine import Engine, EngineConfig
from glm4voice.memory import DEFAULT_POOL, OTHER_POOLS, MemoryOwners, memory_report
from glm4voice.server.inprocess import InProcessTokenServer
from glm4voice.server.settings import ServerSettings
from speech_tokenizer import SpeechTokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda:0"


def test_the_speech_side_runs_on_the_highest_priority_stream(tiny_checkpoints):
    default = torch.cuda.Stream(DEVICE)
    highest = high_priority_stream(DEVICE)
    assert default.priority == 0 and highest.priority < 0
    assert highest.priority <= torch.cuda.Stream(DEVICE, priority=-1).priority
    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device=DEVICE, dtype=torch.bfloat16)
    tokenizer = SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device=DEVICE)
    assert decoder.cuda_stream.priority == highest.priority == tokenizer.cuda_stream.priority


def test_engine_and_decoder_in_one_process_do_not_change_each_others_results(tiny_checkpoints):
    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device=DEVICE, dtype=torch.bfloat16)
    engine = Engine.from_pretrained(
        tiny_checkpoints.llm,
        EngineConfig(device=DEVICE, dtype="bfloat16", max_batch_size=4, max_seq_len=1024),
        stop_ids=(),  # every answer runs to max_new_tokens
    )
    settings = ServerSettings(model_path=str(tiny_checkpoints.llm), device=DEVICE, dtype="bfloat16",
                              max_concurrent_streams=4, max_seq_len=1024, max_new_tokens_cap=2000)  # fmt: skip
    server = InProcessTokenServer(engine, settings)
    codes = [(37 * k) % decoder.num_codes for k in range(10)]

    def first_block() -> np.ndarray:
        stream = decoder.stream(seed=3)
        try:
            return stream.feed(codes)
        finally:
            stream.close()

    async def scenario():
        async with server.running():
            client = InProcessTokenClient(server)
            params = dict(prompt_token_ids=[5, 9, 13, 17], temperature=0, max_new_tokens=200)
            alone_ids = await client.generate(**params)
            seen = asyncio.Event()
            ids = []

            async def generate():
                async for token in client.stream(**params):
                    ids.append(token)
                    if len(ids) == 10:
                        seen.set()

            task = asyncio.create_task(generate())
            await asyncio.wait_for(seen.wait(), 120)
            # captures the first-block graphs in the decoder's thread while the engine replays its own
            beside = await asyncio.to_thread(first_block)
            await task
            return alone_ids, ids, beside

    alone_ids, beside_ids, beside = asyncio.run(scenario())
    alone = first_block()  # the engine is gone: the decoder alone, replaying the graphs captured above
    assert beside_ids == alone_ids and len(alone_ids) > 10
    assert beside.size > 0
    np.testing.assert_allclose(beside, alone, atol=5e-3)  # captured then, replayed now (as the decoder's own tests)
    assert decoder.captured_graphs["first_block_flow"]


def test_the_memory_report_names_each_components_graph_pool(tiny_checkpoints):
    """glm4voice.memory on a real device: the allocator's segments carry the pool handles the engine and
    the decoder captured their graphs in, and the pools add up to what the allocator reserved. Graphs of
    earlier tests in this process may still hold pools of their own: those stay unnamed, and nothing of
    this test's components joins them."""
    gc.collect()
    torch.cuda.empty_cache()
    earlier = memory_report(DEVICE, MemoryOwners())["reserved_by_pool_gb"].get(OTHER_POOLS, 0.0)
    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device=DEVICE, dtype=torch.bfloat16)
    tokenizer = SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device=DEVICE)
    decoder.warm_up((10, 20), batch_sizes=(1, 2))
    engine = Engine.from_pretrained(
        tiny_checkpoints.llm,
        EngineConfig(device=DEVICE, dtype="bfloat16", max_batch_size=2, max_seq_len=512),
        stop_ids=(),
    )

    async def report() -> dict:
        async with engine:
            owners = engine.memory_owners() + decoder.memory_owners() + tokenizer.memory_owners()
            return memory_report(DEVICE, owners)

    figures = asyncio.run(report())
    pools = figures["reserved_by_pool_gb"]
    assert pools["llm graphs"] > 0 and pools["decoder graphs"] > 0, pools
    assert pools.get(OTHER_POOLS, 0.0) <= earlier + 0.002, (pools, earlier)  # the engine's and decoder's are named
    assert sum(pools.values()) == pytest.approx(figures["reserved_gb"], abs=0.002)
    assert sum(figures["default_pool_by_stream_gb"].values()) == pytest.approx(pools.get(DEFAULT_POOL, 0), abs=0.002)
    assert figures["allocated_gb"] >= figures["parts_total_gb"] > 0
    assert figures["device_used_gb"] >= figures["reserved_gb"]
