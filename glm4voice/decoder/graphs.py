"""Whole first blocks as CUDA graphs: the flow (encoder, length regulator, ODE) and the vocoder; and
the encoder and the vocoder of later blocks.

The block that sets the time to first audio (no prompt, no carried state, a few dozen tokens) is
launch-bound from end to end: the flow encoder, the length regulator, the 20 estimator passes of the
ODE and the vocoder are each hundreds of small kernels, and outside a graph every one of them costs a
host-side launch. :class:`FirstBlockGraphs` captures each of the two stages as one graph per (batch,
length), so a first block is two replays (two, not one: a benchmark can time the stages, and the
vocoder's randomness is drawn between them). Longer blocks keep the ODE graphs of
:class:`cosyvoice.flow.cuda_graph.GraphedEulerSolver` (padded lengths, any prompt) with the encoder
eager; with ``AudioDecoder(graph_later_blocks=True)`` their encoder and vocoder replay
:class:`LaterBlockGraphs`. Alone their kernels are large enough that launches matter little; but each
eager operation gives up the interpreter's lock, and beside a busy Python thread of the same process (the
event loop, the LLM engine's worker) getting it back costs up to the thread switch interval: a later
block's eager vocoder took 14 ms alone and 364 ms beside a spinning thread, the graph 4 and 10 ms
(H100, one 40-token block).

The vocoder's randomness is drawn eagerly from each stream's generator (the same draws as the eager
vocoder makes, in the same order) into the graph's static buffers, so a replayed block sounds like the
eager one. Optionally the estimator and the vocoder run through ``torch.compile`` inside the graphs
(fused kernels: fewer of them per block; compiling takes minutes at warm-up).

Not thread-safe: the decoder holds its lock around every call, and copies every output before anything
else replays (the graphs share one memory pool with the ODE graphs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cosyvoice.flow.cuda_graph import DEFAULT_BUCKET_FRAMES, warm_up_stream
from cosyvoice.transformer.encoder import padding_mask
from glm4voice.audio import NUM_MEL_BINS
from glm4voice.decoder.options import (
    LATER_BLOCK_GRAPH_BYTES,
    LATER_BLOCK_GRAPH_MAX_BATCH,
    LATER_ENCODER_TOKEN_BUCKET,
)

if TYPE_CHECKING:
    from cosyvoice.flow.flow import MaskedDiffWithXvec
    from cosyvoice.hifigan.generator import HiFTGenerator

logger = logging.getLogger(__name__)

WARMUP_RUNS = 2
"""Eager runs before a capture (lazy CUDA state, cuBLAS workspaces, compiled code)."""
LATER_BLOCK_WARMUP_RUNS = 0
"""Runs of a later-block stage before a capture, past the eager call every capture starts with: its
shapes are captured while listeners wait, and the decoder's warm-up has run the stage before."""
LATER_BLOCK_CAPTURE_AFTER = 2
"""A later-block shape is captured at its second use (after warm-up): a stream's last block has a length
of its own, met once; a graph for it would cost a capture and memory for nothing."""
COMPILE_RECOMPILE_LIMIT = 64
"""torch.compile keeps a compiled variant per input shape (batch size x length); its default limit is
lower than the number of graphs a decoder captures."""

Tensors = tuple[torch.Tensor, ...]
_Key = tuple[Any, ...]
"""A graph's inputs: (graph batch, (shape past dimension 0, dtype) of each input...)."""


@dataclass(eq=False)
class _Captured:
    replay: Callable[[], None]
    inputs: Tensors
    outputs: Tensors


Capture = Callable[..., tuple[Callable[[], None], Tensors]]
"""``capture(fn, static_inputs, pool, warm_up, runs=WARMUP_RUNS) -> (replay, static_outputs)`` (default
:func:`cuda_capture`)."""


def cuda_capture(
    fn: Callable[..., Tensors],
    static: Tensors,
    pool: object,
    warm_up: Callable[..., object],
    runs: int = WARMUP_RUNS,
) -> tuple[Callable[[], None], Tensors]:
    """Capture ``fn(*static)`` as a CUDA graph (after ``warm_up(*static)`` and ``runs`` runs of ``fn`` on
    :func:`~cosyvoice.flow.cuda_graph.warm_up_stream`); returns its replay and its static outputs."""
    device = static[0].device
    side = warm_up_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        warm_up(*static)
        for _ in range(runs):
            fn(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):  # type: ignore[arg-type]  # other threads may use CUDA meanwhile
        outputs = fn(*static)
    return graph.replay, tuple(outputs)  # the bound method keeps the graph alive


class GraphedFunction:
    """``fn(*inputs) -> tuple of tensors`` replayed from CUDA graphs, one per input shape. A batch of B
    rows (dimension 0 of every input) runs in the graph of the smallest batch size >= B with zero rows
    added, so ``fn`` must treat rows independently. ``fn`` may be a list of equivalent functions in order
    of preference (a compiled one first): a shape whose capture fails with one tries the next; batches
    larger than every size, and shapes that no function could capture, run ``eager`` (default: the last
    function) without a graph."""

    def __init__(
        self,
        name: str,
        fn: Callable[..., Tensors] | Sequence[Callable[..., Tensors]],
        batch_sizes: Sequence[int],
        pool: object,
        eager: Callable[..., Tensors] | None = None,
        capture: Capture | None = None,
        warm_up_runs: int = WARMUP_RUNS,
        max_bytes: int | None = None,
        capture_after: int = 1,
    ):
        self.name = name
        self.capture = capture
        self.warm_up_runs = warm_up_runs
        self.max_bytes = max_bytes
        """Static buffers the graphs may keep in all (None: no limit); past it new shapes run eagerly."""
        self.static_bytes = 0
        self.capture_after = capture_after
        """A shape is captured at its ``capture_after``-th use (1: the first); before, it runs eagerly, so
        that shapes met once (a last block's length) cost no capture and no memory."""
        self._uses: dict[_Key, int] = {}
        self.candidates: list[Callable[..., Tensors]] = list(fn) if isinstance(fn, (list, tuple)) else [fn]  # type: ignore[list-item]
        self.eager: Callable[..., Tensors] = eager or self.candidates[-1]
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self._pool = pool
        self._graphs: dict[_Key, _Captured] = {}
        self._failed: set[_Key] = set()

    @property
    def captured_shapes(self) -> list[tuple[Any, ...]]:
        """(graph batch, (shape of each input past dimension 0)...) of the captured graphs."""
        return sorted((key[0], *(shape for shape, _ in key[1:])) for key in self._graphs)

    def rows_for(self, batch: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= batch), None)

    def __call__(self, *inputs: torch.Tensor) -> Tensors:
        batch = inputs[0].shape[0]
        rows = self.rows_for(batch)
        key = (rows, *((tuple(x.shape[1:]), x.dtype) for x in inputs))
        if rows is None or key in self._failed:
            return self.eager(*inputs)
        captured = self._graphs.get(key)
        if captured is None and self.max_bytes is not None and self.static_bytes >= self.max_bytes:
            return self.eager(*inputs)
        if captured is None and self.capture_after > 1:
            uses = self._uses[key] = self._uses.get(key, 0) + 1
            if uses < self.capture_after:
                return self.eager(*inputs)
        if captured is None:
            captured = self._first_capture(rows, inputs)
            if captured is None:
                self._failed.add(key)
                return self.eager(*inputs)
            self._graphs[key] = captured
        for static, value in zip(captured.inputs, inputs):
            static[:batch].copy_(value)
            static[batch:].zero_()
        captured.replay()
        return tuple(out[:batch].clone() for out in captured.outputs)

    def _first_capture(self, rows: int, inputs: Sequence[torch.Tensor]) -> _Captured | None:
        for index, fn in enumerate(self.candidates):
            try:
                return self._capture(fn, rows, inputs)
            except Exception:
                fallback = "the next variant" if index + 1 < len(self.candidates) else "eager mode, without a graph"
                logger.exception("%s: capturing batch %d failed; this shape runs in %s", self.name, rows, fallback)
        return None

    def _capture(self, fn: Callable[..., Tensors], rows: int, inputs: Sequence[torch.Tensor]) -> _Captured:
        logger.info(
            "capturing %s as a CUDA graph: batch %d, inputs %s", self.name, rows, [tuple(x.shape[1:]) for x in inputs]
        )
        static = tuple(torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device) for x in inputs)
        for buffer, value in zip(static, inputs):
            buffer[: value.shape[0]].copy_(value)
        # the eager function first fills lazy caches (it is also what torch.compile traces against)
        replay, outputs = (self.capture or cuda_capture)(fn, static, self._pool, self.eager, runs=self.warm_up_runs)
        self.static_bytes += sum(x.numel() * x.element_size() for x in (*static, *outputs))
        if self.max_bytes is not None and self.static_bytes >= self.max_bytes:
            logger.warning("%s: %d graphs keep %.2f GiB of buffers; new shapes run eagerly", self.name,
                           len(self._graphs) + 1, self.static_bytes / 2**30)  # fmt: skip
        return _Captured(replay, static, outputs)


class FirstBlockGraphs:
    """The two graphed stages of a first block (see the module docstring). ``max_frames``: longest
    first block (mel frames) served; ``compile_mode``: None, or a ``torch.compile`` mode for the
    estimator and the vocoder inside the graphs."""

    def __init__(
        self,
        flow: MaskedDiffWithXvec,
        hift: HiFTGenerator,
        n_timesteps: int,
        batch_sizes: Sequence[int],
        max_frames: int,
        pool: object,
        compile_mode: str | None = None,
        capture: Capture | None = None,
    ):
        self.flow = flow
        self.hift = hift
        self.n_timesteps = n_timesteps
        self.max_frames = max_frames
        self.compile_mode = compile_mode
        flows: list[Callable[..., Tensors]] = [self._flow_with(None)]
        vocoders: list[Callable[..., Tensors]] = [self._vocode_eager]
        if compile_mode is not None:
            _raise_recompile_limit()
            compiled = torch.compile(flow.decoder.estimator, dynamic=False, mode=compile_mode)
            flows.insert(0, self._flow_with(compiled))
            vocoders.insert(0, torch.compile(self._vocode_eager, dynamic=False, mode=compile_mode))
        self.flow_graphs = GraphedFunction("the first-block flow", flows, batch_sizes, pool, capture=capture)
        self.vocoder_graphs = GraphedFunction("the first-block vocoder", vocoders, batch_sizes, pool, capture=capture)

    @property
    def max_batch(self) -> int:
        return self.flow_graphs.batch_sizes[-1]

    def serves(self, batch: int, prompt_tokens: int, carried: bool, feat_len: int) -> bool:
        """Whether a batch of blocks with this shape is a first block these graphs replay."""
        return not prompt_tokens and not carried and feat_len <= self.max_frames and batch <= self.max_batch

    def flow_mel(self, tokens: torch.Tensor, noise: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """tokens (B, n) int64, noise (B, 80, frames), embedding (B, 192) -> mel (B, 80, frames) float32."""
        return self.flow_graphs(tokens, noise, embedding)[0]

    def vocode(
        self, mel: torch.Tensor, uniform: torch.Tensor, normal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, frames) and the source's randomness (``hift.draw_randomness``) -> (speech, source)."""
        speech, source = self.vocoder_graphs(mel, uniform, normal)
        return speech, source

    # -- the captured functions (rows independent, no host synchronisation) ------------------------
    def _flow_with(self, estimator: Callable[..., torch.Tensor] | None) -> Callable[..., Tensors]:
        cfm = self.flow.decoder

        def solve(z: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor | None, spks: torch.Tensor, cond: torch.Tensor,
                  t_span: torch.Tensor) -> torch.Tensor:  # fmt: skip
            return cfm.solve(z, mu, mask, spks, cond, t_span, estimator=estimator)

        def run(tokens: torch.Tensor, noise: torch.Tensor, embedding: torch.Tensor) -> Tensors:
            batch, device = tokens.shape[0], tokens.device
            none = torch.zeros(batch, dtype=torch.int32, device=device)
            mel = self.flow.inference(
                token=tokens,
                token_len=torch.full((batch,), tokens.shape[1], dtype=torch.int32, device=device),
                prompt_token=tokens[:, :0],
                prompt_token_len=none,
                prompt_feat=torch.zeros(batch, 0, NUM_MEL_BINS, device=device),
                prompt_feat_len=none,
                embedding=embedding,
                feat_len=noise.shape[2],
                n_timesteps=self.n_timesteps,
                noise=noise,
                solve=solve,
            )
            return (mel.float(),)

        return run

    def _vocode_eager(self, mel: torch.Tensor, uniform: torch.Tensor, normal: torch.Tensor) -> Tensors:
        speech, source = self.hift.inference(mel, None, randomness=(uniform, normal))
        return speech, source


class LaterBlockGraphs:
    """The encoder and the vocoder of later blocks (a prompt, a carried source, any lengths) as CUDA
    graphs, for batches up to :data:`~glm4voice.decoder.options.LATER_BLOCK_GRAPH_MAX_BATCH`, each stage
    within :data:`~glm4voice.decoder.options.LATER_BLOCK_GRAPH_BYTES` of static buffers; a shape is
    captured at its second use (:data:`LATER_BLOCK_CAPTURE_AFTER`; ``AudioDecoder.warm_up`` captures the
    schedule's at once).

    - The encoder (token embedding, Conformer, length regulator) masks every row to its own lengths
      (``MaskedDiffWithXvec.encode_padded``), so its graphs serve padded shapes: tokens padded to
      :data:`~glm4voice.decoder.options.LATER_ENCODER_TOKEN_BUCKET`, frames to the ODE graphs' bucket.
      It equals the eager encoder up to float rounding (the masked GroupNorm sums in another order).
    - The vocoder has no masks (padding would change the audio near a block's end): one graph per exact
      mel length. Its randomness is drawn eagerly from each stream's generator, as for first blocks; it
      equals the eager vocoder exactly."""

    def __init__(
        self,
        flow: MaskedDiffWithXvec,
        hift: HiFTGenerator,
        batch_sizes: Sequence[int],
        pool: object,
        capture: Capture | None = None,
    ):
        self.flow = flow
        self.hift = hift
        sizes = [b for b in batch_sizes if b <= LATER_BLOCK_GRAPH_MAX_BATCH] or [min(batch_sizes)]

        def stage(name: str, fn: Callable[..., Tensors]) -> GraphedFunction:
            return GraphedFunction(name, fn, sizes, pool, capture=capture, warm_up_runs=LATER_BLOCK_WARMUP_RUNS,
                                   max_bytes=LATER_BLOCK_GRAPH_BYTES, capture_after=LATER_BLOCK_CAPTURE_AFTER)  # fmt: skip

        self.encoder_graphs = stage("the later-block encoder", self._encode_eager)
        self.vocoder_graphs = stage("the later-block vocoder", self._vocode_eager)

    @contextlib.contextmanager
    def capturing_at_first_use(self) -> Iterator[None]:
        """Within it, every new shape is captured at its first use (``AudioDecoder.warm_up``)."""
        stages = (self.encoder_graphs, self.vocoder_graphs)
        before = [stage.capture_after for stage in stages]
        for stage in stages:
            stage.capture_after = 1
        try:
            yield
        finally:
            for stage, after in zip(stages, before):
                stage.capture_after = after

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return self.vocoder_graphs.batch_sizes

    def serves(self, batch: int) -> bool:
        return self.vocoder_graphs.rows_for(batch) is not None

    def encode(self, token: torch.Tensor, token_len: torch.Tensor, feat_len: torch.Tensor, frames: int) -> torch.Tensor:
        """``MaskedDiffWithXvec.encode_padded`` (an :data:`~cosyvoice.flow.flow.Encode`) from a graph of
        the padded shape: token (B, T) int64, token_len and feat_len (B,) int32 -> mu (B, frames, 80)."""
        batch, tokens = token.shape
        if not self.serves(batch):
            return self.flow.encode_padded(token, token_len, feat_len, frames)
        token = F.pad(token, (0, _round_up(tokens, LATER_ENCODER_TOKEN_BUCKET) - tokens))
        frame_mask = padding_mask(feat_len, _round_up(frames, DEFAULT_BUCKET_FRAMES)).float()
        return self.encoder_graphs(token, token_len, feat_len, frame_mask)[0][:, :frames]

    def vocode(
        self, mel: torch.Tensor, cache_source: torch.Tensor, uniform: torch.Tensor, normal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, frames), cache_source (B, 1, n) and the source's randomness
        (``hift.draw_randomness``) -> (speech, source)."""
        speech, source = self.vocoder_graphs(mel, cache_source, uniform, normal)
        return speech, source

    # -- the captured functions (rows independent, no host synchronisation) ------------------------
    def _encode_eager(self, token: torch.Tensor, token_len: torch.Tensor, feat_len: torch.Tensor, frame_mask: torch.Tensor) -> Tensors:  # fmt: skip
        # a batch's padding rows have no tokens and no frames: lengths of one keep their arithmetic finite
        mu = self.flow.encode_padded(token, token_len.clamp(min=1), feat_len.clamp(min=1), frame_mask.shape[1])
        return (mu * frame_mask.unsqueeze(-1).to(mu.dtype),)

    def _vocode_eager(self, mel: torch.Tensor, cache_source: torch.Tensor, uniform: torch.Tensor, normal: torch.Tensor) -> Tensors:  # fmt: skip
        speech, source = self.hift.inference(mel, cache_source, randomness=(uniform, normal))
        return speech, source


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < COMPILE_RECOMPILE_LIMIT:
            logger.info("torch.compile: raising torch._dynamo.config.%s to %d", name, COMPILE_RECOMPILE_LIMIT)
            setattr(config, name, COMPILE_RECOMPILE_LIMIT)
