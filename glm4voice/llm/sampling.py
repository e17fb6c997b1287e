"""Temperature / top-p sampling for a batch of rows, on the device, with per-row seeds.

No host round trip and no torch.Generator state: the random numbers are a counter-based hash of (the
row's seed, the index of the token being drawn, the vocabulary id), so the whole step can live in a
CUDA graph, a request's draws do not depend on which other requests share its batch, and the same
seed replays the same reply.

The draw is a Gumbel-max race: each kept token gets ``logit / temperature + Gumbel noise`` and the
highest wins, which picks token ``i`` with exactly its renormalised probability. The race is stable
under float noise: logits computed in another batch, or after a prefix-cache hit, differ in the last
bits, and that changes the winner only when the two best scores are that close. (Inverting the
cumulative distribution of the probability-sorted tokens is not stable: near-equal tokens swap places
in the sort, and every later token's interval moves.) It needs one sort for the top-p set and one
pass over the vocabulary.

Semantics match transformers' ``TemperatureLogitsWarper`` then ``TopPLogitsWarper``: divide the
logits by the temperature, keep the most probable tokens until their mass reaches ``top_p`` (the
token that crosses the threshold is kept, and so is any token exactly as probable), renormalise.
``temperature == 0`` means greedy.
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


def _hash(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """32-bit hash (int64 tensor) of int64 ``seeds`` (in [0, 2**63)) and ``counters``."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    return _mix32(_mix32(_mix32(_mix32(hi) ^ lo) ^ (counters & _MASK32)) ^ _MUL3)


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in (0, 1), never 0 or 1, from 32-bit hashes."""
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform (0, 1) float32 per row from int64 ``seeds`` (in [0, 2**63)) and ``counters``."""
    return _to_unit(_hash(seeds, counters))


def gumbel(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [b, vocab] (float32): one number per row and vocabulary id."""
    ids = torch.arange(vocab, device=seeds.device)  # [vocab]
    h = _mix32(_mix32(_hash(seeds, counters)[:, None] ^ ids) ^ _MUL1)  # [b, vocab]
    return -torch.log(-torch.log(_to_unit(h)))


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
    scaled = logits / temperature.clamp_min(_MIN_TEMPERATURE)[:, None]  # [b, vocab]
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    cumulative = sorted_probs.cumsum(dim=-1)
    keep = (cumulative - sorted_probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
    # a prefix of the sorted order; at least the most probable token even when top_p is 0 in float32
    # (a positive top_p below float32's range, e.g. 1e-50, arrives here as 0.0)
    kept = keep.sum(dim=-1, keepdim=True).clamp_min(1)
    threshold = sorted_probs.gather(-1, kept - 1)  # [b, 1]: the least probable kept token's probability
    race = torch.where(probs >= threshold, scaled + gumbel(seeds, counters, logits.shape[-1]), -torch.inf)
    sampled = race.argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)
