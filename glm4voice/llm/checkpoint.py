"""Load the published glm-4-voice-9b folder (ChatGLM keys, sharded safetensors) without remote code.

The module is built on the meta device; every tensor is read straight from its safetensors shard
onto the target device, cast, optionally quantized (glm4voice.llm.quant: one linear weight at a time,
so a quantized model never needs its 16-bit size in memory), and assigned. The key mapping is a table of
exact patterns: any published key it does not know, any model tensor no key fills, and any shape
mismatch is an error naming the key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from glm4voice.hub import resolve_checkpoint
from glm4voice.llm.config import GLMConfig, generation_stop_ids
from glm4voice.llm.model import GLMModel, Linear, build_meta_model

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model")
"""Files of the published folder this package reads (hub download filter)."""

_LAYER = r"transformer\.encoder\.layers\.(\d+)\."
KEY_TABLE: tuple[tuple[str, str], ...] = (
    (r"transformer\.embedding\.word_embeddings\.weight", "embed.weight"),
    (_LAYER + r"input_layernorm\.weight", "layers.{}.attn_norm.weight"),
    (_LAYER + r"self_attention\.query_key_value\.weight", "layers.{}.qkv.weight"),
    (_LAYER + r"self_attention\.query_key_value\.bias", "layers.{}.qkv.bias"),
    (_LAYER + r"self_attention\.dense\.weight", "layers.{}.out.weight"),
    (_LAYER + r"post_attention_layernorm\.weight", "layers.{}.mlp_norm.weight"),
    (_LAYER + r"mlp\.dense_h_to_4h\.weight", "layers.{}.gate_up.weight"),
    (_LAYER + r"mlp\.dense_4h_to_h\.weight", "layers.{}.down.weight"),
    (r"transformer\.encoder\.final_layernorm\.weight", "final_norm.weight"),
    (r"transformer\.output_layer\.weight", "lm_head.weight"),
)
"""Published ChatGLM key (regex) -> our parameter name (``{}`` = layer index)."""

ROTARY_BUFFER_KEY = "transformer.rotary_pos_emb.inv_freq"
"""A persistent buffer of the ChatGLM code that ``save_pretrained`` may have written. Its values are
never used (that code recomputes the frequencies from ``rope_ratio``); accepted if present with the
right shape, not required."""

_COMPILED_TABLE = tuple((re.compile(pattern), target) for pattern, target in KEY_TABLE)


EMBEDDING_WEIGHT = "embed.weight"


class CheckpointError(ValueError):
    """The folder's weights do not match the model its config.json describes."""


def map_key(key: str) -> str | None:
    """Our parameter name for a published key; None for the ignorable rotary buffer;
    CheckpointError for anything else."""
    if key == ROTARY_BUFFER_KEY:
        return None
    for pattern, target in _COMPILED_TABLE:
        match = pattern.fullmatch(key)
        if match:
            return target.format(*match.groups())
    raise CheckpointError(f"unknown checkpoint key {key!r} (not in the ChatGLM key table)")


def published_key_names(model: GLMModel) -> dict[str, str]:
    """Inverse table for this model: published key -> our parameter name (every parameter)."""
    names = {}
    for name, _ in model.named_parameters():
        published = _to_published(name)
        names[published] = name
    return names


def _to_published(name: str) -> str:
    for pattern, target in KEY_TABLE:
        regex = "^" + re.escape(target).replace(r"\{\}", r"(\d+)") + "$"
        match = re.match(regex, name)
        if match:
            published = pattern.replace(r"(\d+)", "{}").replace("\\", "")
            return published.format(*match.groups())
    raise CheckpointError(f"parameter {name!r} has no published key")


def shard_files(folder: Path) -> dict[str, Path]:
    """Published key -> the safetensors file holding it (sharded index, or one file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"cannot read {index}: {error}") from error
        files = {key: folder / name for key, name in weight_map.items()}
        missing = sorted({path.name for path in files.values() if not path.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shards that are not in the folder: {missing}")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def check_key_set(model: GLMModel, keys) -> dict[str, str]:
    """Map every published key; fail on unknown keys and on parameters no key provides."""
    mapping: dict[str, str] = {}
    for key in keys:
        target = map_key(key)
        if target is not None:
            mapping[key] = target
    wanted = {name for name, _ in model.named_parameters()}
    unexpected = sorted(key for key, name in mapping.items() if name not in wanted)
    if unexpected:
        raise CheckpointError(f"checkpoint keys for layers this config does not have: {unexpected[:5]}")
    missing = sorted(wanted - set(mapping.values()))
    if missing:
        published = published_key_names(model)
        inverse = {ours: theirs for theirs, ours in published.items()}
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {[inverse[m] for m in missing[:5]]}")
    return mapping


@dataclass(frozen=True)
class LoadedModel:
    model: GLMModel
    config: GLMConfig
    stop_ids: frozenset[int]
    folder: Path


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_model(
    path_or_id: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.bfloat16,
    quantize: str | None = None,
    method: str | None = None,
) -> LoadedModel:
    """Read a glm-4-voice-9b folder (or hub id) into :class:`GLMModel` on ``device``.

    ``dtype``: activation and (unquantized) weight dtype. ``quantize``: ``"int8"``, ``"fp8"`` or
    ``"int4"`` weights for every linear layer, with ``method`` (None: the dtype's default;
    glm4voice.llm.quant.METHODS), and an int8 embedding table (the norms stay ``dtype``). A dtype
    this device cannot run is a :class:`glm4voice.llm.quant.QuantizationUnsupported` error before
    anything is read.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    chosen = _quant_method(quantize, method, device)
    folder = resolve_checkpoint(path_or_id, allow_patterns=ALLOW_PATTERNS)
    config = GLMConfig.from_folder(folder)
    model = build_meta_model(config)
    files = shard_files(folder)
    mapping = check_key_set(model, files)
    if ROTARY_BUFFER_KEY in files:
        _check_rotary_buffer(files[ROTARY_BUFFER_KEY], config)
    params = dict(model.named_parameters())
    linear_weights = _linear_weight_names(model)
    for key, tensor in _read_tensors(files, mapping, device):
        name = mapping[key]
        expected = tuple(params[name].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{key}: shape {tuple(tensor.shape)}, but config.json implies {expected}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{key}: dtype {tensor.dtype} is not floating point")
        if config.qkv_per_head and name.rsplit(".", 2)[-2] == "qkv":
            tensor = per_head_qkv_to_grouped(tensor, config.num_heads, config.head_dim)
        tensor = tensor.to(dtype)
        _place(model, name, tensor, chosen, linear_weights)
    model.eval()
    _release_staging(chosen, device)
    stop_ids = generation_stop_ids(folder, config)
    logger.info("loaded %s: %d layers, %.2f B parameters, %s%s on %s", folder, config.num_layers,
                config.num_parameters() / 1e9, str(dtype).removeprefix("torch."),
                f" + {chosen.spec} weights" if chosen else "", device)  # fmt: skip
    return LoadedModel(model, config, stop_ids, folder)


def per_head_qkv_to_grouped(tensor: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``query_key_value`` rows (weight [3*H*d, hidden] or bias [3*H*d]) from the per-head layout of
    ``multi_query_attention: false`` checkpoints, ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``, into
    ``[q_0 .. q_{H-1} | k_0 .. | v_0 ..]`` (each piece ``d`` rows)."""
    rest = tensor.shape[1:]
    # [H, 3, d, *rest] -> [3, H, d, *rest]
    return tensor.unflatten(0, (heads, 3, head_dim)).transpose(0, 1).reshape(3 * heads * head_dim, *rest).contiguous()


def _read_tensors(
    files: dict[str, Path], mapping: dict[str, str], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for key in mapping:
        by_file.setdefault(files[key], []).append(key)
    # safetensors can place tensors on a CUDA device directly; CPU otherwise
    target = str(device) if device.type == "cuda" else "cpu"
    for path, keys in by_file.items():
        with safe_open(path, framework="pt", device=target) as f:
            for key in keys:
                yield key, f.get_tensor(key)


def _check_rotary_buffer(path: Path, config: GLMConfig) -> None:
    with safe_open(path, framework="pt") as f:
        shape = tuple(f.get_slice(ROTARY_BUFFER_KEY).get_shape())
    if shape != (config.rotary_dim // 2,):
        raise CheckpointError(f"{ROTARY_BUFFER_KEY}: shape {shape}, expected ({config.rotary_dim // 2},)")


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


def random_model(
    config: GLMConfig,
    device,
    dtype: torch.dtype,
    seed: int = 0,
    quantize: str | None = None,
    method: str | None = None,
) -> GLMModel:
    """A model of ``config``'s shape with random weights made directly on ``device`` (for
    benchmarks: no 19 GB host tensors), optionally quantized as :func:`load_model` does. Scales keep
    activations O(1) through the layers. The same seed gives the same floating-point weights
    whatever ``quantize`` is (so quantized variants compare against the same model)."""
    chosen = _quant_method(quantize, method, torch.device(device))
    model = build_meta_model(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    linears = _linear_weight_names(model)
    for name, param in list(model.named_parameters()):
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(param.shape, generator=generator, device=device)
        elif name.endswith(".bias"):
            tensor = 0.1 * torch.randn(param.shape, generator=generator, device=device)
        else:
            fan_in = param.shape[1]
            std = 1.0 if name == EMBEDDING_WEIGHT else fan_in**-0.5
            tensor = std * torch.randn(param.shape, generator=generator, device=device)
        _place(model, name, tensor.to(dtype), chosen, linears)
    _release_staging(chosen, torch.device(device))
    return model.eval()


def _place(model: GLMModel, name: str, tensor: torch.Tensor, method, linears: dict[str, str]) -> None:
    """Assign one tensor, quantized if ``method`` is set and it is a linear weight or the embedding."""
    from glm4voice.llm import quant

    if method is not None and name in linears:
        quant.quantize_linear(model, linears[name], tensor, method)
    elif method is not None and name == EMBEDDING_WEIGHT:
        quant.quantize_embedding(model, EMBEDDING_WEIGHT.rpartition(".")[0], tensor)
    else:
        _assign(model, name, tensor)


def _release_staging(method, device: torch.device) -> None:
    """After a quantized load on a GPU: hand the 16-bit staging copies (and the quantizer's float32
    temporaries, up to a few GB for the output layer) back to the driver, so the process holds about
    the quantized size and not the largest temporary too (what a small card and nvidia-smi see)."""
    if method is not None and device.type == "cuda":
        torch.cuda.empty_cache()


def _linear_weight_names(model: GLMModel) -> dict[str, str]:
    """Weight parameter name -> its Linear module's name (the tensors quantization replaces)."""
    return {f"{name}.weight": name for name, module in model.named_modules() if isinstance(module, Linear)}


def _quant_method(quantize: str | None, method: str | None, device: torch.device):
    """The quantization method to apply (None for float weights), checked against ``device``."""
    from glm4voice.llm import quant

    if quantize is None:
        if method is not None:
            raise ValueError(f"a quantization method ({method!r}) needs a quantized dtype")
        return None
    if quantize not in quant.QUANTIZED_DTYPES:
        raise ValueError(f"quantize must be None or one of {', '.join(quant.QUANTIZED_DTYPES)}, got {quantize!r}")
    return quant.check_supported(quantize, device, method)
