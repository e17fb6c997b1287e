"""Euler steps over rows that are each at their own step: sequences join the ODE at any step boundary
and leave after their last step, as an LLM engine batches decode steps.

A whole-solve call (:class:`~cosyvoice.flow.cuda_graph.GraphedEulerSolver`) makes a sequence that
arrives while it runs wait for all of its steps; small solves are latency-bound (one step of one
sequence costs a third of a step of eight), so a decoder serving many streams in calls of two or three
blocks spends most of its time waiting on launches. :class:`RowSteps` keeps the sequences in flight
as the rows of one padded batch: a step advances every row by one of its own steps (each row reads
its t, dt and time conditioning from the step tables at its own index), a new sequence joins at the
next boundary and a finished one leaves there.

Rows of very different lengths do not share a step (a short row would pay for the long one's
frames): each row goes to the *lane* of its length (lanes of lengths within about 1.5x of each other,
:func:`lane_bounds`), and a step advances the rows of one lane, or of every lane. The caller picks
the lane (the decoder steps the lane whose listener runs dry first).

A lane keeps its rows in static buffers (B x 80 x T state, conditions and mask), padded to its longest
row (frames rounded up to ``bucket_frames``) and to the next of ``batch_sizes`` rows; a step replays
the CUDA graph of that (rows, frames) shape, or runs eagerly on a CPU. The padding is invisible to the
valid frames (the estimator's padded mode), empty rows compute on zeros and are never read, so each
row gets what a solve of it alone gives, up to float rounding. When a lane's rows change, its buffers
are rebuilt (a gather of the rows that stay, the new rows written after them) before its next step.

No host synchronisation anywhere: which rows finish is known on the host (every row takes the same
number of steps). Not thread-safe: the caller serialises every call (the decoder holds its lock).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from cosyvoice.flow.cuda_graph import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_BUCKET_FRAMES,
    DEFAULT_MAX_FRAMES,
    Arena,
    warm_up_stream,
)
from cosyvoice.flow.flow_matching import ConditionalCFM

logger = logging.getLogger(__name__)

_STATE = ("z", "mu", "cond")
"""The (rows, channels, frames) buffers carried across a rebuild (mask and step index are rebuilt)."""
LANE_RATIO = 1.5
"""A lane's longest rows are at most about this many times its shortest (see :func:`lane_bounds`)."""


def lane_bounds(bucket_frames: int, max_frames: int, ratio: float = LANE_RATIO) -> tuple[int, ...]:
    """Upper bounds (frames, multiples of ``bucket_frames``) of the lanes: two buckets, then each about
    ``ratio`` times the last, up to ``max_frames`` and beyond."""
    bounds = [2 * bucket_frames]
    while bounds[-1] < max_frames:
        bounds.append(-(-int(bounds[-1] * ratio) // bucket_frames) * bucket_frames)
    return tuple(bounds)


@dataclass(eq=False)
class _Row:
    tag: Hashable
    frames: int
    steps_done: int = 0


@dataclass(eq=False)
class _Buffers:
    """The static inputs and state of one (rows, frames) shape; a captured graph reads and writes them."""

    z: torch.Tensor
    """(R, 80, T) float32: the ODE state of each row (its noise when it joins, its mel when it leaves)."""
    mu: torch.Tensor
    cond: torch.Tensor
    mask: torch.Tensor
    """(R, 1, T) float32: 1 on a row's valid frames (every frame of an empty row, so it never divides by 0)."""
    spks: torch.Tensor
    index: torch.Tensor
    """(R,) int64: the step each row takes next (its entry in the step tables)."""
    replay: Callable[[], None] | None = None
    """The captured step (``CUDAGraph.replay``), or None: run it eagerly."""
    rows: int = field(init=False)
    frames: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows, _, self.frames = self.z.shape


@dataclass(eq=False)
class _Lane:
    """The rows of one lane: those in its buffers (``live``, in the order of ``rows``) and those joining."""

    rows: list[_Row] = field(default_factory=list)
    joining: list[tuple[_Row, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    live: _Buffers | None = None
    slot_of: dict[int, int] = field(default_factory=dict)
    """id(row) -> its slot in ``live``."""
    dirty: bool = False

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    def tags(self) -> list[Hashable]:
        return [r.tag for r in self.rows] + [j[0].tag for j in self.joining]


class RowSteps:
    """Rows of one ODE in flight (see the module docstring). ``n_timesteps``: Euler steps per row (the
    tables come from ``cfm.time_span(n_timesteps)``); ``channels``: mel bins of the state (the flow's
    output size); ``graphs``: replay each step as a CUDA graph (CUDA only); ``max_frames``: longest row
    expected (lanes cover it; longer rows get lanes of their own); ``pool``: a CUDA graph memory pool to
    share (default: one of its own)."""

    def __init__(
        self,
        cfm: ConditionalCFM,
        n_timesteps: int,
        device: torch.device,
        channels: int,
        *,
        graphs: bool = True,
        bucket_frames: int = DEFAULT_BUCKET_FRAMES,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        max_frames: int = DEFAULT_MAX_FRAMES,
        pool: object = None,
    ):
        if bucket_frames <= 0 or bucket_frames % 2:
            raise ValueError("bucket_frames must be a positive even number (the U-Net halves the length)")
        if not batch_sizes or any(b < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
        self.cfm = cfm
        self.steps = n_timesteps
        self.channels = channels
        self.device = torch.device(device)
        self.graphs = graphs and self.device.type == "cuda"
        self.bucket_frames = bucket_frames
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.bounds = lane_bounds(bucket_frames, max_frames)
        self._pool = pool
        self.tables = cfm.step_tables(cfm.time_span(n_timesteps, device=self.device))
        self._lanes: dict[int, _Lane] = {}
        """By upper bound (frames)."""
        self._shapes: dict[tuple[int, int], _Buffers] = {}
        self._arenas: dict[tuple[int, int], Arena] = {}
        """By (lane, rows)."""
        self.rows_computed = 0
        """Rows the last :meth:`step` computed (the graphed batch sizes its lanes are padded to)."""

    # ---- what is in flight ------------------------------------------------------------------------
    def __len__(self) -> int:
        """Rows in flight (joined, not yet left)."""
        return sum(len(lane) for lane in self._lanes.values())

    @property
    def max_rows(self) -> int:
        """Most rows one lane's step takes (the largest batch size)."""
        return self.batch_sizes[-1]

    @property
    def captured_shapes(self) -> list[tuple[int, int]]:
        """(rows, frames) of the steps captured as CUDA graphs."""
        return sorted(key for key, buffers in self._shapes.items() if buffers.replay is not None)

    def lanes(self) -> dict[int, list[Hashable]]:
        """The tags of the rows in flight, by lane (lanes without rows left out)."""
        return {bound: lane.tags() for bound, lane in self._lanes.items() if len(lane)}

    def steps_left(self, lane: int) -> int:
        """Steps the lane can take before its first row is done (0: no rows)."""
        rows = self._lanes[lane].rows + [j[0] for j in self._lanes[lane].joining] if lane in self._lanes else []
        return min((self.steps - r.steps_done for r in rows), default=0)

    def lane_of(self, frames: int) -> int:
        """The lane a row of ``frames`` frames joins."""
        length = self._bucket(frames)
        return next((b for b in self.bounds if b >= length), length)

    def room(self, frames: int) -> int:
        """Rows of this length that may still join before the next step."""
        lane = self._lanes.get(self.lane_of(frames))
        return self.max_rows - (len(lane) if lane is not None else 0)

    def prepare(self, batch_sizes: Sequence[int], frame_lengths: Sequence[int]) -> int:
        """Capture now the steps of these batch sizes and lengths, so that no listener waits for a
        capture; returns how many were captured."""
        if not self.graphs:
            return 0
        shapes = {self._shape(b, f) for b in batch_sizes for f in frame_lengths}
        new = sorted(shapes - set(self._shapes), key=lambda key: (key[0], -key[1]))  # longest first: one arena each
        for rows, frames in new:
            self._buffers(rows, frames)
        return len(new)

    # ---- joining, stepping, leaving --------------------------------------------------------------
    def join(self, tags: Sequence[Hashable], z: torch.Tensor, mu: torch.Tensor, cond: torch.Tensor,
             spks: torch.Tensor, frames: Sequence[int]) -> None:  # fmt: skip
        """New rows, from their first step on: z (noise), mu, cond (n, 80, >= max(frames)), spks (n, 80);
        row i is valid up to ``frames[i]``. Each goes to the lane of its length (which must have room)."""
        if not (len(tags) == len(frames) == z.shape[0] == mu.shape[0] == cond.shape[0] == spks.shape[0]):
            raise ValueError("join needs one tag, length, state, condition and speaker row per row")
        for i, (tag, length) in enumerate(zip(tags, frames)):
            if not 0 < length <= z.shape[2]:
                raise ValueError(f"row {tag!r}: {length} frames, its inputs have {z.shape[2]}")
            if self.room(length) < 1:
                raise ValueError(f"row {tag!r} does not fit: its lane holds {self.max_rows} rows")
            lane = self._lanes.setdefault(self.lane_of(length), _Lane())
            lane.joining.append(
                (_Row(tag, int(length)), z[i, :, :length], mu[i, :, :length], cond[i, :, :length], spks[i])
            )
            lane.dirty = True

    def drop(self, tags: Sequence[Hashable]) -> None:
        """Take rows out before they finish (their streams were stopped)."""
        gone = set(tags)
        for lane in self._lanes.values():
            if gone & set(lane.tags()):
                lane.rows = [r for r in lane.rows if r.tag not in gone]
                lane.joining = [j for j in lane.joining if j[0].tag not in gone]
                lane.dirty = True

    def step(self, lanes: Sequence[int] | None = None) -> int:
        """Advance every row of these lanes (default: of every lane) by one of its steps; returns the
        rows stepped."""
        stepped = computed = 0
        for bound in self._lanes if lanes is None else lanes:
            lane = self._lanes.get(bound)
            if lane is None:
                continue
            if lane.dirty:
                self._rebuild(bound, lane)
            live = lane.live
            if live is None or not lane.rows:
                continue
            if live.replay is not None:
                live.replay()
            else:
                self._step(live)
            for row in lane.rows:
                row.steps_done += 1
            stepped += len(lane.rows)
            computed += live.rows
        self.rows_computed = computed
        return stepped

    def leave(self) -> list[tuple[Hashable, torch.Tensor]]:
        """The rows that took their last step, out of the batch: (tag, state (1, 80, frames) float32, a
        copy) each, in the order they joined their lane."""
        out = []
        for lane in self._lanes.values():
            done = [(slot, row) for slot, row in enumerate(lane.rows) if row.steps_done >= self.steps]
            if not done:
                continue
            live = lane.live
            assert live is not None
            out += [(row.tag, live.z[slot : slot + 1, :, : row.frames].clone()) for slot, row in done]
            lane.rows = [row for row in lane.rows if row.steps_done < self.steps]
            lane.dirty = True
        return out

    def clear(self) -> None:
        """Forget every row (after a failed step)."""
        self._lanes = {}

    # ---- internals --------------------------------------------------------------------------------
    def _bucket(self, frames: int) -> int:
        return -(-frames // self.bucket_frames) * self.bucket_frames

    def _shape(self, rows: int, frames: int) -> tuple[int, int]:
        batch = next((b for b in self.batch_sizes if b >= rows), rows)
        return batch, self._bucket(frames)

    def _rebuild(self, bound: int, lane: _Lane) -> None:
        """Lay the lane's rows that stay and its joining ones out in the buffers of their shape."""
        lane.dirty = False
        joining, lane.joining = lane.joining, []
        rows = lane.rows + [j[0] for j in joining]
        if not rows:
            lane.rows, lane.live = [], None
            return
        old, kept = lane.live, lane.rows
        # gather the kept rows first: the target's buffers may share memory with the old ones
        carried: dict[str, torch.Tensor] = {}
        if old is not None and kept:
            slots = self._to_device(torch.tensor([lane.slot_of[id(r)] for r in kept], dtype=torch.long))
            carried = {name: getattr(old, name).index_select(0, slots) for name in (*_STATE, "spks")}
        target = self._buffers(*self._shape(len(rows), max(r.frames for r in rows)))
        for name in _STATE:
            buffer = getattr(target, name)
            buffer.zero_()
            if carried:
                width = min(buffer.shape[2], carried[name].shape[2])
                buffer[: len(kept), :, :width].copy_(carried[name][:, :, :width])
        target.spks.zero_()
        if carried:
            target.spks[: len(kept)].copy_(carried["spks"])
        for offset, (row, z, mu, cond, spks) in enumerate(joining):
            slot = len(kept) + offset
            target.z[slot, :, : row.frames].copy_(z)
            target.mu[slot, :, : row.frames].copy_(mu)
            target.cond[slot, :, : row.frames].copy_(cond)
            target.spks[slot].copy_(spks)
        lengths = [r.frames for r in rows] + [target.frames] * (target.rows - len(rows))
        index = [r.steps_done for r in rows] + [0] * (target.rows - len(rows))
        lengths_d, index_d = self._to_device(torch.tensor([lengths, index], dtype=torch.long))
        frame = torch.arange(target.frames, device=self.device)
        target.mask.copy_((frame < lengths_d[:, None]).unsqueeze(1))
        target.index.copy_(index_d)
        lane.rows, lane.live = rows, target
        lane.slot_of = {id(r): slot for slot, r in enumerate(rows)}

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the device without waiting for the device (pinned, asynchronous)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _step(self, b: _Buffers) -> None:
        """One Euler step of every row of ``b`` at its own index (what a graph captures)."""
        t, dt, *time_cond = (table.index_select(0, b.index) for table in self.tables)
        x = self.cfm.euler_step(b.z, b.mu, b.mask, b.spks, b.cond, t, dt, tuple(time_cond), padded=True)
        b.z.copy_(x)
        b.index.add_(1).clamp_(max=self.steps - 1)  # empty rows stay in the tables; a finished row leaves

    def _buffers(self, rows: int, frames: int) -> _Buffers:
        key = (rows, frames)
        buffers = self._shapes.get(key)
        if buffers is None:
            buffers = self._shapes[key] = self._new_buffers(rows, frames)
        return buffers

    def _new_buffers(self, rows: int, frames: int) -> _Buffers:
        channels = self.channels
        # the shapes of one lane and batch size share their buffers (one of them is live at a time)
        arena = self._arenas.setdefault((self.lane_of(frames), rows), Arena(rows, self.device))
        buffers = _Buffers(
            z=arena.view("z", channels, frames),
            mu=arena.view("mu", channels, frames),
            cond=arena.view("cond", channels, frames),
            mask=arena.view("mask", 1, frames).fill_(1),
            spks=torch.zeros(rows, channels, device=self.device),  # the speaker embedding, projected to 80
            index=torch.zeros(rows, dtype=torch.long, device=self.device),
        )
        if self.graphs:
            try:
                buffers.replay = self._capture(buffers)
            except Exception:
                logger.exception("capturing an ODE step of %d rows x %d frames failed; it runs eagerly", rows, frames)
        return buffers

    def _capture(self, b: _Buffers):
        logger.info("capturing a row-wise ODE step as a CUDA graph: %d rows, %d frames", b.rows, b.frames)
        side = warm_up_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):  # type: ignore[arg-type]
            self._step(b)
        return graph.replay  # the caller writes every buffer before the first replay
