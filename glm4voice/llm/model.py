"""GLM-4-Voice-9B as a compact decoder with a preallocated KV cache.

Why our own module and not transformers' ``GlmForCausalLM``: the engine needs two entry points that
a generic model does not offer: a chunked prefill that writes one slot of a static KV cache, and a
batched one-token decode step over many slots of that cache, written with static shapes so that it
can be captured as a single CUDA graph (the host is launch-bound; see docs/ORIGINAL.md). The
math is 60 lines here, the checkpoint's fused ``query_key_value`` and ``dense_h_to_4h`` tensors stay
fused (fewer, larger matmuls, and a rename-only key mapping), and the per-token parts of a layer are
plain functions of ``(layer, tensors)`` so that ``torch.compile`` traces them once for all 40
layers. transformers' GLM stays the independent reference (``glm4voice.llm.hf_glm``, tests, bench).

The math of the ChatGLM code (glm-4-voice-9b ``modeling_chatglm.py``), per layer:
``x += dense(attn(rope(qkv(rmsnorm(x)))))``; ``x += dense_4h_to_h(silu(gate) * up)`` with
``[gate | up] = dense_h_to_4h(rmsnorm(x))``. RMSNorm computes in float32. Rotary embeddings act on
the first half of each head's dims, on interleaved pairs ``(2i, 2i+1)``, angle ``pos * base^(-2i/r)``
with ``r = head_dim / 2`` and ``base = 10000 * rope_ratio``. Grouped-query attention: query head
``h`` reads key/value head ``h // (num_heads / num_kv_heads)``; scale ``1/sqrt(head_dim)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from glm4voice.llm import decode_attention as attention
from glm4voice.llm.config import GLMConfig
from glm4voice.llm.decode_attention import SDPA_BACKENDS, masked_softmax


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class Linear(nn.Module):
    """``y = x W^T (+ b)``. ``W`` is floating point, or quantized: a torchao tensor that implements
    ``F.linear`` itself, or int8 in :class:`glm4voice.llm.quant.FusedInt8Linear` (see glm4voice.llm.quant)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Block(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.attn_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.qkv = Linear(config.hidden_size, config.qkv_size, bias=config.qkv_bias)
        self.out = Linear(config.q_size, config.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.gate_up = Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.down = Linear(config.ffn_hidden_size, config.hidden_size, bias=False)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the first ``2 * cos.shape[-1]`` dims of each head.
    ``x``: [tokens, heads, head_dim]; ``cos``/``sin``: [tokens, rotary_dim // 2] (float32)."""
    rot = 2 * cos.shape[-1]
    pairs = x[..., :rot].float().unflatten(-1, (rot // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)


def attention_inputs(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Per-token first half of a layer: ``x`` [n, hidden] -> q [n, H, d] and the new keys and
    values stacked, [2, n, KV, d] (one buffer, so one cache write takes both)."""
    qkv = block.qkv(block.attn_norm(x))
    q, k, v = qkv.split([block.q_size, block.kv_size, block.kv_size], dim=-1)
    q = apply_rope(q.unflatten(-1, (block.num_heads, block.head_dim)), cos, sin)
    k = apply_rope(k.unflatten(-1, (block.num_kv_heads, block.head_dim)), cos, sin)
    return q, torch.stack((k, v.unflatten(-1, (block.num_kv_heads, block.head_dim))))


def attention_output_and_mlp(block: Block, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Per-token second half of a layer: output projection, residual, SwiGLU MLP, residual."""
    x = x + block.out(context)
    gate, up = block.gate_up(block.mlp_norm(x)).chunk(2, dim=-1)
    return x + block.down(F.silu(gate) * up)


def final_logits(model: GLMModel, x: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.final_norm(x)).float()


# The decode step's per-layer functions. They cut a layer where the attention kernel sits, and carry
# each layer's MLP output (``delta``) into the next function instead of adding it at once: the next
# layer's residual add and RMSNorm then compile into one kernel, and the new keys/values are written
# into the cache by the kernel that applies the rotary embedding (no separate copy kernels).


def decode_layer_inputs(block: Block, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor,
                        sin: torch.Tensor, layer_cache: torch.Tensor, cache_rows: torch.Tensor):  # fmt: skip
    """``x`` [b, hidden] the residual stream, ``delta`` [b, hidden] the previous layer's MLP output not
    yet added (None for the first layer). Writes the rows' new keys and values into ``layer_cache``
    (one layer of the cache viewed as rows of ``head_dim``) at ``cache_rows`` [2 * b * KV]; returns
    (x + delta, q [b, H, d])."""
    if delta is not None:
        x = x + delta
    q, kv = attention_inputs(block, x, cos, sin)  # kv [2, b, KV, d]
    layer_cache.index_copy_(0, cache_rows, kv.reshape(-1, kv.shape[-1]))
    return x, q


def decode_layer_outputs(block: Block, x: torch.Tensor, context: torch.Tensor):
    """Output projection, residual, SwiGLU MLP: returns (x + attention output, MLP output), the
    MLP output to be added by the next layer's :func:`decode_layer_inputs` (or :func:`decode_logits`)."""
    x = x + block.out(context)
    gate, up = block.gate_up(block.mlp_norm(x)).chunk(2, dim=-1)
    return x, block.down(F.silu(gate) * up)


def decode_logits(model: GLMModel, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return final_logits(model, x + delta)


DECODE_STEPS = (decode_layer_inputs, decode_layer_outputs, decode_logits)
PREFILL_STEPS = (attention_inputs, attention_output_and_mlp, final_logits)


@dataclass
class KVCache:
    """Keys and values of every layer for a fixed number of slots (one per running stream).

    One tensor ``kv`` of layout ``[layers, 2 (key, value), slots, kv_heads, capacity, head_dim]``:
    a slot's keys of one head are contiguous, so attention reads them as plain strided matrices,
    and a decode step writes the new keys and values of all rows with one indexed copy.
    ``capacity`` is ``max_seq_len + 1``: the last position is scratch space where idle rows of a
    padded decode batch write, never read by a live stream.
    """

    kv: torch.Tensor

    @classmethod
    def allocate(cls, config: GLMConfig, slots: int, max_seq_len: int, dtype: torch.dtype, device) -> KVCache:
        shape = (config.num_layers, 2, slots, config.num_kv_heads, max_seq_len + 1, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device))

    @property
    def k(self) -> torch.Tensor:
        """Keys, [layers, slots, kv_heads, capacity, head_dim] (a view)."""
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]

    @property
    def slots(self) -> int:
        return self.kv.shape[2]

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def max_seq_len(self) -> int:
        return self.capacity - 1

    @property
    def scratch_position(self) -> int:
        return self.capacity - 1

    def row_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of one layer's cache seen as ``[2 * slots * kv_heads * capacity, head_dim]`` that
        hold (key|value, slot, head, position), ordered like ``[2, len(slots), kv_heads]``."""
        kv_heads = self.kv.shape[3]
        which = torch.arange(2, device=slots.device)[:, None, None]
        heads = torch.arange(kv_heads, device=slots.device)[None, None, :]
        slot_heads = (which * self.slots + slots[None, :, None]) * kv_heads + heads
        return (slot_heads * self.capacity + positions[None, :, None]).reshape(-1)

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


StepFunctions = tuple[Callable, Callable, Callable]


class GLMModel(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.steps: StepFunctions = PREFILL_STEPS
        """The per-token functions of prefill; :meth:`compile_steps` swaps in compiled versions."""
        self.decode_steps: StepFunctions = DECODE_STEPS
        """The per-layer functions of a decode step (compiled likewise)."""
        self.softmax: Callable = masked_softmax
        self.decode_attention = "auto"
        """One of glm4voice.llm.decode_attention.DECODE_ATTENTION ("auto": the Triton kernel on CUDA
        when Triton is importable, else "matmul")."""

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (the norms' dtype; linear weights may be quantized)."""
        return self.final_norm.weight.dtype

    def compile_steps(self, **compile_options) -> None:
        """torch.compile the per-token functions (compiled once, shared by all layers; the
        number of tokens is dynamic)."""
        self.steps = _compiled_steps(PREFILL_STEPS, compile_options)
        self.decode_steps = _compiled_steps(DECODE_STEPS, compile_options)
        self.softmax = dynamic_rows(torch.compile(masked_softmax, **compile_options), last_dim=True)

    def eager_steps(self) -> None:
        self.steps = PREFILL_STEPS
        self.decode_steps = DECODE_STEPS
        self.softmax = masked_softmax

    def rope_tables(self, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, float32 [length, rotary_dim // 2], for positions 0..length-1."""
        r = self.config.rotary_dim
        device = device if device is not None else self.device
        theta = 1.0 / (self.config.rope_base ** (torch.arange(0, r, 2, dtype=torch.float64, device=device) / r))
        angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device), theta)
        return angles.cos().float(), angles.sin().float()

    # --- prefill: one slot, a chunk of consecutive positions ------------------------------------------
    def prefill(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        slot: int,
        start: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        last_only: bool = True,
    ) -> torch.Tensor:
        """Run ``ids`` (1-D, positions ``start ..``) through the model for cache slot ``slot``,
        writing its keys and values; return float32 logits of the last position (or all)."""
        attn_in, attn_out, logits = self.steps
        n = ids.shape[0]
        end = start + n
        if end > cache.max_seq_len:
            raise ValueError(f"positions up to {end} do not fit the KV cache ({cache.max_seq_len})")
        positions = torch.arange(start, end, device=ids.device)
        cos, sin = rope[0][positions], rope[1][positions]
        group = self.config.group_size
        query_pos = positions[:, None]
        mask = None if start == 0 else torch.arange(end, device=ids.device)[None, :] <= query_pos
        x = self.embed(ids)
        for layer, block in enumerate(self.layers):
            q, kv = attn_in(block, x, cos, sin)
            slot_cache = cache.kv[layer, :, slot]  # [2, KV, capacity, d]
            slot_cache[:, :, start:end] = kv.transpose(1, 2)
            keys = slot_cache[0, :, :end].repeat_interleave(group, dim=0)
            values = slot_cache[1, :, :end].repeat_interleave(group, dim=0)
            with sdpa_kernel(SDPA_BACKENDS):
                context = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, is_causal=mask is None
                )
            x = attn_out(block, x, context[0].transpose(0, 1).reshape(n, -1))
        return logits(self, x[-1:] if last_only else x)

    def prefill_first_chunk(
        self,
        ids: torch.Tensor,
        last: torch.Tensor,
        slot: torch.Tensor,
        cache: KVCache,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """:meth:`prefill` of positions ``0 .. len(ids)-1`` with static shapes (what a prefill CUDA
        graph captures): ``slot`` and ``last`` are 1-element device tensors, so one graph serves every
        slot and prompt length up to ``len(ids)``. ``ids`` may be padded past the prompt: causal
        attention keeps the padding out of the prompt's rows, and the keys/values it writes past the
        prompt are overwritten by decode steps before any step reads them. Returns float32 logits
        [1, vocab] of row ``last``."""
        attn_in, attn_out, logits = self.steps
        n = ids.shape[0]
        cos, sin = rope[0][:n], rope[1][:n]
        group = self.config.group_size
        x = self.embed(ids)
        for layer, block in enumerate(self.layers):
            q, kv = attn_in(block, x, cos, sin)
            new = kv.transpose(1, 2)  # [2, KV, n, d]
            cache.kv[layer, :, :, :, :n].index_copy_(1, slot, new.unsqueeze(1))
            keys = new[0].repeat_interleave(group, dim=0)
            values = new[1].repeat_interleave(group, dim=0)
            with sdpa_kernel(SDPA_BACKENDS):
                context = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], keys[None], values[None], is_causal=True
                )
            x = attn_out(block, x, context[0].transpose(0, 1).reshape(n, -1))
        return logits(self, x.index_select(0, last))

    def prefill_continued_chunk(
        self,
        ids: torch.Tensor,
        meta: torch.Tensor,
        cache: KVCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_len: int,
    ) -> torch.Tensor:
        """:meth:`prefill` of a chunk that continues a sequence already in the cache (a new turn after a
        prefix-cache hit), with static shapes (what a continuation prefill CUDA graph captures).

        ``ids`` [L]: the chunk padded to a fixed length L; ``meta`` int64 [3] on the device: (slot,
        start position, number of real ids n). Row i (< n) sits at position ``start + i``, writes its
        key/value there and attends over the slot's positions ``<= start + i`` among the first
        ``kv_len`` (``start + n <= kv_len``); padding rows write to the cache's scratch position and
        their outputs are ignored. Returns float32 logits [1, vocab] of the last real row.

        Attention: with the Triton decode backend, every row is a decode query at its own position
        (the split-K kernel reads only the positions a row sees, however large ``kv_len``; a masked
        SDPA over the whole ``kv_len`` ran one program per 64 query rows of each key/value head, 64
        programs on 132 streaming multiprocessors, and took ~70 us per layer per 1024 positions on an
        H100). Otherwise one masked SDPA call."""
        attn_in, attn_out, logits = self.steps
        L = ids.shape[0]
        kv_heads, group, head_dim = self.config.num_kv_heads, self.config.group_size, self.config.head_dim
        triton = attention.resolve(self.decode_attention, ids.device, head_dim) == "triton"
        slot, start, n = meta[0:1], meta[1:2], meta[2:3]
        rows = torch.arange(L, device=ids.device)
        real = rows < n  # [L]
        positions = torch.where(real, start + rows, cache.scratch_position)  # [L]
        cos, sin = rope[0][positions], rope[1][positions]  # [L, rotary/2]
        slots = slot.repeat(L)  # [L] (the Triton kernel reads one slot per row: no stride-0 view)
        cache_rows = cache.row_index(slots, positions)  # [2 * L * KV]
        # the last position each row sees: its own; a padding row sees position 0 only (any valid
        # position keeps its softmax finite)
        seen = torch.where(real, positions, 0)  # [L]
        # [group * L, kv_len] (SDPA only): query row (g, i) sees positions <= seen[i]
        mask = None if triton else (torch.arange(kv_len, device=ids.device)[None, :] <= seen[:, None]).repeat(group, 1)
        x = self.embed(ids)  # [L, hidden]
        for layer, block in enumerate(self.layers):
            q, kv = attn_in(block, x, cos, sin)  # [L, H, d], [2, L, KV, d]
            layer_cache = cache.kv[layer]  # [2, slots, KV, capacity, d]
            layer_cache.view(-1, head_dim).index_copy_(0, cache_rows, kv.reshape(-1, head_dim))
            q = q.view(L, kv_heads, group, head_dim)
            if triton:
                context = attention.attend_triton(
                    q, layer_cache[0], layer_cache[1], slots, seen, kv_len, head_dim**-0.5
                )
            else:
                assert mask is not None
                context = _attend_chunk_sdpa(q, layer_cache, slot, mask, kv_len)
            x = attn_out(block, x, context.reshape(L, -1))  # [L, KV, group, d] -> [L, H * d]
        return logits(self, x.index_select(0, n - 1))

    # --- decode: one new token for each of the first b slots ----------------------------------------
    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_len: int,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tokens``/``positions``/``slots`` [b]: row i works on cache slot ``slots[i]`` (default:
        slot i). Writes each row's key/value at its position and attends over the slot's first
        ``kv_len`` positions (masked beyond its own position). Static shapes for a given (b, kv_len):
        this is what a CUDA graph captures. Returns float32 logits [b, vocab]."""
        layer_inputs, layer_outputs, logits = self.decode_steps
        b = tokens.shape[0]
        slots = torch.arange(b, device=tokens.device) if slots is None else slots
        cos, sin = rope[0][positions], rope[1][positions]  # [b, rotary/2]
        kv_heads, group, head_dim = self.config.num_kv_heads, self.config.group_size, self.config.head_dim
        backend, scale = attention.resolve(self.decode_attention, tokens.device, head_dim), head_dim**-0.5
        # additive mask [b, 1, 1, kv_len] shared by all layers and heads (the Triton kernel reads positions)
        mask = None if backend == "triton" else attention.visible_mask(positions, kv_len, self.dtype)
        cache_rows = cache.row_index(slots, positions)  # [2 * b * KV]
        x, delta = self.embed(tokens), None  # [b, hidden]
        for layer, block in enumerate(self.layers):
            layer_cache = cache.kv[layer]  # [2, slots, KV, capacity, d]
            x, q = layer_inputs(block, x, delta, cos, sin, layer_cache.view(-1, head_dim), cache_rows)
            # the query heads of a group become the query axis: no key/value expansion needed
            q = q.view(b, kv_heads, group, head_dim)
            context = attention.attend(backend, q, layer_cache, slots, positions, kv_len, scale, mask, self.softmax)
            x, delta = layer_outputs(block, x, context.reshape(b, -1))
        return logits(self, x, delta)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain full forward of one sequence (1-D ids): float32 logits for every position."""
        n = ids.shape[0]
        cache = KVCache.allocate(self.config, 1, n, self.dtype, ids.device)
        return self.prefill(ids, cache, 0, 0, self.rope_tables(n, ids.device), last_only=False)


def _compiled_steps(steps: StepFunctions, compile_options: dict[str, Any]) -> StepFunctions:
    """Each of ``steps`` compiled (:func:`dynamic_rows`), in order."""
    first, second, third = (dynamic_rows(torch.compile(fn, **compile_options)) for fn in steps)
    return first, second, third


def dynamic_rows(fn: Callable, last_dim: bool = False) -> Callable:
    """Mark the leading (token) axis of tensor arguments dynamic so one compiled graph serves
    every batch size and chunk length (size 1 gets its own specialisation, as dynamo always does);
    with ``last_dim`` the last axis too (attention lengths)."""

    def call(*args):
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dim():
                if arg.shape[0] > 1:
                    torch._dynamo.maybe_mark_dynamic(arg, 0)
                if last_dim and arg.shape[-1] > 1:
                    torch._dynamo.maybe_mark_dynamic(arg, arg.dim() - 1)
        return fn(*args)

    return call


def build_meta_model(config: GLMConfig) -> GLMModel:
    """The module with every tensor on the meta device (no memory); the loader fills it."""
    with torch.device("meta"):
        return GLMModel(config)


def _attend_chunk_sdpa(
    q: torch.Tensor, layer_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor, kv_len: int
) -> torch.Tensor:
    """A continued chunk's attention as one masked SDPA call: q [L, KV, group, d] over the first ``kv_len``
    positions of ``slot`` in ``layer_cache`` [2, slots, KV, capacity, d]; ``mask`` [group * L, kv_len] ->
    [L, KV, group, d]."""
    L, kv_heads, group, head_dim = q.shape
    slot_kv = layer_cache.index_select(1, slot)[:, 0, :, :kv_len]  # [2, KV, kv_len, d]
    # the query heads of a group and the rows become one query axis: [KV, group * L, d]
    q = q.permute(1, 2, 0, 3).reshape(kv_heads, group * L, head_dim)
    with sdpa_kernel(SDPA_BACKENDS):
        context = F.scaled_dot_product_attention(q[None], slot_kv[0][None], slot_kv[1][None], attn_mask=mask)
    # [1, KV, group * L, d] -> [L, KV, group, d] (head h = kv * group + g, as the q rows)
    return context[0].view(kv_heads, group, L, head_dim).permute(2, 0, 1, 3)
