"""What the decoder accepts: audio codes and seeds, checked once at the boundary with messages for people."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch


class DecoderError(ValueError):
    """Input the decoder cannot decode (empty, out-of-range codes, a finished stream...)."""


def validate_codes(codes: Sequence[int] | np.ndarray | torch.Tensor, num_codes: int) -> list[int]:
    """0-based audio codes as a list of ints, or DecoderError."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    if isinstance(codes, np.ndarray):
        array: np.ndarray = codes
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1:
            raise DecoderError(f"audio codes must be one sequence, got an array of shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise DecoderError(f"audio codes must be integers, got dtype {array.dtype}")
        values = array.tolist()
    else:
        if isinstance(codes, (str, bytes)):
            raise DecoderError("audio codes must be a sequence of integers, not a string")
        values = list(codes)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DecoderError(f"audio codes must be integers, got {value!r} ({type(value).__name__})")
    values = [int(v) for v in values]
    bad = [v for v in values if not 0 <= v < num_codes]
    if bad:
        raise DecoderError(
            f"audio code {bad[0]} is out of range: codes are 0 ... {num_codes - 1} "
            f"(subtract the id of <|audio_0|> from LLM token ids)"
        )
    return values


def resolve_seed(seed: int | None) -> int:
    """A non-negative seed; None draws a fresh one from the OS."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)
