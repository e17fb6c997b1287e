"""A handle on one streamed answer: its :class:`StreamState` and the decoder that owns it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

import numpy as np

from glm4voice.decoder.state import StreamState

if TYPE_CHECKING:
    from glm4voice.decoder.decoder import AudioDecoder


class DecoderStream:
    """One streamed answer: ``feed(codes) -> pcm`` any number of times, then ``finish() -> pcm``.

    Tokens are decoded once at least ``decoder.min_block_tokens`` are pending (else ``feed`` returns
    an empty array and keeps them). The audio of all calls together has ``decoder.mel_frames(n) * 256``
    samples for n tokens, like the offline decode. Every method is a call of the decoder's public
    API on :attr:`state`; a stream belongs to one caller at a time (a second thread gets RuntimeError).
    """

    def __init__(self, decoder: AudioDecoder, state: StreamState):
        self.decoder = decoder
        self.state = state

    def feed(self, codes: Sequence[int]) -> np.ndarray:
        """Add codes; decode them (and earlier pending ones) once ``min_block_tokens`` are pending."""
        return self.decoder.feed(self.state, codes)

    def finish(self) -> np.ndarray:
        """Decode what is pending and the held-back tail; the stream cannot be fed afterwards."""
        return self.decoder.finish(self.state)

    def close(self) -> None:
        """Drop the stream's tensors (finish() does this too)."""
        self.decoder.release(self.state)

    @property
    def seed(self) -> int:
        return self.state.seed

    @property
    def prompt_window(self) -> int | None:
        return self.state.prompt_window

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def pending_tokens(self) -> int:
        return len(self.state.pending)

    @property
    def tokens_decoded(self) -> int:
        return self.state.tokens_decoded

    @property
    def samples_emitted(self) -> int:
        return self.state.samples_emitted

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
