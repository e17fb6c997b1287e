"""What the decoder's batched calls have cost, as plain counters (a run's figures are the difference
of two snapshots): how many blocks shared a batch, how many rows the CUDA graphs computed for them
(a batch runs in the next graphed size up, the rest is padding), and the time spent."""

from __future__ import annotations

from dataclasses import dataclass, replace


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

    def add(self, blocks: int, graph_rows: int, tokens: int, seconds: float) -> None:
        self.batches += 1
        self.blocks += blocks
        self.graph_rows += graph_rows
        self.tokens += tokens
        self.seconds += seconds

    def snapshot(self) -> DecodeStats:
        return replace(self)

    def since(self, earlier: DecodeStats) -> dict[str, float | int | None]:
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
        }
