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
    """Wall time of the batches on the decoder's thread (model work and the copy of the audio to the host)."""
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
            "mean_block_tokens": round((self.tokens - earlier.tokens) / blocks, 1) if blocks else None,
            "busy_s": round(seconds, 2),
            "mean_batch_ms": round(1000 * seconds / batches, 1) if batches else None,
            "phase_s": {
                name: round(self.phase_s.get(name, 0.0) - earlier.phase_s.get(name, 0.0), 3)
                for name in PHASES
                if name in self.phase_s
            },
        }
