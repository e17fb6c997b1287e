"""The decoder's constants and its options (one frozen dataclass, validated once)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cosyvoice.flow.cuda_graph import DEFAULT_BATCH_SIZES
from glm4voice.devices import DECODER_DTYPES, torch_dtype

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
DTYPES = tuple(torch_dtype(name) for name in DECODER_DTYPES)
"""Dtypes the flow's estimator can run in (encoder, ODE state and vocoder stay float32)."""
DEFAULT_GRAPH_BATCH_SIZES: tuple[int, ...] = DEFAULT_BATCH_SIZES
"""Batch sizes with CUDA graphs (a batch of blocks runs in the next size up; the largest is the most
blocks one ``feed_many`` batch decodes)."""


def graph_batch_sizes_for(most_blocks: int, sizes: tuple[int, ...] = DEFAULT_GRAPH_BATCH_SIZES) -> tuple[int, ...]:
    """The graph batch sizes a decoder needs when at most ``most_blocks`` blocks are decoded together (one
    per conversation at once): those of ``sizes`` below it and the first that covers it. Fewer graphs:
    less GPU memory and a shorter warm-up (a small card serving a few conversations)."""
    if isinstance(most_blocks, bool) or not isinstance(most_blocks, int) or most_blocks < 1:
        raise ValueError(f"most_blocks must be a positive integer, got {most_blocks!r}")
    cover = next((b for b in sizes if b >= most_blocks), sizes[-1])
    return tuple(b for b in sizes if b < cover) + (cover,)


MIXED_BATCH_LENGTH_RATIO = 1.5
"""A mixed batch of blocks of different lengths is padded to its longest row: the longest may be at
most this many times the shortest. Small blocks beside long ones would wait for (and pay for) the
long ones' padding; with 64 answers started together, mixing every length made more listeners run
dry than batching equal shapes only (H100)."""
FIRST_BLOCK_GRAPH_TOKENS = 40
"""Longest first block (tokens) replayed as whole-block CUDA graphs: the quick 10-token first block,
and the first audio run of 26 tokens that the pipeline decodes as its first block under load. Each
size is a graph of its own (first blocks are not padded: the length regulator stretches the tokens it
is given), captured by ``warm_up`` for the sizes it is told."""
LATER_BLOCK_GRAPH_MAX_BATCH = 16
"""Most blocks in a later-block graph (larger batches run eagerly): a graph keeps its output buffers
(the vocoder's speech and source: rows x samples each), and large batches are not launch-bound."""
LATER_BLOCK_GRAPH_BYTES = 1 << 30
"""Static buffers (inputs and outputs) that the graphs of each later-block stage (encoder, vocoder) may
keep in all: graphs are captured while streams run (a shape's second use), and past this budget new
shapes run eagerly."""
LATER_ENCODER_TOKEN_BUCKET = 32
"""Later blocks' tokens (prompt and new) are padded to a multiple of this for the encoder's graphs (their
frames to the ODE graphs' bucket): a few graphs serve every prompt and block length."""
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class DecoderOptions:
    """How an :class:`~glm4voice.decoder.AudioDecoder` runs (see its constructor for each field)."""

    dtype: torch.dtype = torch.float32
    prompt_window: int | None = DEFAULT_PROMPT_WINDOW
    cuda_graphs: bool | None = None
    min_block_tokens: int | None = None
    seam_crossfade: bool = True
    compile_first_blocks: bool | str = False
    graph_batch_sizes: tuple[int, ...] = DEFAULT_GRAPH_BATCH_SIZES
    graph_first_blocks: bool | None = None
    mixed_batches: bool = True
    graph_later_blocks: bool = False

    def __post_init__(self) -> None:
        sizes = self.graph_batch_sizes
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"graph_batch_sizes must be positive integers, got {sizes!r}")
        object.__setattr__(self, "graph_batch_sizes", tuple(sorted(set(sizes))))
        mode = self.compile_first_blocks
        if not isinstance(mode, bool) and mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_first_blocks must be True, False or a torch.compile mode {COMPILE_MODES}, got {mode!r}"
            )
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

    @property
    def compile_mode(self) -> str | None:
        """The torch.compile mode of first-block graphs (None: no compiling)."""
        mode = self.compile_first_blocks
        if mode is True:
            return "default"
        return mode or None

    def use_first_block_graphs(self, device: torch.device) -> bool:
        """Whether whole first blocks replay CUDA graphs (default: with the ODE graphs)."""
        graphs = self.use_graphs(device)
        if self.graph_first_blocks and not graphs:
            raise ValueError("graph_first_blocks=True needs CUDA graphs (a CUDA device)")
        return graphs if self.graph_first_blocks is None else bool(self.graph_first_blocks)

    def use_later_block_graphs(self, device: torch.device) -> bool:
        """Whether the encoder and the vocoder of blocks after a stream's first replay CUDA graphs."""
        if self.graph_later_blocks and not self.use_graphs(device):
            raise ValueError("graph_later_blocks=True needs CUDA graphs (a CUDA device)")
        return bool(self.graph_later_blocks)

    def use_graphs(self, device: torch.device) -> bool:
        """Whether the ODE replays CUDA graphs on ``device`` (default: on for CUDA)."""
        if self.cuda_graphs is None:
            return device.type == "cuda"
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        return bool(self.cuda_graphs)
