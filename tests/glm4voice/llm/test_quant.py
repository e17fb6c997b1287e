"""Quantized weights on the CPU: int8 (both methods), the torchao plumbing (fp8 weight-only runs on the
CPU at this level), what each dtype refuses where and what it suggests, and weight accounting.
The fp8 / int4 kernels themselves are tested in test_quant_gpu.py."""

import copy

import pytest
import torch

from glm4voice.llm import quant
from glm4voice.llm.checkpoint import load_model, random_model
from glm4voice.llm.config import GLMConfig
from glm4voice.llm.engine import ENGINE_DTYPES, Engine, EngineConfig
from glm4voice.llm.model import KVCache, Linear
from glm4voice.llm.quant import FusedInt8Linear, QuantizationUnsupported, check_supported, weight_bytes

IDS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
SMALL = GLMConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, ffn_hidden_size=256,
                  vocab_size=512, layernorm_epsilon=1e-6, seq_length=256)  # fmt: skip


def linear_float_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))


def prefilled_with_compiled_copy(model, dtype: torch.dtype, slot: int):
    """``(model, a compiled copy)``, a cache for each holding IDS[:9] in ``slot``, and the rope tables."""
    compiled = copy.deepcopy(model)
    compiled.compile_steps()
    rope = model.rope_tables(65)
    caches = [KVCache.allocate(model.config, 4, 64, dtype, "cpu") for _ in range(2)]
    with torch.inference_mode():
        for m, cache in zip((model, compiled), caches):
            m.prefill(IDS[:9], cache, slot, 0, rope)
    return (model, compiled), caches, rope


def close_logits(a: torch.Tensor, b: torch.Tensor, cosine: float, top1: float) -> None:
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > cosine
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= top1


def test_engine_dtypes_and_methods():
    assert {"int8", "fp8", "int4"} <= set(ENGINE_DTYPES)
    for dtype in quant.QUANTIZED_DTYPES:
        assert quant.resolve_method(dtype).name == quant.DEFAULT_METHODS[dtype]
        for name in quant.method_names(dtype):
            method = quant.parse_spec(f"{dtype}:{name}")
            assert (method.dtype, method.name) == (dtype, name) and method.spec == f"{dtype}:{name}"
    assert quant.parse_spec("int4").name == "tinygemm"
    with pytest.raises(ValueError, match="int8 has no method 'hqq'"):
        quant.parse_spec("int8:hqq")
    with pytest.raises(ValueError, match="not a quantized dtype"):
        quant.resolve_method("bfloat16")


def test_int8_fused_keeps_quality_and_cuts_memory(llm_folder, tiny_llm):
    int8 = load_model(llm_folder, dtype="float32", quantize="int8").model
    assert isinstance(int8.layers[0].qkv, FusedInt8Linear) and int8.layers[0].qkv.weight.dtype == torch.int8
    assert int8.lm_head.weight.dtype == torch.int8
    assert isinstance(int8.embed, quant.Int8Embedding) and int8.embed.weight.dtype == torch.int8
    assert int8.embed(IDS).dtype == torch.float32  # lookups give the activation dtype
    torch.testing.assert_close(int8.embed(IDS), tiny_llm.model.embed(IDS), rtol=0, atol=float(int8.embed.scale.max()))
    assert int8.layers[0].qkv.bias is not None and int8.layers[0].qkv.bias.dtype == torch.float32
    assert quant.is_quantized(int8) and not quant.is_quantized(tiny_llm.model)
    linear_float = linear_float_bytes(tiny_llm.model)
    assert weight_bytes(int8) < weight_bytes(tiny_llm.model) - 0.7 * linear_float  # 4 bytes -> 1 (+ scales)
    close_logits(tiny_llm.model(IDS), int8(IDS), cosine=0.995, top1=0.9)
    w = torch.randn(16, 32)
    q, scale = quant.quantize_int8(w)
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6
    with pytest.raises(ValueError, match="quantize"):
        load_model(llm_folder, quantize="int3")
    with pytest.raises(ValueError, match="needs a quantized dtype"):
        load_model(llm_folder, method="torchao")


def test_int8_fused_matmul_paths_agree():
    linear = Linear(64, 48, bias=True)
    linear.bias = torch.nn.Parameter(torch.randn(48), requires_grad=False)
    fused = FusedInt8Linear.from_float(linear, torch.randn(48, 64))
    assert fused.int8_kernel  # torch's int8 kernel on the CPU
    x = torch.randn(5, 64)
    reference = x @ quant.dequantize_int8(fused.weight, fused.scale).T + linear.bias
    torch.testing.assert_close(fused(x), reference, rtol=1e-4, atol=1e-4)
    fused.int8_kernel = False  # the CUDA paths: one row (multiply-reduce) and several (dequantize)
    torch.testing.assert_close(fused(x), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused(x[:1]), reference[:1], rtol=1e-4, atol=1e-4)


def test_int8_torchao_loads_per_tensor_and_matches_float(llm_folder, tiny_llm):
    loaded = load_model(llm_folder, dtype="float32", quantize="int8", method="torchao")
    model = loaded.model
    layers = 4 * tiny_llm.config.num_layers + 1
    assert quant.weight_formats(model) == {"Int8Tensor": layers}
    assert type(model.layers[0].qkv) is Linear and model.layers[0].qkv.bias.dtype == torch.float32
    linear_float = linear_float_bytes(tiny_llm.model)
    assert weight_bytes(model) < weight_bytes(tiny_llm.model) - 0.7 * linear_float
    int8_values = sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear)) + model.embed.weight.numel()
    assert weight_bytes(model) > int8_values  # torchao's int8 data is counted (and the scales)
    close_logits(tiny_llm.model(IDS), model(IDS), cosine=0.995, top1=0.9)
    fused = load_model(llm_folder, dtype="float32", quantize="int8").model
    close_logits(fused(IDS), model(IDS), cosine=0.999, top1=0.9)  # the same rounding up to the scale's 127 vs 127.5
    with pytest.raises(ValueError, match="not quantized ones"):
        from glm4voice.llm.hf_glm import to_transformers_glm

        to_transformers_glm(model)


def test_fp8_weight_only_plumbing_runs_on_the_cpu():
    """torchao's float8 weights in our Linear (the engine refuses fp8 on the CPU; the tensors
    themselves work here): every layer converted, 1 byte per weight plus a scale per row."""
    reference = random_model(SMALL, "cpu", torch.float32, seed=3)
    model = quant.quantize_model(copy.deepcopy(reference), quant.parse_spec("fp8:weight_only"))
    assert quant.weight_formats(model) == {"Float8Tensor": 4 * SMALL.num_layers + 1}
    params = sum(m.weight.numel() for m in reference.modules() if isinstance(m, Linear))
    rows = sum(m.weight.shape[0] for m in reference.modules() if isinstance(m, Linear))
    table = reference.embed.weight  # int8 rows + a float32 scale each
    saved = linear_float_bytes(reference) - params - 4 * rows + 3 * table.numel() - 4 * table.shape[0]
    assert weight_bytes(reference) - weight_bytes(model) == saved
    close_logits(reference(IDS), model(IDS), cosine=0.99, top1=0.75)


@pytest.mark.slow
def test_fp8_dynamic_plumbing_and_compiled_decode_on_the_cpu(monkeypatch):
    """fp8:dynamic (float8 weights and per-row float8 activations, torch._scaled_mm) through our Linear,
    eager and inside the compiled decode step. torchao refuses to build these tensors without a float8
    GPU; torch's CPU _scaled_mm computes the same thing, so the check is lifted for this test only (the
    GPU kernel itself: test_quant_gpu.py)."""
    from torchao.quantization import quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *args, **kwargs: None)
    reference = random_model(SMALL, "cpu", torch.bfloat16, seed=3)  # per-row float8 needs bf16 weights
    model = quant.quantize_model(copy.deepcopy(reference), quant.parse_spec("fp8:dynamic"))
    assert quant.weight_formats(model) == {"Float8Tensor": 4 * SMALL.num_layers + 1}
    assert model.layers[0].qkv.weight.act_quant_kwargs is not None  # activations are quantized too
    close_logits(reference(IDS), model(IDS), cosine=0.98, top1=0.75)
    zeros = model.layers[0].gate_up(
        torch.zeros(2, SMALL.hidden_size, dtype=torch.bfloat16)
    )  # an all-zero row: no 0/0 scale
    assert torch.isfinite(zeros).all()
    models, caches, rope = prefilled_with_compiled_copy(model, torch.bfloat16, slot=1)
    with torch.inference_mode():
        scratch = caches[0].scratch_position
        for tokens, positions in (([0, IDS[9]], [scratch, 9]), ([0, IDS[10], 0, 7], [scratch, 10, scratch, scratch])):
            logits = [
                m.decode(torch.tensor(tokens), torch.tensor(positions), cache, rope, kv_len=16)
                for m, cache in zip(models, caches)
            ]
            # a compiled kernel's last-bit differences may move an activation across a float8 step
            # (3 mantissa bits): close, not equal (bf16 alone gives cosines > 0.9999 here)
            cosine = torch.nn.functional.cosine_similarity(logits[0].float(), logits[1].float(), dim=-1)
            assert cosine.min() > 0.995, cosine


@pytest.mark.slow
def test_fp8_one_row_computes_one_token_products_itself_inside_the_compiled_step(monkeypatch):
    """fp8:one_row: the gate_up and down layers' one-token products go through the glm4voice::fp8_one_row operator
    (reading the float8 weight's own values and scales: no second copy), also from inside the compiled
    decode step; products of more rows stay torchao's. (Hardware check lifted as for fp8:dynamic above.)"""
    from torchao.quantization import quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *args, **kwargs: None)
    reference = random_model(SMALL, "cpu", torch.bfloat16, seed=3)
    dynamic = quant.quantize_model(copy.deepcopy(reference), quant.parse_spec("fp8:dynamic"))
    model = quant.quantize_model(copy.deepcopy(reference), quant.parse_spec("fp8:one_row"))
    assert quant.weight_formats(model) == {"Float8Tensor": 4 * SMALL.num_layers + 1}
    assert quant.FP8_ONE_ROW_LAYERS == ("gate_up", "down")
    assert all(type(block.gate_up) is type(block.down) is quant.OneRowFp8Linear for block in model.layers)
    assert {type(block.qkv) for block in model.layers} == {type(block.out) for block in model.layers} == {Linear}
    assert type(model.lm_head) is Linear
    assert weight_bytes(model) == weight_bytes(dynamic) and model.state_dict().keys() == dynamic.state_dict().keys()

    layer = model.layers[0].gate_up
    x = torch.randn(2, SMALL.hidden_size, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    dequantized = layer.weight.qdata.float() * layer.weight.scale.float()
    one = layer(x[:1])
    assert one.dtype == torch.bfloat16 and one.shape == (1, 2 * SMALL.ffn_hidden_size)
    torch.testing.assert_close(one.float(), x[:1].float() @ dequantized.T, rtol=1e-2, atol=1e-2)  # bf16 output
    torch.testing.assert_close(layer(x), dynamic.layers[0].gate_up(x), rtol=0, atol=0)  # 2 rows: torchao's path
    tuned = quant._tuned_one_row_product(x[:1], layer.qdata, layer.row_scale)  # inductor's CPU kernel
    torch.testing.assert_close(tuned, quant._one_row_product(x[:1], layer.qdata, layer.row_scale))

    calls = []
    plain = quant._one_row_product
    monkeypatch.setattr(quant, "_one_row_product", lambda *args: calls.append(args[1].shape) or plain(*args))
    models, caches, rope = prefilled_with_compiled_copy(model, torch.bfloat16, slot=0)
    with torch.inference_mode():
        for tokens, positions, one_row_calls in (([IDS[9]], [9], 2 * SMALL.num_layers), ([IDS[10], 0], [10, 0], 0)):
            logits = []
            for m, cache in zip(models, caches):
                calls.clear()
                logits.append(m.decode(torch.tensor(tokens), torch.tensor(positions), cache, rope, kv_len=16))
                assert len(calls) == one_row_calls and set(calls) <= {
                    layer.qdata.shape,
                    model.layers[0].down.qdata.shape,
                }
            cosine = torch.nn.functional.cosine_similarity(logits[0].float(), logits[1].float(), dim=-1)
            assert cosine.min() > 0.995, cosine


def test_torchao_leaving_a_layer_unquantized_is_an_error():
    """int4 groups of 128 input channels: the tiny checkpoint's 64 do not divide; torchao would skip the
    layer silently, we refuse (int4's own kernel is GPU-only, so the check is run on the bare helper)."""
    model = random_model(SMALL, "cpu", torch.float32, seed=0)
    small = Linear(64, 32, bias=False)
    small.weight = torch.nn.Parameter(torch.randn(32, 64), requires_grad=False)
    model.add_module("extra", small)
    with pytest.raises(QuantizationUnsupported, match=r"left extra \(32x64, .*\) unquantized with int4:tinygemm"):
        quant.quantize_linear(model, "extra", torch.randn(32, 64), quant.parse_spec("int4"))
    with pytest.raises(TypeError, match="not a Linear"):
        quant.quantize_linear(model, "final_norm", torch.randn(128), quant.parse_spec("int8"))


@pytest.mark.parametrize("dtype", ["fp8", "int4"])
def test_cpu_refuses_fp8_and_int4_naming_what_works(dtype):
    with pytest.raises(QuantizationUnsupported, match=r"on the CPU use --dtype int8 or float32") as error:
        check_supported(dtype, "cpu")
    assert f"--dtype {dtype} needs" in str(error.value)
    assert "compute capability" in str(error.value)
    assert check_supported("int8", "cpu").name == "fused"
    assert check_supported("int8", "cpu", "torchao").name == "torchao"
    assert check_supported("bfloat16", "cpu") is None
    # the engine refuses at construction, before anything is read (the folder does not exist)
    with pytest.raises(QuantizationUnsupported, match="--dtype int8 or float32"):
        Engine.from_pretrained("/no/such/folder", EngineConfig(device="cpu", dtype=dtype))
    with pytest.raises(QuantizationUnsupported, match="--dtype int8 or float32"):
        load_model("/no/such/folder", device="cpu", quantize=dtype)


@pytest.mark.parametrize(
    "gpu, capability, dtype, expected",
    [
        ("NVIDIA A100-SXM4-80GB", (8, 0), "fp8", "8.9 or newer; NVIDIA A100-SXM4-80GB has 8.0: use --dtype int8, int4 or bfloat16"),
        ("Tesla T4", (7, 5), "fp8", "Tesla T4 has 7.5: use --dtype int8 or float16"),
        ("Tesla T4", (7, 5), "int4", "8.0 or newer; Tesla T4 has 7.5: use --dtype int8 or float16"),
        ("NVIDIA A100-SXM4-80GB", (8, 0), "int4", None),
        ("NVIDIA H100 80GB HBM3", (9, 0), "fp8", None),
        ("NVIDIA L4", (8, 9), "fp8", None),
    ],
)  # fmt: skip
def test_gpu_capability_decides_fp8_and_int4(monkeypatch, gpu, capability, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    if expected is None:
        assert check_supported(dtype, torch.device("cuda", 0)).name == quant.DEFAULT_METHODS[dtype]
    else:
        with pytest.raises(QuantizationUnsupported) as error:
            check_supported(dtype, torch.device("cuda", 0))
        assert expected in str(error.value)


def test_engine_config_quant_method():
    assert EngineConfig(dtype="int4").quant_method is None  # int4 is a dtype now; checked at Engine()
    assert EngineConfig(dtype="int8", quant_method="torchao").quant_method == "torchao"
    with pytest.raises(ValueError, match="int8 has no method 'hqq'"):
        EngineConfig(dtype="int8", quant_method="hqq")
    with pytest.raises(ValueError, match="needs a quantized dtype"):
        EngineConfig(dtype="bfloat16", quant_method="torchao")
    assert EngineConfig(device="cpu", dtype="int8").activation_dtype() == torch.float32


@pytest.mark.slow
def test_torchao_int8_compiled_decode_step_equals_eager(llm_folder):
    """torch.compile traces torchao's tensors inside the decode step's per-layer functions (dynamic batch
    sizes, inductor's CPU backend) and gives the eager logits."""
    eager = load_model(llm_folder, dtype="float32", quantize="int8", method="torchao").model
    models, caches, rope = prefilled_with_compiled_copy(eager, torch.float32, slot=1)
    with torch.inference_mode():
        scratch = caches[0].scratch_position
        for tokens, positions in (([0, IDS[9]], [scratch, 9]), ([0, IDS[10], 0, 7], [scratch, 10, scratch, scratch])):
            logits = [
                model.decode(torch.tensor(tokens), torch.tensor(positions), cache, rope, kv_len=16)
                for model, cache in zip(models, caches)
            ]
            torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_engine_serves_torchao_int8(llm_folder, tiny_llm):
    """The engine with torchao int8 weights (loaded by the engine from the folder): continuous batching
    gives each prompt the tokens it gets alone, and the greedy tokens are the float model's top choice
    at nearly every step."""
    import asyncio

    from glm4voice.llm.engine import SamplingParams

    prompts = [[5, 9, 13], list(range(100, 141)), [7] * 12, [3000, 2, 17000, 44, 9]]
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    config = EngineConfig(device="cpu", dtype="int8", quant_method="torchao", max_batch_size=4, max_seq_len=128,
                          prefill_chunk=16)  # fmt: skip

    async def collect(stream):
        return [t async for t in stream]

    async def main():
        async with Engine.from_pretrained(str(llm_folder), config, stop_ids=()) as engine:
            alone = [await collect(engine.submit(p, greedy)) for p in prompts]
            together = await asyncio.gather(*(collect(engine.submit(p, greedy)) for p in prompts))
            return alone, list(together)

    alone, together = asyncio.run(main())
    assert together == alone and all(len(t) == 16 for t in alone)
    agree = []
    for prompt, tokens in zip(prompts, alone):
        logits = tiny_llm.model(torch.tensor(prompt + tokens))[len(prompt) - 1 : -1]
        agree += (logits.argmax(-1) == torch.tensor(tokens)).tolist()
    assert sum(agree) / len(agree) >= 0.9
