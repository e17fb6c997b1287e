"""What the decoder's batched calls have cost, as plain counters (a run's figures are the difference
of two snapshots): how many blocks shared a batch, how many rows the CUDA graphs computed for them
(a batch runs in the next graphed size up, the rest is padding), and the time spent, in all and per
phase of a batch (host time on the decoder's thread: what launching the work cost, or waiting for the
device where a phase copies to the host)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

PHASES = ("flow", "ode", "vocoder", "to_host")
"""Phases of a batch: ``flow`` the flow's inputs and encoder (the ODE excluded), ``ode`` the ODE solve,
``vocoder`` the vocoder and the seams, ``to_host`` the audio's copy to the host (it waits for the device)."""


@dataclass
class DecodeStats:
    batches: int = 0
    """Batches run by ``AudioDecoder.feed_many`` (a lone block is a batch of one)."""
    blocks: int = 0
    """Blocks in those batches."""
    graph_rows: int = 0
    """Rows the model computed for them: the graphed batch size each batch ran in (its own size when it
    ran without a graph)."""
    tokens: int = 0
    """New speech tokens those blocks decoded (prompts not counted)."""
    seconds: float = 0.0
    """Wall time of the batches and the ticks on the decoder's thread (model work and the copy of the
    audio to the host)."""
    steps: int = 0
    """ODE steps run by ``AudioDecoder.tick`` (blocks that join and leave between steps)."""
    step_rows: int = 0
    """Rows those steps advanced (blocks in flight, summed over the steps)."""
    step_graph_rows: int = 0
    """Rows those steps computed (the graphed batch size they were padded to)."""
    step_blocks: int = 0
    """Blocks that left the steps decoded."""
    phase_s: dict[str, float] = field(default_factory=dict)
    """Host seconds per phase of :data:`PHASES` (the ODE's time is not part of ``flow``'s)."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the body's wall time as phase ``name`` (less the phases timed inside it)."""
        started = time.perf_counter()
        inner = sum(self.phase_s.values())
        try:
            yield
        finally:
            spent = time.perf_counter() - started - (sum(self.phase_s.values()) - inner)
            self.phase_s[name] = self.phase_s.get(name, 0.0) + spent

    def add(self, blocks: int, graph_rows: int, tokens: int, seconds: float) -> None:
        self.batches += 1
        self.blocks += blocks
        self.graph_rows += graph_rows
        self.tokens += tokens
        self.seconds += seconds

    def add_steps(self, rows: int, graph_rows: int, blocks_done: int, tokens: int, seconds: float, steps: int = 1) -> None:  # fmt: skip
        """One tick: ``steps`` steps of ``rows`` rows (0: none ran) and ``blocks_done`` blocks that left."""
        steps = steps if rows else 0
        self.steps += steps
        self.step_rows += rows * steps
        self.step_graph_rows += graph_rows * steps
        self.step_blocks += blocks_done
        self.tokens += tokens
        self.seconds += seconds

    def snapshot(self) -> DecodeStats:
        return replace(self, phase_s=dict(self.phase_s))

    def since(self, earlier: DecodeStats) -> dict[str, float | int | dict[str, float] | None]:
        """Figures of the batches run after ``earlier`` (a snapshot of the same counters)."""
        batches = self.batches - earlier.batches
        blocks = self.blocks - earlier.blocks
        rows = self.graph_rows - earlier.graph_rows
        seconds = self.seconds - earlier.seconds
        return {
            "batches": batches,
            "mean_batch": round(blocks / batches, 2) if batches else None,
            "padded_row_share": round(1 - blocks / rows, 3) if rows else None,
            "mean_block_tokens": round((self.tokens - earlier.tokens) / done, 1)
            if (done := blocks + self.step_blocks - earlier.step_blocks)
            else None,
            "steps": self.steps - earlier.steps,
            "mean_step_rows": round((self.step_rows - earlier.step_rows) / steps, 2)
            if (steps := self.steps - earlier.steps)
            else None,
            "step_blocks": self.step_blocks - earlier.step_blocks,
            "busy_s": round(seconds, 2),
            "mean_batch_ms": round(1000 * seconds / batches, 1) if batches else None,
            "phase_s": {
                name: round(self.phase_s.get(name, 0.0) - earlier.phase_s.get(name, 0.0), 3)
                for name in PHASES
                if name in self.phase_s
            },
        }
