"""The decoder's constants and its options (one frozen dataclass, validated once)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_OVERLAP = 5
"""Tokens' worth of mel held back at the end of a block and cross-faded with the next block."""
MEL_CACHE_FRAMES = 1
"""Mel frames (and their source samples) the vocoder carries across blocks."""
DEFAULT_PROMPT_WINDOW = 100
"""Prompt tokens (8 s of speech) kept as the flow's context for the next block."""
N_TIMESTEPS = 10
"""Euler steps of the flow's ODE (the published decoder's setting)."""
HIFT_SEED_STREAM = 1
"""Sub-stream of a stream's seed that seeds its vocoder's randomness (the flow's noise uses others)."""
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the flow's estimator can run in (encoder, ODE state and vocoder stay float32)."""


@dataclass(frozen=True)
class DecoderOptions:
    """How an :class:`~glm4voice.decoder.AudioDecoder` runs (see its constructor for each field)."""

    dtype: torch.dtype = torch.float32
    prompt_window: int | None = DEFAULT_PROMPT_WINDOW
    cuda_graphs: bool | None = None
    min_block_tokens: int | None = None
    seam_crossfade: bool = True
    compile_first_blocks: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if self.min_block_tokens is not None and (
            isinstance(self.min_block_tokens, bool)
            or not isinstance(self.min_block_tokens, int)
            or self.min_block_tokens < 1
        ):
            raise ValueError(f"min_block_tokens must be a positive integer or None, got {self.min_block_tokens!r}")

    def check_window(self, window: int | None, block_size: int) -> int | None:
        """``window`` if it is a valid prompt window for an encoder of ``block_size`` tokens."""
        if window is None:
            return None
        if isinstance(window, bool) or not isinstance(window, int) or window < block_size:
            raise ValueError(f"prompt_window must be None or an integer >= {block_size} tokens, got {window!r}")
        return window

    def use_graphs(self, device: torch.device) -> bool:
        """Whether the ODE replays CUDA graphs on ``device`` (default: on for CUDA)."""
        if self.cuda_graphs is None:
            return device.type == "cuda"
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        return bool(self.cuda_graphs)
