"""Attention of a decode step: each row's one new query against its slot's cached keys and values.

Grouped-query attention: the ``G`` query heads of key/value head ``h`` (query heads ``h*G .. h*G+G-1``)
share its keys, so the query of a row is laid out ``[b, KV, G, d]`` and every key is read once for
its whole group. Row ``i`` works on cache slot ``slots[i]`` (a decode batch holds the running
streams whatever their slots) and sees positions ``0 .. positions[i]`` among the first ``kv_len``
(all of them for an idle row parked at the scratch position, whose output is ignored).

Backends (``DECODE_ATTENTION``):

* ``"matmul"``: two batched matmuls around a masked float32 softmax, pure torch (the reference, and
  the path on the CPU), on the rows' slots gathered from the cache;
* ``"sdpa"``: one ``scaled_dot_product_attention`` call with an additive mask, likewise;
* ``"triton"``: split-K flash decoding in two Triton kernels, reading the cache in place through the
  slot indices. Kernel 1 runs one program per (row,
  key/value head, split of the positions): it streams its keys and values once, in blocks of
  ``BLOCK_N``, with an online softmax, and writes its partial maximum, sum and weighted values;
  kernel 2 merges the splits. Splits give a batch-1 step enough programs to use the GPU; their
  number is a function of (b, kv_len) only, so one CUDA graph per shape stays valid.
* ``"auto"``: ``"triton"`` on CUDA when Triton is importable and the head size is a power of two,
  else ``"matmul"``.

The matmul path is the reference because it is faster than SDPA on a graphed 9B decode step at
every batch and cache length measured; ``bench/llm.py`` (``decode_microbench``) times the three
backends side by side, and docs/perf/llm.md keeps the figures.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DECODE_ATTENTION = ("auto", "matmul", "sdpa", "triton")

SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""cuDNN attention is left out: it builds a plan for every new shape, and with varying prompt
chunks that made prefill under load several times slower (time to first token: docs/perf/llm.md)."""

BLOCK_N = 64
"""Keys per inner step of the Triton kernel."""
TARGET_PROGRAMS = 256
"""Split the positions until (rows x key/value heads x splits) reaches about this many programs
(about two per streaming multiprocessor of an H100)."""
MAX_SPLITS = 16
"""Most splits of one row's positions. Kernel 2 merges the splits one after another, so many short
splits make a long history slow: at batch 1 with a 2580-token history, 48 splits of one block spent
0.54 ms of an 8.4 ms bf16 step merging (H100), and the 5th turn of a conversation paid that for each
of its 23 tokens before the first audio. Short histories keep their one-block splits (one stream at
150 positions: 4 splits; fewer, longer ones made that step 0.2 ms slower)."""


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(backend: str, device: torch.device, head_dim: int) -> str:
    """The backend ``"auto"`` stands for on ``device`` (others are returned as they are)."""
    if backend not in DECODE_ATTENTION:
        raise ValueError(f"decode attention must be one of {DECODE_ATTENTION}, got {backend!r}")
    if backend != "auto":
        return backend
    usable = device.type == "cuda" and triton_available() and head_dim & (head_dim - 1) == 0
    return "triton" if usable else "matmul"


def visible_mask(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [b, 1, 1, kv_len]: 0 where row i may look (position <= positions[i]), -inf beyond."""
    visible = torch.arange(kv_len, device=positions.device)[None, :] <= positions[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill_(~visible, float("-inf"))
    return mask[:, None, None, :]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scores * scale + mask) in float32, cast back to the scores' dtype."""
    return torch.softmax(scores.float() * scale + mask.float(), dim=-1).to(scores.dtype)


def attend_matmul(q, keys, values, mask, scale, softmax=masked_softmax) -> torch.Tensor:
    """q [b, KV, G, d]; keys/values [b, KV, kv_len, d]; mask from :func:`visible_mask` -> [b, KV, G, d]."""
    return torch.matmul(softmax(torch.matmul(q, keys.transpose(-1, -2)), mask, scale), values)


def attend_sdpa(q, keys, values, mask) -> torch.Tensor:
    with sdpa_kernel(SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def split_plan(rows: int, kv_len: int) -> tuple[int, int]:
    """(splits, positions per split, a multiple of BLOCK_N) for ``rows`` = batch x key/value heads."""
    blocks = -(-kv_len // BLOCK_N)
    splits = max(1, min(blocks, -(-TARGET_PROGRAMS // rows), MAX_SPLITS))
    per_split = -(-blocks // splits) * BLOCK_N
    return -(-kv_len // per_split), per_split


def gather(layer_cache: torch.Tensor, slots: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [b, KV, kv_len, d] of the rows' slots from one layer of the cache
    ``[2, slots, KV, capacity, d]`` (a view when the rows are slots 0..b-1, else a copy)."""
    b = slots.shape[0]
    if slots.device.type == "cpu" and torch.equal(slots, torch.arange(b)):
        return layer_cache[0, :b, :, :kv_len], layer_cache[1, :b, :, :kv_len]
    window = layer_cache[:, :, :, :kv_len]
    return window[0].index_select(0, slots), window[1].index_select(0, slots)


def attend_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor, kv_len: int, scale: float) -> torch.Tensor:  # fmt: skip
    """Split-K flash decoding (see the module docstring). ``keys``/``values`` [slots, KV, capacity, d]
    (strided views of the cache are fine: only their last dimension must be contiguous); row i reads
    slot ``slots[i]``'s first ``kv_len`` positions. Returns [b, KV, G, d] in q's dtype."""
    kernels = _triton_kernels()
    b, kv_heads, group, head_dim = q.shape
    if head_dim & (head_dim - 1) or keys.stride(-1) != 1 or values.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the Triton decode attention needs a power-of-two head size and contiguous head rows")
    if not (slots.is_contiguous() and positions.is_contiguous()):
        raise ValueError("the Triton decode attention reads slots and positions as contiguous vectors")
    splits, per_split = split_plan(b * kv_heads, kv_len)
    block_g = max(16, 1 << (group - 1).bit_length())
    # partial results: [b * KV, splits, BLOCK_G] maxima and sums, [b * KV, splits, BLOCK_G, d] values
    part_max = torch.empty(b * kv_heads, splits, block_g, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(b * kv_heads, splits, block_g, head_dim, dtype=torch.float32, device=q.device)
    out = torch.empty(b, kv_heads, group, head_dim, dtype=q.dtype, device=q.device)
    kernels.split[(b * kv_heads, splits)](
        q, keys, values, slots, positions, part_max, part_sum, part_acc,
        q.stride(0), q.stride(1), q.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        kv_len, per_split, scale,
        KV=kv_heads, G=group, BLOCK_G=block_g, D=head_dim, BLOCK_N=BLOCK_N, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    kernels.combine[(b * kv_heads,)](
        part_max, part_sum, part_acc, out, splits, out.stride(0), out.stride(1), out.stride(2),
        KV=kv_heads, G=group, BLOCK_G=block_g, D=head_dim, BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
    )  # fmt: skip
    return out


def attend(backend: str, q: torch.Tensor, layer_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
           kv_len: int, scale: float, mask=None, softmax=masked_softmax) -> torch.Tensor:  # fmt: skip
    """One decode step's attention with ``backend`` (resolved: not "auto"): queries [b, KV, G, d]
    against one layer of the cache [2, slots, KV, capacity, d] for the rows' ``slots`` [b] up to
    their ``positions`` [b] within ``kv_len``; ``mask`` (from :func:`visible_mask`) is needed by
    "matmul" and "sdpa" only."""
    if backend == "triton":
        return attend_triton(q, layer_cache[0], layer_cache[1], slots, positions, kv_len, scale)
    keys, values = gather(layer_cache, slots, kv_len)
    if mask is None:
        mask = visible_mask(positions, kv_len, q.dtype)
    if backend == "sdpa":
        return attend_sdpa(q, keys, values, mask)
    return attend_matmul(q, keys, values, mask, scale, softmax)


@functools.cache
def _triton_kernels():
    """Compile-on-first-use Triton kernels (imported lazily: the CPU path never needs Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split(Q, K, V, SLOTS, POS, MAX, SUM, ACC,
              stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
              kv_len, per_split, scale,
              KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
              IEEE: tl.constexpr):  # fmt: skip
        row_head = tl.program_id(0)
        part = tl.program_id(1)
        row = row_head // KV
        head = row_head % KV
        length = tl.minimum(tl.load(POS + row) + 1, kv_len)
        start = part * per_split
        end = tl.minimum(start + per_split, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        # the group's queries [BLOCK_G, D] (rows past G are zeros, never stored by kernel 2)
        q = tl.load(Q + row * stride_qb + head * stride_qh + g[:, None] * stride_qg + d[None, :],
                    mask=g[:, None] < G, other=0.0)  # fmt: skip
        running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        slot = tl.load(SLOTS + row)
        k_base = K + slot * stride_kb + head * stride_kh
        v_base = V + slot * stride_vb + head * stride_vh
        for first in range(start, end, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            valid = n < end
            k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
            if IEEE:  # float32 inputs: full precision, not TF32 (tl.dot's default)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_N], float32
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            rescale = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * rescale + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            running_max = new_max
        out = (row_head * tl.num_programs(1) + part) * BLOCK_G + g
        tl.store(MAX + out, running_max)
        tl.store(SUM + out, running_sum)
        tl.store(ACC + out[:, None] * D + d[None, :], acc)

    @triton.jit
    def combine(MAX, SUM, ACC, OUT, splits, stride_ob, stride_oh, stride_og,
                KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                BLOCK_S: tl.constexpr):  # fmt: skip
        row_head = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        index = (row_head * splits + s[:, None]) * BLOCK_G + g[None, :]  # [BLOCK_S, BLOCK_G]
        maxima = tl.load(MAX + index, mask=s[:, None] < splits, other=float("-inf"))
        overall = tl.max(maxima, 0)  # [BLOCK_G]: split 0 always saw position 0, so it is finite
        weights = tl.exp(maxima - overall[None, :])  # empty or padded splits: exp(-inf) = 0
        sums = tl.load(SUM + index, mask=s[:, None] < splits, other=0.0)
        total = tl.sum(weights * sums, 0)  # [BLOCK_G]
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for i in range(splits):
            w = tl.exp(tl.load(MAX + (row_head * splits + i) * BLOCK_G + g) - overall)
            part = tl.load(ACC + ((row_head * splits + i) * BLOCK_G + g[:, None]) * D + d[None, :])
            acc += w[:, None] * part
        out = acc / total[:, None]
        row = row_head // KV
        head = row_head % KV
        tl.store(OUT + row * stride_ob + head * stride_oh + g[:, None] * stride_og + d[None, :],
                 out.to(OUT.dtype.element_ty), mask=g[:, None] < G)  # fmt: skip

    class Kernels:
        pass

    kernels = Kernels()
    kernels.split, kernels.combine = split, combine
    return kernels
