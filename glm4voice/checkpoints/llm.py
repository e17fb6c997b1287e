"""Tiny glm-4-voice-9b folder: the published ChatGLM ``config.json`` fields with tiny sizes,
``generation_config.json``, and sharded bf16 safetensors with the published key names plus
``model.safetensors.index.json``.

Sizes: hidden 64, 2 layers, 4 heads x kv_channels 16, 2 key/value groups, ffn 128; the vocabulary
rows come from the tiny tokenizer (``padded_vocab_size``). ``seq_length`` is written as 8192 (our
choice: the published file seems to lack it; see glm4voice.llm.config.DEFAULT_SEQ_LENGTH).
The remote code's ``transformer.rotary_pos_emb.inv_freq`` buffer is written too (the loader
accepts the folder with or without it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm4voice.checkpoints.text import TinyVocab
from glm4voice.llm.checkpoint import INDEX_FILE, ROTARY_BUFFER_KEY, published_key_names
from glm4voice.llm.config import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    PUBLISHED_CONFIG,
    PUBLISHED_GENERATION_CONFIG,
    GLMConfig,
)
from glm4voice.llm.model import build_meta_model

TINY_DIMS = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 128,
    "seq_length": 8192,
}
TINY_SHARDS = 2


def tiny_llm_config(vocab: TinyVocab, dims: dict | None = None) -> dict:
    config = dict(PUBLISHED_CONFIG)
    config.pop("_name_or_path")
    config |= TINY_DIMS if dims is None else TINY_DIMS | dims
    config |= {
        "padded_vocab_size": vocab.padded_vocab_size,
        "vocab_size": vocab.padded_vocab_size,
        "eos_token_id": list(vocab.eos_token_ids),
        "pad_token_id": vocab.pad_token_id,
    }
    return config


def write_tiny_llm(folder: Path, vocab: TinyVocab, seed: int, dims: dict | None = None) -> None:
    """The folder's config and weights; ``dims``: config fields to change from :data:`TINY_DIMS` (e.g.
    widths that quantized kernels take: int4 groups 128 input channels)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = tiny_llm_config(vocab, dims)
    (folder / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    generation = PUBLISHED_GENERATION_CONFIG | {
        "eos_token_id": list(vocab.eos_token_ids),
        "pad_token_id": vocab.pad_token_id,
    }
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    config = GLMConfig.from_chatglm(raw)
    meta = build_meta_model(config)
    shapes = {name: tuple(p.shape) for name, p in meta.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for published, name in published_key_names(meta).items():
        shape = shapes[name]
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            value = 0.1 * torch.randn(shape, generator=generator)
        else:  # unit-variance embeddings, 1/sqrt(fan_in) linears: logits of order one
            std = 1.0 if name == "embed.weight" else shape[1] ** -0.5
            value = std * torch.randn(shape, generator=generator)
        tensors[published] = value.to(torch.bfloat16)
    rotary = config.rotary_dim
    tensors[ROTARY_BUFFER_KEY] = (1.0 / 10000 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary)).to(
        torch.bfloat16
    )

    keys = list(tensors)
    per_shard = -(-len(keys) // TINY_SHARDS)
    weight_map, total = {}, 0
    for index in range(TINY_SHARDS):
        name = f"model-{index + 1:05d}-of-{TINY_SHARDS:05d}.safetensors"
        shard = {key: tensors[key].contiguous() for key in keys[index * per_shard : (index + 1) * per_shard]}
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, value in shard.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()
    index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")
