"""Streaming resampling of mono float audio (soxr): chunk by chunk, with no seams.

``soxr.ResampleStream`` keeps the filter state between chunks and compensates its delay, so the
concatenated output of any chunking equals resampling the whole signal at once (tested).
"""

from __future__ import annotations

import numpy as np
import soxr

QUALITY = "HQ"
"""The quality of :func:`glm4voice.audio.resample` (the offline path)."""


class StreamResampler:
    """``feed`` chunks at ``source_rate``, get samples at ``target_rate``; ``flush`` at the end."""

    def __init__(self, source_rate: int, target_rate: int):
        self.source_rate = int(source_rate)
        self.target_rate = int(target_rate)
        self._stream = (
            None
            if self.source_rate == self.target_rate
            else soxr.ResampleStream(self.source_rate, self.target_rate, 1, dtype="float32", quality=QUALITY)
        )
        self.samples_in = 0
        self.samples_out = 0

    def feed(self, samples: np.ndarray, *, last: bool = False) -> np.ndarray:
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        self.samples_in += len(samples)
        out = samples if self._stream is None else self._stream.resample_chunk(samples, last=last)
        self.samples_out += len(out)
        return out

    def flush(self) -> np.ndarray:
        """The samples the filter still holds (call once, at the end of the stream)."""
        return self.feed(np.zeros(0, dtype=np.float32), last=True)
