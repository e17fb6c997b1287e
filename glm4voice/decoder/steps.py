"""Blocks that join the decoder's ODE between Euler steps (``AudioDecoder.tick``).

A ``feed_many`` call is a whole solve: the blocks that arrive while it runs wait for all of its 10
steps, and the small calls that many streams then make are latency-bound (one step of one block costs
about two fifths of a step of eight). :class:`Stepper` keeps every block in flight as a row of one batch
(:class:`~cosyvoice.flow.row_steps.RowSteps`), each at its own step, and does the rest at the step
boundaries:

1. rows whose stream stopped leave (their streams were closed, or nobody waits for them any more);
2. rows that took their last step leave: the vocoder runs for them (in groups of the same vocoder
   shape), their streams move on, their audio starts its copy to the host;
3. new blocks come in: a stream's first block runs at once as a call of its own (a listener waits for
   it; the rows wait for one call; whole-block CUDA graphs serve it on a GPU), every other block runs
   the flow encoder and joins the rows (up to the largest graphed batch; the rest queue for room);
4. a few steps (:data:`STEPS_PER_TICK`) are queued on the device: of the lane (rows of similar lengths, see
   :mod:`cosyvoice.flow.row_steps`) that holds the block whose listener runs dry first (a stream runs dry
   at its first audio plus the audio it has had; the earliest deadline goes first);
   when that listener runs dry within :data:`URGENT_S`, the LLM engine waits for the step (``make_way``);
5. the audio of the rows that left reaches their callers (the host waits for its copy, which the
   device made before the step, so the step runs while the host delivers and comes back).

Each block's noise, prompt and vocoder randomness are its stream's, as in ``feed_many``: a stream's
audio is what ``feed`` gives, up to the float rounding of the padded batch.

Measured on an H100 beside the LLM engine (one process), this served fewer conversations than
whole-solve calls, so ``AudioDecoder(step_batching=...)`` is off by default; docs/perf/decoder.md says
why and what would have to change first.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from glm4voice.decoder.blocks import Block, commit_block
from glm4voice.decoder.codes import DecoderError

if TYPE_CHECKING:
    from cosyvoice.flow.row_steps import RowSteps
    from glm4voice.decoder.decoder import AudioDecoder
    from glm4voice.decoder.state import StreamState

logger = logging.getLogger(__name__)

STEPS_PER_TICK = 5
"""Steps a tick gives the lane it picks (fewer when one of its blocks is done sooner): the host work of
a boundary (Python, under the GIL that the event loop and the LLM engine share) is paid once for them,
and a new block waits at most this many steps of one lane."""
URGENT_S = 0.3
"""A step whose most urgent block's stream runs dry within this many seconds runs inside ``make_way``
(the LLM engine of this process starts no step until that step is done): audio before text, while
the text runs ahead of the listener anyway."""


def _always() -> bool:
    return True


@dataclass(eq=False)
class StepJob:
    """One stream's next codes for :meth:`AudioDecoder.tick`: ``reply`` gets the block's PCM (maybe empty:
    fewer than a block pending) or the exception its stream raised; ``wanted()`` False drops the block
    at the next step boundary (its turn stopped). ``reply`` is called on the decoder's thread."""

    stream: Any
    """A DecoderStream or StreamState."""
    codes: Sequence[int]
    reply: Callable[[np.ndarray | Exception], None]
    wanted: Callable[[], bool] = _always


@dataclass(eq=False)
class _Flight:
    job: StepJob
    state: StreamState
    block: Block
    tag: int = 0
    deadline: float = 0.0
    """When the stream runs out of audio without this block (``time.perf_counter``)."""


class Stepper:
    """The blocks in flight between step boundaries, for one :class:`AudioDecoder` (which owns the
    streams, the models and the lock; see the module docstring)."""

    def __init__(self, decoder: AudioDecoder, rows: RowSteps):
        self.decoder = decoder
        self.rows = rows
        self._tags = itertools.count()
        self._flying: dict[Hashable, _Flight] = {}
        """Rows in the ODE, by tag."""
        self._queued: list[_Flight] = []
        """Blocks taken from their streams, waiting for room in the rows."""

    def __len__(self) -> int:
        """Blocks in hand: in the ODE or waiting for room."""
        return len(self._flying) + len(self._queued)

    def tick(self, jobs: Sequence[StepJob], make_way: Callable[[], AbstractContextManager[None]] | None) -> int:
        """One step boundary and the steps after it (see the module docstring); returns the blocks still
        in hand (call again while it is not 0). ``make_way``: see ``AudioDecoder.tick``."""
        d = self.decoder
        started = time.perf_counter()
        with d._device_context():
            self._drop_stopped()
            leaving, copied = self._leave()
            arriving = self._take(jobs)
            firsts = [f for f in arriving if f.block.starts_stream]
            self._queued += [f for f in arriving if f not in firsts]
            if firsts:
                with make_way() if make_way is not None else nullcontext():
                    self._run_first_blocks(firsts)
            self._join()
            lane, deadline = self._most_urgent_lane()
            urgent = make_way is not None and lane is not None and deadline - time.perf_counter() < URGENT_S
            with make_way() if urgent else nullcontext():  # type: ignore[misc]
                stepped, steps = self._step(lane, STEPS_PER_TICK)
                if urgent and d.device.type == "cuda":  # the engine waits for the step, not only its launch
                    torch.cuda.current_stream(d.device).synchronize()
            if copied is not None:
                copied.synchronize()
        for flight, result in leaving:
            d._unclaim(flight.state)
            flight.job.reply(result.numpy() if isinstance(result, torch.Tensor) else result)
        tokens = sum(f.block.new_tokens.numel() for f, _ in leaving)
        d.stats.add_steps(stepped, self.rows.rows_computed, len(leaving), tokens, time.perf_counter() - started, steps)
        return len(self)

    # ---- the boundary's parts ---------------------------------------------------------------------
    def _drop_stopped(self) -> None:
        stopped = [f for f in (*self._flying.values(), *self._queued) if f.state.finished or not f.job.wanted()]
        if not stopped:
            return
        self.rows.drop([f.tag for f in stopped])
        gone = {id(f) for f in stopped}
        self._queued = [f for f in self._queued if id(f) not in gone]
        for f in stopped:
            self._flying.pop(f.tag, None)
            self._fail(f, RuntimeError("the block's stream was stopped before its audio was decoded"))

    def _leave(self) -> tuple[list[tuple[_Flight, torch.Tensor | Exception]], torch.cuda.Event | None]:
        """Vocode the rows that took their last step; their audio (being copied to the host) or error."""
        left = self.rows.leave()
        if not left:
            return [], None
        d = self.decoder
        flights = [self._flying.pop(tag) for tag, _ in left]
        mels = [z[:, :, f.block.prompt_mel.shape[2] :].float() for (_, z), f in zip(left, flights)]
        try:
            results = d._synth.vocode_rows([f.block for f in flights], mels)
            audio: list[torch.Tensor | Exception] = []
            for f, result in zip(flights, results):
                commit_block(f.state, d._geometry, f.block, result)
                audio.append(d._pcm_to_host(f.state, result.speech))
        except Exception as error:
            if not isinstance(error, DecoderError):
                logger.exception("vocoding %d blocks failed", len(flights))
            for f in flights:
                d._end(f.state)
            return [(f, error) for f in flights], None
        copied = None
        if d.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        return list(zip(flights, audio)), copied

    def _take(self, jobs: Sequence[StepJob]) -> list[_Flight]:
        """Claim each job's stream and take its next block; jobs with nothing to decode are answered."""
        d = self.decoder
        taken = []
        for job in jobs:
            if not job.wanted():
                job.reply(RuntimeError("the block's stream was stopped before its audio was decoded"))
                continue
            try:
                block, state = d._take_job(job.stream, job.codes)
            except Exception as error:  # noqa: BLE001 - this job only: bad codes, busy or finished stream
                job.reply(error)
                continue
            if block is None:  # fewer than min_block_tokens pending
                d._unclaim(state)
                job.reply(np.zeros(0, dtype=np.float32))
                continue
            deadline = time.perf_counter() if state.first_audio_at is None else (
                state.first_audio_at + state.samples_emitted / d.sample_rate)  # fmt: skip
            taken.append(_Flight(job, state, block, next(self._tags), deadline))
        return taken

    def _run_first_blocks(self, firsts: list[_Flight]) -> None:
        """Streams' first blocks, as calls of their own (batched by shape)."""
        groups: dict[tuple, list[_Flight]] = {}
        for f in firsts:
            groups.setdefault(f.block.shape_key(), []).append(f)
        d = self.decoder
        for group in groups.values():
            for start in range(0, len(group), d.max_batch):
                batch = group[start : start + d.max_batch]
                outputs = d._decode_batch([(f.state, f.block) for f in batch])
                for f, out in zip(batch, outputs):
                    d._unclaim(f.state)
                    f.job.reply(out)

    def _most_urgent_lane(self) -> tuple[int | None, float]:
        """The lane holding the block whose stream runs dry first, and when it does (None: no rows)."""
        deadlines = {
            bound: min(self._flying[tag].deadline for tag in tags) for bound, tags in self.rows.lanes().items()
        }
        if not deadlines:
            return None, 0.0
        lane = min(deadlines, key=deadlines.__getitem__)
        return lane, deadlines[lane]

    def _join(self) -> None:
        joining: list[_Flight] = []
        waiting: list[_Flight] = []
        rooms: dict[int, int] = {}
        for f in self._queued:  # in the order they came, as long as their lanes have room
            lane = self.rows.lane_of(f.block.feat_len)
            room = rooms.setdefault(lane, self.rows.room(f.block.feat_len))
            (joining if room > 0 else waiting).append(f)
            rooms[lane] = room - 1
        self._queued = waiting
        if not joining:
            return
        try:
            inputs = self.decoder._synth.flow_inputs([f.block for f in joining])
            self.rows.join([f.tag for f in joining], inputs.z, inputs.mu, inputs.cond, inputs.spks, inputs.feat_lens)
        except Exception as error:
            if not isinstance(error, DecoderError):
                logger.exception("preparing %d blocks for the ODE failed", len(joining))
            for f in joining:
                self.decoder._end(f.state)
                self._fail(f, error)
            return
        for f in joining:
            self._flying[f.tag] = f

    def _step(self, lane: int | None, most: int) -> tuple[int, int]:
        """Up to ``most`` steps of ``lane`` (until one of its blocks is done); returns (its rows, steps)."""
        if lane is None:
            return 0, 0
        try:
            stepped, steps = 0, min(most, self.rows.steps_left(lane))
            for _ in range(steps):
                stepped = self.rows.step([lane])
            return stepped, steps
        except Exception as error:
            logger.exception("an ODE step of %d rows failed", len(self._flying))
            self.rows.clear()
            flights, self._flying = list(self._flying.values()), {}
            for f in flights:
                self.decoder._end(f.state)
                self._fail(f, error)
            return 0, 0

    def _fail(self, flight: _Flight, error: Exception) -> None:
        self.decoder._unclaim(flight.state)
        flight.job.reply(error)
