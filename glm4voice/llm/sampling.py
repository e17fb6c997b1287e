"""Temperature / top-p sampling for a batch of rows, on the device, with per-row seeds.

No host round trip and no torch.Generator state: row ``i`` draws one uniform number from a
counter-based hash of (its seed, the index of the token being drawn), so the whole step can live
in a CUDA graph, a request's draws do not depend on which other requests share its batch, and the
same seed replays the same reply. The kept set is found in probability order (one sort); the token
is then found by inverting the cumulative distribution of the kept tokens in *vocabulary* order.
Inverting in vocabulary order keeps the draw stable under float noise: logits computed in another
batch, or after a prefix-cache hit, differ in the last bits, which can swap two near-equal tokens in
the sorted order (and would then move every later token's interval); in vocabulary order such noise
only moves interval edges by as much as the noise itself.

Semantics match transformers' ``TemperatureLogitsWarper`` then ``TopPLogitsWarper``: divide the
logits by the temperature, keep the most probable tokens until their mass reaches ``top_p`` (the
token that crosses the threshold is kept), renormalise. ``temperature == 0`` means greedy.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31: products with 32-bit values stay inside int64
_MUL1, _MUL2, _MUL3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39
_MIN_TEMPERATURE = 1e-5


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix of int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * _MUL1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & _MASK32
    return h ^ (h >> 16)


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform (0, 1) float32 per row from int64 ``seeds`` (in [0, 2**63)) and ``counters``."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    h = _mix32(_mix32(_mix32(_mix32(hi) ^ lo) ^ (counters & _MASK32)) ^ _MUL3)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
) -> torch.Tensor:
    """Next token id per row (int64 [b]) from float32 ``logits`` [b, vocab].

    ``temperature``/``top_p`` float32 [b]; ``seeds`` int64 [b] in [0, 2**63); ``counters`` int64 [b]:
    the index of the token being drawn (its position in the sequence)."""
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature.clamp_min(_MIN_TEMPERATURE)[:, None], dim=-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    keep = (cumulative - sorted_probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
    # a prefix of the sorted order; at least the most probable token even when top_p is 0 in float32
    # (a positive top_p below float32's range, e.g. 1e-50, arrives here as 0.0)
    keep[:, 0] = True
    kept = torch.zeros_like(keep).scatter_(-1, sorted_ids, keep)  # [b, vocab] in vocabulary order
    mass = torch.where(kept, probs, 0.0).cumsum(dim=-1)  # [b, vocab]
    target = uniform(seeds, counters)[:, None] * mass[:, -1:]
    # the first kept token whose interval ends above the target; rounding can put the target at the
    # total mass, so clamp to the last kept token
    vocab_ids = torch.arange(probs.shape[-1], device=probs.device)
    last_kept = torch.where(kept, vocab_ids, 0).amax(dim=-1)
    sampled = (mass <= target).sum(dim=-1).minimum(last_kept)
    return torch.where(temperature > 0, sampled, greedy)
