"""The Euler solve (10 steps x batched guidance = 20 estimator passes of about a thousand small kernels
each) as CUDA graph replays: the estimator is launch-bound, so this is where the decoder's time goes.

A graph holds one Euler step (two estimator passes) and a solve replays it once per step: the step
reads its time conditioning from per-graph tables at a step counter the graph itself advances, so the
replays need no host work in between. One graph per step rather than per solve because a captured
graph costs device memory for each of its kernel nodes outside the caching allocator: about 2.6 KB a
node on an H100 (torch 2.11, CUDA 13), i.e. ~50 MB for a whole 10-step solve, 2.3 GB for the 45 graphs a
decoder serving 4 conversations captures; a step's graph is a tenth of that, and the extra 9 replays
cost microseconds against a solve of milliseconds.

Graphs have fixed shapes. A batch of B sequences (several streams' blocks of the same length) runs in
the graph of the smallest captured batch size >= B, the extra rows zero (rows are independent: per-row
GroupNorm and attention). Lengths up to ``exact_frames`` (first blocks: 68 mel frames for 10 tokens)
get a graph of their own exact length. Longer ones are padded up to a multiple of ``bucket_frames`` and
the estimator runs in its ``padded=True`` mode, in which padding is invisible to the valid frames (no
attention to padded keys, GroupNorm statistics over valid frames only; a few more kernels), so a
replay gives the eager result of the unpadded input up to float rounding. One graph per (batch,
length, steps) is captured on first use; all share one memory pool (which may be shared with other
graphs: every replay's output is copied out before anything else replays). Not thread-safe: the caller
serialises replays (the decoder holds a lock around all GPU work).

Memory: the graphs of one batch size share their static input and state buffers (views of one
arena sized for the longest length captured), so a graph costs little beyond the pool, whose size is
the working set of the largest step. Warm-ups run on the caller's stream (:func:`warm_up_stream`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cosyvoice.flow.flow_matching import ConditionalCFM

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_FRAMES = 128
DEFAULT_EXACT_FRAMES = 72
"""Exact-length graphs only up to the first 10-token block (68 frames, no prompt: the block that sets
the time to first audio); every longer block is padded to a bucket, so a bounded set of graphs covers
every block a schedule can make (``prepare`` captures them before the first listener)."""
DEFAULT_MAX_FRAMES = 8192
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""A batch runs in the next size up: the extra rows cost little while the ODE is launch-bound (small
batches), and powers of two keep the padding below half for the large, compute-bound ones; each size
adds its graphs to capture at warm-up."""
WARMUP_RUNS = 2


class Arena:
    """Static buffers of one batch size: each named buffer is a flat tensor, grown to the largest
    (channels x frames) asked for; a graph's buffers are contiguous views of its first elements, so
    graphs of one batch size share them (replays never overlap)."""

    def __init__(self, rows: int, device):
        self.rows = rows
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def view(self, name: str, channels: int, frames: int) -> torch.Tensor:
        size = self.rows * channels * frames
        flat = self._flat.get(name)
        if flat is None or flat.numel() < size:
            flat = torch.zeros(size, device=self.device)  # earlier graphs keep the old buffer through their views
            self._flat[name] = flat
        return flat[:size].view(self.rows, channels, frames)


def warm_up_stream(device) -> torch.cuda.Stream:
    """The stream to run a graph's warm-up on before capturing it: the caller's current stream when it is
    a side stream (the decoder's own), else a new side stream. Every stream that runs a matmul gets
    cuBLAS workspaces of its own for the life of the process, so a new stream per capture held 1.2 GB
    on an H100 after a decoder's 57 captures."""
    current = torch.cuda.current_stream(device)
    return current if current != torch.cuda.default_stream(device) else torch.cuda.Stream(device=device)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    """One Euler step: reads the state ``z`` and the tables at ``step``, writes ``z``, advances ``step``."""
    z: torch.Tensor
    """The ODE state (batch, channels, frames), float32: the starting noise in, the mel out."""
    mu: torch.Tensor
    mask: torch.Tensor | None
    spks: torch.Tensor
    cond: torch.Tensor
    step: torch.Tensor
    """(1,) int64: the step the next replay takes."""
    steps: int
    tables: tuple[torch.Tensor, ...]
    """(steps, ...) each: t, dt and each part of the estimator's time conditioning, per step. Read by the
    graph: must stay alive as long as the graph (like every static input)."""


class GraphedEulerSolver:
    """Drop-in for ``ConditionalCFM.solve(z, mu, mask, spks, cond, t_span)`` on CUDA.

    The estimator runs in its parameters' dtype (see ``ConditionalCFM.solve``); its time conditioning
    is computed once per graph, outside it, from the solver's own time span of that many points
    (``cfm.time_span(steps - 1)``, which is what every caller passes; a graph does not read ``t_span``).
    Inputs longer than ``max_frames`` fall back to eager.
    """

    def __init__(
        self,
        cfm: ConditionalCFM,
        bucket_frames: int = DEFAULT_BUCKET_FRAMES,
        max_frames: int = DEFAULT_MAX_FRAMES,
        exact_frames: int = DEFAULT_EXACT_FRAMES,
        compile_exact: bool | str = False,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        pool=None,
    ):
        """``compile_exact``: run the estimator of exact-length graphs (short first blocks, where the
        kernel count dominates) through ``torch.compile`` (fewer, fused kernels; each new length compiles
        once, which takes a while: warm up before serving); a string is the compile mode.
        ``pool``: a CUDA graph memory pool to share (default: one of its own)."""
        if bucket_frames <= 0 or bucket_frames % 2:
            raise ValueError("bucket_frames must be a positive even number (the U-Net halves the length)")
        self.cfm = cfm
        self.bucket_frames = bucket_frames
        self.max_frames = max_frames
        self.exact_frames = exact_frames
        if not batch_sizes or any(b < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self._graphs: dict[tuple[int, int, int, bool], _Captured] = {}
        self._arenas: dict[int, Arena] = {}
        self._pool = pool
        self.compile_exact = compile_exact
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._solving = False
        """A replay loop is running (a solve from its ``between_steps`` must not touch the buffers)."""

    @property
    def captured_shapes(self) -> list[tuple[int, int, int, bool]]:
        """(batch, length, time points, padded) of the captured graphs."""
        return sorted(self._graphs)

    @property
    def max_batch(self) -> int:
        """Largest batch with a graph (larger batches run eagerly)."""
        return self.batch_sizes[-1]

    def eager(self, z, mu, mask, spks, cond, t_span, between_steps: Callable[[], None] | None = None) -> torch.Tensor:
        """The solve without graphs; a mask means padded input, as in the graphs (padding invisible)."""
        return self.cfm.solve(z, mu, mask, spks, cond, t_span, padded=mask is not None, between_steps=between_steps)

    def _key(self, batch: int, frames: int, steps: int, masked: bool) -> tuple[int, int, int, bool] | None:
        """(graph batch, graph length, time points, padded) serving this call; None: run eagerly."""
        exact = not masked and frames <= self.exact_frames
        length = frames if exact else -(-frames // self.bucket_frames) * self.bucket_frames
        rows = next((b for b in self.batch_sizes if b >= batch), None)
        if length > self.max_frames or rows is None:
            return None
        return (rows, length, steps, not exact)

    def prepare(self, batch_sizes, frame_lengths, steps: int, channels: int, spk_channels: int, cond_channels: int,
                device) -> int:  # fmt: skip
        """Capture now the graphs that calls of these batch sizes and lengths (unmasked) will use, so
        that no listener waits for a capture; returns how many were captured."""
        keys = {key for b in batch_sizes for f in frame_lengths if (key := self._key(b, f, steps, False)) is not None}
        new = sorted(keys - set(self._graphs), key=lambda key: (key[0], -key[1]))  # longest first: one arena each
        for key in new:
            self._graphs[key] = self._capture(key, channels, spk_channels, cond_channels, device)
        return len(new)

    def __call__(
        self, z, mu, mask, spks, cond, t_span, between_steps: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """``mask`` (B, 1, T) or None (every frame valid); a mask always takes the padded path.
        ``between_steps()``: called on the host after every step but the last, once the step before
        it has run on the device (the step itself is then running: one step stays queued, so the
        device does not idle while the host waits); work it queues on the same stream runs between
        the two steps. A solve called from there runs eagerly (the graphs' buffers hold this one's state)."""
        batch, channels, frames = mu.shape
        key = None if mu.device.type != "cuda" else self._key(batch, frames, int(t_span.shape[0]), mask is not None)
        if key is None or self._solving:
            return self.eager(z, mu, mask, spks, cond, t_span, between_steps)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, channels, spks.shape[1], cond.shape[1], mu.device)
            self._graphs[key] = captured
        for static, value in ((captured.z, z), (captured.mu, mu), (captured.cond, cond)):
            static[:batch, :, frames:].zero_()
            static[:batch, :, :frames].copy_(value)
            static[batch:].zero_()
        if captured.mask is not None:
            captured.mask.zero_()
            if mask is None:
                captured.mask[..., :frames] = 1
            else:
                captured.mask[:batch, :, :frames].copy_(mask)
                captured.mask[batch:, :, :frames] = 1
        captured.spks[:batch].copy_(spks)
        captured.spks[batch:].zero_()
        captured.step.zero_()
        self._solving = True
        try:
            previous: torch.cuda.Event | None = None
            for step in range(captured.steps):
                captured.graph.replay()
                if between_steps is None or step + 1 == captured.steps:
                    continue
                queued = torch.cuda.Event()
                queued.record()
                if previous is not None:
                    previous.synchronize()
                previous = queued
                between_steps()
            return captured.z[:batch, :, :frames].clone()
        finally:
            self._solving = False

    def _capture(
        self, key: tuple[int, int, int, bool], channels: int, spk_channels: int, cond_channels: int, device
    ) -> _Captured:
        batch, frames, steps, padded = key
        logger.info(
            "capturing the flow ODE as a CUDA graph: batch %d, %d frames, %d time points, padded %s",
            batch,
            frames,
            steps,
            padded,
        )
        arena = self._arenas.setdefault(batch, Arena(batch, device))
        z = arena.view("z", channels, frames).zero_()
        mu = arena.view("mu", channels, frames).zero_()
        cond = arena.view("cond", cond_channels, frames).zero_()
        mask = torch.ones(batch, 1, frames, device=device) if padded else None
        spks = torch.zeros(batch, spk_channels, device=device)
        t_span = self.cfm.time_span(steps - 1, device=device)
        tables = self.cfm.step_tables(t_span)  # constants of the graph, one entry per step
        step = torch.zeros(1, dtype=torch.long, device=device)
        estimator: Callable[..., torch.Tensor] | None = None
        if self.compile_exact and not padded:
            if self._compiled is None:
                self.cfm.solve(z, mu, mask, spks, cond, t_span)  # fills weight caches eagerly
                mode = self.compile_exact if isinstance(self.compile_exact, str) else None
                self._compiled = torch.compile(self.cfm.estimator, dynamic=False, mode=mode)
            estimator = self._compiled

        def run() -> None:
            # (steps, ...) -> this step's entry, gathered on the device: no host synchronisation
            t, dt, *time_cond = (table.index_select(0, step) for table in tables)
            t, dt = t.squeeze(0), dt.squeeze(0)  # 0-d: every row at this step; time_cond parts stay (1, C)
            x = self.cfm.euler_step(
                z, mu, mask, spks, cond, t, dt, tuple(time_cond), padded=padded, estimator=estimator
            )
            z.copy_(x)  # the state stays in the arena: the pool keeps nothing of this graph alive
            step.add_(1)

        side = warm_up_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS if not self._graphs else 1):  # lazy CUDA state exists after the first
                step.zero_()
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            run()
        return _Captured(graph, z, mu, mask, spks, cond, step, int(tables[0].shape[0]), tables)
