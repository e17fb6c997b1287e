"""Config reading, the strict key mapping, loading variants, and the real-size shape on meta."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm4voice.llm.checkpoint import (
    INDEX_FILE,
    KEY_TABLE,
    ROTARY_BUFFER_KEY,
    CheckpointError,
    check_key_set,
    load_model,
    map_key,
    published_key_names,
)
from glm4voice.llm.config import (
    CHATGLM_DEFAULT_SEQ_LENGTH,
    PUBLISHED_CONFIG,
    ConfigError,
    GLMConfig,
    context_limit,
    generation_stop_ids,
)
from glm4voice.llm.model import build_meta_model

IDS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])


def published_layer_keys(i: int) -> set[str]:
    p = f"transformer.encoder.layers.{i}."
    return {
        p + "input_layernorm.weight", p + "self_attention.query_key_value.weight",
        p + "self_attention.query_key_value.bias", p + "self_attention.dense.weight",
        p + "post_attention_layernorm.weight", p + "mlp.dense_h_to_4h.weight", p + "mlp.dense_4h_to_h.weight",
    }  # fmt: skip


def test_real_size_config_on_meta_device():
    config = GLMConfig.published()
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (40, 32, 2, 128)
    assert config.vocab_size == 168960 and config.rotary_dim == 64 and config.qkv_size == 4608
    assert config.seq_length is None  # the published file has no seq_length
    model = build_meta_model(config)
    params = dict(model.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())
    count = sum(p.numel() for p in params.values())
    assert 9.4e9 < count < 9.6e9 and count == config.num_parameters()
    keys = published_key_names(model)
    expected = {"transformer.embedding.word_embeddings.weight", "transformer.encoder.final_layernorm.weight",
                "transformer.output_layer.weight"}.union(*(published_layer_keys(i) for i in range(40)))  # fmt: skip
    assert set(keys) == expected
    shapes = {key: tuple(params[name].shape) for key, name in keys.items()}
    assert shapes["transformer.embedding.word_embeddings.weight"] == (168960, 4096)
    assert shapes["transformer.output_layer.weight"] == (168960, 4096)
    assert shapes["transformer.encoder.layers.39.self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes["transformer.encoder.layers.0.self_attention.query_key_value.bias"] == (4608,)
    assert shapes["transformer.encoder.layers.0.self_attention.dense.weight"] == (4096, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (27392, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] == (4096, 13696)
    check_key_set(model, [*keys, ROTARY_BUFFER_KEY])  # the whole published key set maps


def test_key_table_round_trips_and_rejects_unknown_keys():
    assert map_key("transformer.encoder.layers.17.mlp.dense_4h_to_h.weight") == "layers.17.down.weight"
    assert map_key(ROTARY_BUFFER_KEY) is None
    assert len(KEY_TABLE) == 10
    for key in ("transformer.encoder.layers.0.mlp.dense_h_to_4h.bias", "lm_head.weight",
                "model.layers.0.self_attn.q_proj.weight", "transformer.encoder.layers.x.input_layernorm.weight"):  # fmt: skip
        with pytest.raises(CheckpointError, match="unknown checkpoint key"):
            map_key(key)


def test_config_errors():
    with pytest.raises(ConfigError, match="model_type"):
        GLMConfig.from_chatglm(PUBLISHED_CONFIG | {"model_type": "llama"})
    with pytest.raises(ConfigError, match="rmsnorm"):
        GLMConfig.from_chatglm(PUBLISHED_CONFIG | {"rmsnorm": False})
    with pytest.raises(ConfigError, match="apply_residual_connection_post_layernorm"):
        GLMConfig.from_chatglm(PUBLISHED_CONFIG | {"apply_residual_connection_post_layernorm": True})
    broken = dict(PUBLISHED_CONFIG)
    del broken["ffn_hidden_size"]
    with pytest.raises(ConfigError, match="ffn_hidden_size"):
        GLMConfig.from_chatglm(broken)
    with pytest.raises(ConfigError, match="multiple"):
        GLMConfig.from_chatglm(PUBLISHED_CONFIG | {"multi_query_group_num": 3})
    assert GLMConfig.from_chatglm(PUBLISHED_CONFIG | {"seq_length": 2048}).seq_length == 2048
    with pytest.raises(ConfigError, match="seq_length"):
        GLMConfig.from_chatglm(PUBLISHED_CONFIG | {"seq_length": 0})


def test_context_limit_says_which_limit_and_why():
    unstated = GLMConfig.published()
    limit, why = context_limit(unstated, 8192)
    assert limit == 8192 and "no seq_length" in why and str(CHATGLM_DEFAULT_SEQ_LENGTH) in why
    assert "--max-seq-len" in why and "max_seq_len=8192" in why
    assert context_limit(unstated, 1000)[0] == 1000  # the caller chooses
    stated = GLMConfig.from_chatglm(PUBLISHED_CONFIG | {"seq_length": 4096})
    limit, why = context_limit(stated, 8192)
    assert limit == 4096 and "seq_length is 4096" in why
    limit, why = context_limit(stated, 2000)
    assert limit == 2000 and "as configured" in why


def test_multi_query_attention_false_means_one_key_value_head_per_query_head():
    config = GLMConfig.from_chatglm(PUBLISHED_CONFIG | {"multi_query_attention": False})
    assert config.num_kv_heads == config.num_heads == 32 and config.qkv_per_head
    assert config.qkv_size == 3 * 4096
    assert not GLMConfig.published().qkv_per_head
    with pytest.raises(ConfigError, match="per-head"):
        GLMConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden_size=64,
                  vocab_size=100, layernorm_epsilon=1e-6, qkv_per_head=True)  # fmt: skip


def test_per_head_qkv_rows_are_reordered():
    from glm4voice.llm.checkpoint import per_head_qkv_to_grouped

    heads, dim, hidden = 3, 2, 5
    # row r of the per-head layout belongs to head r // (3*dim), part (r // dim) % 3, element r % dim
    rows = torch.arange(3 * heads * dim)
    weight = rows[:, None].float() * 10 + torch.arange(hidden)
    grouped = per_head_qkv_to_grouped(weight, heads, dim)
    expected_rows = [h * 3 * dim + part * dim + e for part in range(3) for h in range(heads) for e in range(dim)]
    torch.testing.assert_close(grouped, weight[expected_rows])
    torch.testing.assert_close(per_head_qkv_to_grouped(rows.float(), heads, dim), rows[expected_rows].float())


def test_tiny_folder_is_in_the_published_format(llm_folder, tiny_checkpoints):
    raw = json.loads((llm_folder / "config.json").read_text())
    assert set(PUBLISHED_CONFIG) - {"_name_or_path"} <= set(raw)
    assert raw["padded_vocab_size"] == tiny_checkpoints.vocab.padded_vocab_size
    weight_map = json.loads((llm_folder / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2  # sharded
    config = GLMConfig.from_folder(llm_folder)
    keys = set(weight_map) - {ROTARY_BUFFER_KEY}
    assert keys == set(published_key_names(build_meta_model(config)))
    assert generation_stop_ids(llm_folder, config) == frozenset(tiny_checkpoints.vocab.eos_token_ids)


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_shard(folder, edit):
    """Apply ``edit(tensors)`` to the first shard and keep the index consistent."""
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(folder / shard)
    edit(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | {k: shard for k in tensors}
    index_path.write_text(json.dumps(index))
    return tensors


def test_loader_fails_on_unknown_missing_and_misshaped_keys(llm_folder, tmp_path):
    extra = copy_folder(llm_folder, tmp_path / "extra")
    rewrite_shard(extra, lambda t: t.__setitem__("transformer.encoder.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unknown checkpoint key 'transformer.encoder.layers.0.mlp.extra.weight'"):
        load_model(extra)

    missing = copy_folder(llm_folder, tmp_path / "missing")
    removed = []
    rewrite_shard(missing, lambda t: removed.append(next(k for k in t if k != ROTARY_BUFFER_KEY)) or t.pop(removed[0]))
    with pytest.raises(CheckpointError, match="lacks 1 tensors") as error:
        load_model(missing)
    assert removed[0] in str(error.value)

    shaped = copy_folder(llm_folder, tmp_path / "shaped")
    key = "transformer.encoder.final_layernorm.weight"

    def shrink(tensors):
        for name in list(tensors):
            tensors.pop(name)
        tensors[key] = torch.ones(3)

    # move the final norm into the first shard with a wrong shape
    index = json.loads((shaped / INDEX_FILE).read_text())
    owner = index["weight_map"][key]
    keep = load_file(shaped / owner)
    keep.pop(key)
    save_file(keep, shaped / owner, metadata={"format": "pt"})
    index["weight_map"][key] = "bad.safetensors"
    (shaped / INDEX_FILE).write_text(json.dumps(index))
    save_file({key: torch.ones(3, dtype=torch.bfloat16)}, shaped / "bad.safetensors")
    with pytest.raises(CheckpointError, match="final_layernorm.weight: shape \\(3,\\)"):
        load_model(shaped)

    more_layers = copy_folder(llm_folder, tmp_path / "layers")
    config = json.loads((more_layers / "config.json").read_text())
    (more_layers / "config.json").write_text(json.dumps(config | {"num_layers": 3}))
    with pytest.raises(CheckpointError, match="lacks"):
        load_model(more_layers)


def test_single_file_without_rotary_buffer_loads_the_same(llm_folder, tmp_path, tiny_llm):
    folder = tmp_path / "single"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(llm_folder / name, folder / name)
    tensors = {}
    for shard in sorted(llm_folder.glob("model-*.safetensors")):
        tensors |= load_file(shard)
    tensors.pop(ROTARY_BUFFER_KEY)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(str(folder), dtype="float32")
    torch.testing.assert_close(loaded.model(IDS), tiny_llm.model(IDS))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(llm_folder / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="neither"):
        load_model(empty)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads(llm_folder, dtype):
    loaded = load_model(llm_folder, dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}
    assert torch.isfinite(loaded.model(IDS)).all()
