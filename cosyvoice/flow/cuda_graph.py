"""The whole Euler solve (10 steps x batched guidance = 20 estimator passes, ~10k small kernels) as one
CUDA graph replay: the estimator is launch-bound, so this is where the decoder's time goes.

Graphs have fixed shapes. Lengths up to ``exact_frames`` (first blocks: 68 mel frames for 10 tokens)
get a graph of their own exact length. Longer ones are padded up to a multiple of ``bucket_frames`` and
the estimator runs in its ``padded=True`` mode, in which padding is invisible to the valid frames (no
attention to padded keys, GroupNorm statistics over valid frames only; a few more kernels), so a
replay gives the eager result of the unpadded input up to float rounding. One graph per (batch,
length, steps) is captured on first use; all share one memory pool. Not thread-safe: the caller serialises replays
(``flow_inference.AudioDecoder`` holds a lock around all GPU work).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from cosyvoice.flow.flow_matching import ConditionalCFM

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_FRAMES = 64
DEFAULT_EXACT_FRAMES = 256
DEFAULT_MAX_FRAMES = 8192
WARMUP_RUNS = 2


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    z: torch.Tensor
    mu: torch.Tensor
    mask: torch.Tensor
    spks: torch.Tensor
    cond: torch.Tensor
    t_span: torch.Tensor
    out: torch.Tensor


class GraphedEulerSolver:
    """Drop-in for ``ConditionalCFM.solve(z, mu, mask, spks, cond, t_span)`` on CUDA.

    ``autocast_dtype`` (bfloat16/float16) runs the estimator under autocast; the ODE state stays float32.
    Inputs longer than ``max_frames`` fall back to the eager solver.
    """

    def __init__(
        self,
        cfm: ConditionalCFM,
        bucket_frames: int = DEFAULT_BUCKET_FRAMES,
        max_frames: int = DEFAULT_MAX_FRAMES,
        autocast_dtype: torch.dtype | None = None,
        exact_frames: int = DEFAULT_EXACT_FRAMES,
    ):
        if bucket_frames <= 0 or bucket_frames % 2:
            raise ValueError("bucket_frames must be a positive even number (the U-Net halves the length)")
        self.cfm = cfm
        self.bucket_frames = bucket_frames
        self.max_frames = max_frames
        self.autocast_dtype = autocast_dtype
        self.exact_frames = exact_frames
        self._graphs: dict[tuple[int, int, int, bool], _Captured] = {}
        self._pool = None

    @property
    def captured_shapes(self) -> list[tuple[int, int, int, bool]]:
        """(batch, length, time points, padded) of the captured graphs."""
        return sorted(self._graphs)

    def padded_length(self, frames: int) -> int:
        if frames <= self.exact_frames:
            return frames
        return -(-frames // self.bucket_frames) * self.bucket_frames

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def eager(self, z, mu, mask, spks, cond, t_span) -> torch.Tensor:
        with self._autocast(mu.device):
            return self.cfm.solve(z, mu, mask, spks, cond, t_span)

    def __call__(self, z, mu, mask, spks, cond, t_span) -> torch.Tensor:
        batch, channels, frames = mu.shape
        padded = self.padded_length(frames)
        if mu.device.type != "cuda" or padded > self.max_frames:
            return self.eager(z, mu, mask, spks, cond, t_span)
        key = (batch, padded, int(t_span.shape[0]), frames > self.exact_frames)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, channels, spks.shape[1], cond.shape[1], mu.device)
            self._graphs[key] = captured
        for static, value in ((captured.z, z), (captured.mu, mu), (captured.cond, cond), (captured.mask, mask)):
            static[..., frames:].zero_()
            static[..., :frames].copy_(value)
        captured.spks.copy_(spks)
        captured.t_span.copy_(t_span)
        captured.graph.replay()
        return captured.out[..., :frames].clone()

    def _capture(self, key: tuple[int, int, int, bool], channels: int, spk_channels: int, cond_channels: int, device) -> _Captured:
        batch, frames, steps, padded = key
        logger.info("capturing the flow ODE as a CUDA graph: batch %d, %d frames, %d time points, padded %s", batch, frames, steps, padded)
        z = torch.zeros(batch, channels, frames, device=device)
        mu = torch.zeros_like(z)
        cond = torch.zeros(batch, cond_channels, frames, device=device)
        mask = torch.ones(batch, 1, frames, device=device)
        spks = torch.zeros(batch, spk_channels, device=device)
        t_span = self.cfm.time_span(steps - 1, device=device)

        def run() -> torch.Tensor:
            with self._autocast(device):
                return self.cfm.solve(z, mu, mask, spks, cond, t_span, padded=padded)

        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        return _Captured(graph, z, mu, mask, spks, cond, t_span, out)
