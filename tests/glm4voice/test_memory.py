"""glm4voice.memory: bytes held by each part (distinct storages, quantized weights' inner tensors), the
allocator's segments split by graph pool and stream, and what each component reports it holds."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flow_inference import AudioDecoder
from glm4voice.llm.engine import Engine, EngineConfig
from glm4voice.memory import (
    DEFAULT_POOL,
    DEFAULT_STREAM,
    GB,
    OTHER_POOLS,
    OTHER_STREAMS,
    MemoryOwners,
    memory_report,
    split_segments,
    summary_line,
    tensor_bytes,
)
from speech_tokenizer import SpeechTokenizer


def test_each_storage_counts_once_whatever_holds_it():
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight  # one 10x4 float32 storage
    tied.register_buffer("table", torch.zeros(3, dtype=torch.float64))
    assert tensor_bytes(tied) == 10 * 4 * 4 + 3 * 8
    whole = torch.zeros(100, dtype=torch.int16)
    assert tensor_bytes(whole[:10], whole[50:], [whole], {"again": whole}) == 200  # views share its storage
    assert tensor_bytes(tied, whole) == tensor_bytes(tied) + 200
    with pytest.raises(TypeError, match="str"):
        tensor_bytes("weights")


def test_quantized_weights_count_their_inner_tensors():
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = nn.Sequential(nn.Linear(256, 128, bias=False))
    float_bytes = tensor_bytes(layer)
    quantize_(layer, Int8WeightOnlyConfig())
    assert is_traceable_wrapper_subclass(layer[0].weight)  # no storage of its own: its inner tensors count
    quantized = tensor_bytes(layer)
    assert 128 * 256 <= quantized < float_bytes / 3  # int8 values (and a scale per row), not float32


def test_segments_are_split_by_pool_and_the_default_pools_by_stream():
    decoder_pool, llm_pool = (0, 7), (0, 9)
    speech = SimpleNamespace(cuda_stream=1234)
    owners = MemoryOwners(pools={"decoder graphs": decoder_pool, "llm graphs": llm_pool}, streams={"speech": speech})
    segments = [
        {"device": 0, "total_size": 100, "segment_pool_id": (0, 7), "stream": 1234},
        {"device": 0, "total_size": 50, "segment_pool_id": (0, 9), "stream": 0},
        {"device": 0, "total_size": 30, "segment_pool_id": (0, 11), "stream": 0},  # a pool nobody named
        {"device": 0, "total_size": 20, "segment_pool_id": (0, 0), "stream": 1234},
        {"device": 0, "total_size": 8, "segment_pool_id": (0, 0), "stream": 0},
        {"device": 0, "total_size": 4, "segment_pool_id": (0, 0), "stream": 999},  # a warm-up's side stream
        {"device": 1, "total_size": 1000, "segment_pool_id": (0, 0), "stream": 0},  # another GPU
    ]
    by_pool, by_stream = split_segments(segments, torch.device("cuda", 0), owners)
    assert by_pool == {"decoder graphs": 100, "llm graphs": 50, OTHER_POOLS: 30, DEFAULT_POOL: 32}
    assert by_stream == {"speech": 20, DEFAULT_STREAM: 8, OTHER_STREAMS: 4}
    by_pool, _ = split_segments(segments, torch.device("cuda", 1), owners)
    assert by_pool == {DEFAULT_POOL: 1000}


def test_owners_add_up_and_a_cpu_report_has_the_parts_only():
    a = MemoryOwners(parts={"weights": 2 * 10**9}, pools={"graphs": (0, 1)})
    b = MemoryOwners(parts={"cache": 5 * 10**8}, streams={"speech": None})
    both = a + b
    assert both.parts == {"weights": 2 * 10**9, "cache": 5 * 10**8} and set(both.pools) == {"graphs"}
    report = memory_report("cpu", both)
    assert report == {"device": "cpu", "parts_gb": {"weights": 2.0, "cache": 0.5}, "parts_total_gb": 2.5}
    assert summary_line(report) == "memory on cpu (GB): weights 2.00, cache 0.50"


def test_each_component_reports_the_weights_it_holds(tiny_checkpoints):
    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu")
    owners = decoder.memory_owners()
    flow_and_vocoder = sum(t.numel() * t.element_size() for m in (decoder.flow, decoder.hift)
                           for t in (*m.parameters(), *m.buffers()))  # fmt: skip
    assert owners.parts == {"decoder weights": flow_and_vocoder} and flow_and_vocoder > 0
    assert owners.pools == {"decoder graphs": None} and owners.streams == {"decoder": None}  # no CUDA here

    tokenizer = SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device="cpu")
    encoder = sum(t.numel() * t.element_size() for t in (*tokenizer.model.parameters(), *tokenizer.model.buffers()))
    assert tokenizer.memory_owners().parts == {"speech tokenizer weights": encoder}

    async def engine_owners() -> MemoryOwners:
        config = EngineConfig(device="cpu", dtype="float32", max_batch_size=3, max_seq_len=128)
        async with Engine.from_pretrained(str(tiny_checkpoints.llm), config, stop_ids=()) as engine:
            runner = engine.runner
            owners = engine.memory_owners()
            weights = sum(t.numel() * t.element_size() for t in (*runner.model.parameters(), *runner.model.buffers()))
            assert owners.parts["llm weights"] == weights
            assert owners.parts["llm kv cache"] == runner.cache.nbytes() > 0
            assert owners.parts["llm slot state"] >= runner.first_logits.numel() * 4  # 3 slots x vocabulary, float32
            return owners

    owners = asyncio.run(engine_owners())
    assert set(owners.parts) == {"llm weights", "llm kv cache", "llm slot state"}
    assert owners.pools == {"llm graphs": None} and owners.streams == {}
    report = memory_report("cpu", owners + decoder.memory_owners() + tokenizer.memory_owners())
    assert report["parts_total_gb"] == pytest.approx(
        (sum(owners.parts.values()) + flow_and_vocoder + encoder) / GB, abs=1e-3
    )
