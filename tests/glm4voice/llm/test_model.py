"""Our decoder against a straightforward ChatGLM forward written here, against transformers' GLM,
and cached (chunked prefill + batched decode) against the full forward."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from glm4voice.llm.hf_glm import to_transformers_glm
from glm4voice.llm.model import KVCache

IDS = [5, 17, 300, 2, 650, 1000, 12000, 7, 7, 42, 18000, 3, 99, 400, 401, 13]


def published_tensors(folder) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by their published names, read without our loader."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for key, shard in weight_map.items():
        with safe_open(folder / shard, framework="pt") as f:
            tensors[key] = f.get_tensor(key).float()
    return tensors


def chatglm_reference_logits(folder, ids: list[int]) -> torch.Tensor:
    """The ChatGLM math spelled out the way the original code does it, in float32:
    [seq, heads, dim] tensors, a rotary cache of (cos, sin) pairs over half the head dims applied
    to interleaved pairs, keys/values expanded over each query group, an explicit causal softmax,
    fused qkv with bias, SwiGLU on the two halves of dense_h_to_4h, RMSNorm. Without
    ``multi_query_attention`` every head has its own key and value, and the fused rows are read per
    head: ``[seq, heads, 3 * dim]`` split into q, k, v."""
    cfg = json.loads((folder / "config.json").read_text())
    w = published_tensors(folder)
    grouped = cfg["multi_query_attention"]
    heads, dim = cfg["num_attention_heads"], cfg["kv_channels"]
    groups = cfg["multi_query_group_num"] if grouped else heads
    eps, base = cfg["layernorm_epsilon"], 10000 * cfg["rope_ratio"]
    n = len(ids)

    def rmsnorm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    rot = dim // 2  # RotaryEmbedding(kv_channels // 2): n_elem = rot
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
    angles = torch.outer(torch.arange(n, dtype=torch.float), theta)
    cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # [seq, rot/2, 2]

    def rope(x):  # x: [seq, heads, dim]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        xs = x_rot.reshape(n, x.shape[1], rot // 2, 2)
        c = cache.view(n, 1, rot // 2, 2)
        out = torch.stack(
            [xs[..., 0] * c[..., 0] - xs[..., 1] * c[..., 1], xs[..., 1] * c[..., 0] + xs[..., 0] * c[..., 1]], -1
        ).flatten(2)
        return torch.cat([out, x_pass], dim=-1)

    x = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"])
        mixed = h @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        if grouped:
            q, k, v = mixed.split([heads * dim, groups * dim, groups * dim], dim=-1)
            q, k, v = q.view(n, heads, dim), k.view(n, groups, dim), v.view(n, groups, dim)
        else:
            q, k, v = mixed.view(n, heads, 3 * dim).split(dim, dim=-1)
        q, k = rope(q), rope(k)
        k = k.unsqueeze(2).expand(n, groups, heads // groups, dim).reshape(n, heads, dim)
        v = v.unsqueeze(2).expand(n, groups, heads // groups, dim).reshape(n, heads, dim)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        context = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * dim)
        x = x + context @ w[p + "self_attention.dense.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rmsnorm(x, w["transformer.encoder.final_layernorm.weight"])
    return x @ w["transformer.output_layer.weight"].T


def test_logits_equal_reference_chatglm_forward(tiny_llm, llm_folder):
    ours = tiny_llm.model(torch.tensor(IDS))
    reference = chatglm_reference_logits(llm_folder, IDS)
    assert ours.shape == (len(IDS), tiny_llm.config.vocab_size)
    assert ours.abs().max() > 1.0  # not degenerate
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_multi_query_attention_false_checkpoint_loads_and_computes_like_the_reference(llm_folder, tmp_path):
    """A ChatGLM folder with ``multi_query_attention: false`` (per-head fused q/k/v rows, as many
    key/value heads as query heads): our loader's logits, full and through the KV cache, equal the
    reference forward that reads the rows per head."""
    import shutil

    from safetensors.torch import save_file

    from glm4voice.llm.checkpoint import load_model

    folder = tmp_path / "no-mqa"
    folder.mkdir()
    cfg = json.loads((llm_folder / "config.json").read_text()) | {"multi_query_attention": False}
    (folder / "config.json").write_text(json.dumps(cfg))
    shutil.copy(llm_folder / "generation_config.json", folder / "generation_config.json")
    tensors = published_tensors(llm_folder)
    rows, hidden = 3 * cfg["num_attention_heads"] * cfg["kv_channels"], cfg["hidden_size"]
    generator = torch.Generator().manual_seed(5)
    for key in list(tensors):
        if key.endswith("query_key_value.weight"):
            tensors[key] = torch.randn(rows, hidden, generator=generator) * hidden**-0.5
        elif key.endswith("query_key_value.bias"):
            tensors[key] = 0.1 * torch.randn(rows, generator=generator)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    index = {"weight_map": dict.fromkeys(tensors, "model.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    loaded = load_model(folder, dtype="float32")
    assert loaded.config.num_kv_heads == cfg["num_attention_heads"] and loaded.config.qkv_per_head
    reference = chatglm_reference_logits(folder, IDS)
    ours = loaded.model(torch.tensor(IDS))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # the same with the per-head rows taken as if they were grouped: clearly different (the test can fail)
    assert not torch.allclose(ours, chatglm_reference_logits(llm_folder, IDS), atol=1e-2)
    cache = KVCache.allocate(loaded.config, 2, 32, torch.float32, "cpu")
    rope = loaded.model.rope_tables(33)
    with torch.inference_mode():
        loaded.model.prefill(torch.tensor(IDS[:10]), cache, 1, 0, rope)
        step = loaded.model.decode(torch.tensor([0, IDS[10]]), torch.tensor([cache.scratch_position, 10]),
                                   cache, rope, kv_len=16)  # fmt: skip
    torch.testing.assert_close(step[1], reference[10], rtol=1e-4, atol=1e-4)


def test_logits_equal_transformers_glm(tiny_llm):
    hf = to_transformers_glm(tiny_llm.model)
    with torch.no_grad():
        theirs = hf(torch.tensor([IDS])).logits[0].float()
    torch.testing.assert_close(tiny_llm.model(torch.tensor(IDS)), theirs, rtol=1e-4, atol=1e-4)


def test_queue_streamer_hands_out_exactly_the_generated_ids(tiny_llm):
    """The reference-style baselines stream transformers' generate() through queue_streamer."""
    from glm4voice.llm.hf_glm import queue_streamer, to_transformers_glm

    hf = to_transformers_glm(tiny_llm.model)
    hf.generation_config.eos_token_id = None
    prompt = torch.tensor([IDS[:6]])
    streamer = queue_streamer()
    out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                      do_sample=False, streamer=streamer)  # fmt: skip
    streamed = []
    while (token := streamer.queue.get_nowait()) is not None:
        streamed.append(token)
    assert streamed == out[0, 6:].tolist() and len(streamed) == 5


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_chunked_prefill_and_batched_decode_equal_full_forward(tiny_llm, attention):
    model = tiny_llm.model
    model.decode_attention = attention
    full = model(torch.tensor(IDS))
    cache = KVCache.allocate(model.config, 4, 64, torch.float32, "cpu")
    rope = model.rope_tables(65)
    with torch.inference_mode():
        # slot 2: three prefill chunks, the later ones attending over earlier chunks
        model.prefill(torch.tensor(IDS[:5]), cache, 2, 0, rope)
        model.prefill(torch.tensor(IDS[5:6]), cache, 2, 5, rope)
        chunk = model.prefill(torch.tensor(IDS[6:10]), cache, 2, 6, rope, last_only=False)
        torch.testing.assert_close(chunk, full[6:10], rtol=1e-4, atol=1e-4)
        # slot 0: a shorter sequence; both then decode token by token in one batch of 3 rows
        other = [9, 8, 7]
        model.prefill(torch.tensor(other[:2]), cache, 0, 0, rope)
        other_full = model(torch.tensor(other))
        scratch = cache.scratch_position
        tokens = torch.tensor([other[2], 0, IDS[10]])
        positions = torch.tensor([2, scratch, 10])  # row 1 is an idle slot
        logits = model.decode(tokens, positions, cache, rope, kv_len=16)
        torch.testing.assert_close(logits[0], other_full[2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[2], full[10], rtol=1e-4, atol=1e-4)
        for position in range(11, len(IDS)):
            tokens = torch.tensor([0, 0, IDS[position]])
            positions = torch.tensor([scratch, scratch, position])
            logits = model.decode(tokens, positions, cache, rope, kv_len=position + 1)
            torch.testing.assert_close(logits[2], full[position], rtol=1e-4, atol=1e-4)
    model.decode_attention = "matmul"


def test_padded_first_chunk_prefill_equals_prefill_then_decodes_on(tiny_llm):
    """The static-shape prefill of the prefill CUDA graphs: a prompt padded to a fixed length, slot
    and last row as tensors, gives the prompt's logits and cache rows, and decoding continues."""
    model = tiny_llm.model
    full = model(torch.tensor(IDS))
    n, padded = 9, 16
    cache = KVCache.allocate(model.config, 3, 64, torch.float32, "cpu")
    reference = KVCache.allocate(model.config, 3, 64, torch.float32, "cpu")
    rope = model.rope_tables(65)
    with torch.inference_mode():
        ids = torch.tensor(IDS[:n] + [0] * (padded - n))
        logits = model.prefill_first_chunk(ids, torch.tensor([n - 1]), torch.tensor([1]), cache, rope)
        torch.testing.assert_close(logits[0], full[n - 1], rtol=1e-4, atol=1e-4)
        model.prefill(torch.tensor(IDS[:n]), reference, 1, 0, rope)
        torch.testing.assert_close(cache.kv[:, :, 1, :, :n], reference.kv[:, :, 1, :, :n], rtol=1e-5, atol=1e-5)
        assert not cache.kv[:, :, (0, 2)].any(), "other slots were written"
        scratch = cache.scratch_position
        for position in range(n, len(IDS)):  # the padding's keys never leak into later tokens
            tokens = torch.tensor([0, IDS[position], 0])
            positions = torch.tensor([scratch, position, scratch])
            step = model.decode(tokens, positions, cache, rope, kv_len=padded)
            torch.testing.assert_close(step[1], full[position], rtol=1e-4, atol=1e-4)


def test_padded_continued_chunk_equals_prefill_then_decodes_on(tiny_llm):
    """The static-shape prefill of the continuation graphs (a chunk after a cached prefix, padded,
    slot/start/length as a tensor) gives the chunk's last logits and cache rows; padding writes only
    the scratch position; decoding continues from there."""
    model = tiny_llm.model
    full = model(torch.tensor(IDS))
    start, n, padded, kv_len = 6, 5, 8, 16
    cache = KVCache.allocate(model.config, 3, 32, torch.float32, "cpu")
    reference = KVCache.allocate(model.config, 3, 32, torch.float32, "cpu")
    rope = model.rope_tables(33)
    with torch.inference_mode():
        for kv in (cache, reference):
            model.prefill(torch.tensor(IDS[:start]), kv, 2, 0, rope)
        ids = torch.tensor(IDS[start : start + n] + [0] * (padded - n))
        logits = model.prefill_continued_chunk(ids, torch.tensor([2, start, n]), cache, rope, kv_len)
        torch.testing.assert_close(logits[0], full[start + n - 1], rtol=1e-4, atol=1e-4)
        model.prefill(torch.tensor(IDS[start : start + n]), reference, 2, start, rope)
        end = start + n
        torch.testing.assert_close(cache.kv[:, :, 2, :, :end], reference.kv[:, :, 2, :, :end], rtol=1e-5, atol=1e-5)
        assert not cache.kv[:, :, 2, :, end:-1].any(), "padding wrote past the chunk"
        assert not cache.kv[:, :, :2].any(), "other slots were written"
        scratch = cache.scratch_position
        for position in range(end, len(IDS)):
            step = model.decode(torch.tensor([0, 0, IDS[position]]), torch.tensor([scratch, scratch, position]),
                                cache, rope, kv_len=kv_len)  # fmt: skip
            torch.testing.assert_close(step[2], full[position], rtol=1e-4, atol=1e-4)


def test_bfloat16_model_stays_close_to_float32(llm_folder, tiny_llm):
    from glm4voice.llm.checkpoint import load_model

    bf16 = load_model(llm_folder, dtype="bfloat16").model
    assert bf16.embed.weight.dtype == torch.bfloat16
    a, b = tiny_llm.model(torch.tensor(IDS)), bf16(torch.tensor(IDS))
    assert b.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cosine.min() > 0.99


@pytest.mark.parametrize("n", [1, 7])
def test_rope_tables_match_chatglm_angles(tiny_llm, n):
    cos, sin = tiny_llm.model.rope_tables(n)
    rot = tiny_llm.config.head_dim // 2
    assert cos.shape == (n, rot // 2)
    position, i = n - 1, rot // 2 - 1
    angle = position * (10000.0 ** (-(2 * i) / rot))
    assert math.isclose(cos[position, i].item(), math.cos(angle), abs_tol=1e-6)
    assert math.isclose(sin[position, i].item(), math.sin(angle), abs_tol=1e-6)


def test_compiled_decode_step_equals_eager(tiny_llm):
    """The decode step's compiled per-layer functions (the residual add carried into the next layer's
    norm, the key/value cache write inside the compiled rotary function) give the eager logits and
    write the same cache rows, with dynamic batch sizes and idle rows (inductor's CPU backend)."""
    import copy

    eager = tiny_llm.model
    compiled = copy.deepcopy(eager)
    compiled.compile_steps()
    rope = eager.rope_tables(65)
    caches = [KVCache.allocate(eager.config, 4, 64, torch.float32, "cpu") for _ in range(2)]
    with torch.inference_mode():
        for model, cache in zip((eager, compiled), caches):
            model.prefill(torch.tensor(IDS[:9]), cache, 1, 0, rope)
            model.prefill(torch.tensor(IDS[:5]), cache, 3, 0, rope)
        scratch = caches[0].scratch_position
        steps = [
            ([0, IDS[9], 0, IDS[5]], [scratch, 9, scratch, 5]),
            ([0, IDS[10], 0, IDS[6]], [scratch, 10, scratch, 6]),
            ([0, IDS[11]], [scratch, 11]),  # a smaller batch: the same compiled graphs
        ]
        for tokens, positions in steps:
            logits = [
                model.decode(torch.tensor(tokens), torch.tensor(positions), cache, rope, kv_len=16)
                for model, cache in zip((eager, compiled), caches)
            ]
            torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].kv[:, :, :, :, :12], caches[0].kv[:, :, :, :, :12], rtol=1e-5, atol=1e-5)
    full = eager(torch.tensor(IDS))
    torch.testing.assert_close(logits[1][1], full[11], rtol=1e-4, atol=1e-4)
