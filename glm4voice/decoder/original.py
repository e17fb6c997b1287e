"""The original's block API, ``token2wav(token, uuid, ...)``: per-uuid state kept inside the decoder.

The original kept each answer's mel overlap and vocoder cache in dictionaries keyed by a uuid and
deleted them at ``finalize``; :class:`UuidStates` is that table. Answers that never send
``finalize`` (the original's web demo skipped it when generation ended on the token limit) would
stay forever, so the table is bounded: past ``capacity`` open uuids the least recently used is
dropped (with a warning; a later block of that uuid starts over, without the seam cross-fade).

The returned mel, and what a caller that keeps it as its prompt gets. Like the original,
``token2wav`` returns the mel it vocoded: from the second block on, that starts with the frame the
vocoder carried over from the previous block (already in the previous block's returned mel). The
original web demo appends every returned mel to its prompt mel, so from the third block on the prompt
mel holds that frame twice: it is one frame longer than the final frames of the prompt tokens (only
one: each later block's new mel is one frame shorter, which keeps the excess at one). Then, with
F(n) the mel frames of n tokens and blocks k = 1, 2, ... ending after n_k tokens:

- blocks 1 and 2 are exactly what our streaming decode of the same cuts gives (``prompt_window=None``,
  the same noise and seed);
- block k >= 3 gets a prompt mel of F(n_{k-1}) - 33 frames instead of F(n_{k-1}) - 34, so its new mel
  starts one frame late: the frame at the seam is never vocoded, the 34-frame overlap cross-fade blends
  frames one apart, and the block has 256 samples fewer than ours; the whole answer is 256 x (blocks - 2)
  samples shorter;
- a caller that drops the first frame of each returned mel but the first (the original's unmerged
  PR #86) gets every block exactly as our streaming decode.

tests/glm4voice/decoder/test_token2wav.py checks all three against the original algorithm.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable

from glm4voice.decoder.state import StreamState

logger = logging.getLogger(__name__)

DEFAULT_TOKEN2WAV_SEED = 42
"""Seed of a new uuid's vocoder randomness: like the original (which reseeded its RNG with 42 for
every block), ``token2wav`` is deterministic unless the caller passes a seed."""
DEFAULT_MAX_OPEN_UUIDS = 1024
"""Open uuids kept at most (a few kB each)."""


class UuidStates:
    """uuid -> :class:`StreamState` of the answers in progress, least recently used first. Not
    thread-safe: the decoder calls it under its lock."""

    def __init__(self, capacity: int = DEFAULT_MAX_OPEN_UUIDS):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._states: OrderedDict[Hashable, StreamState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, uuid: Hashable) -> bool:
        return uuid in self._states

    def open(self, uuid: Hashable, create: Callable[[], StreamState]) -> StreamState:
        """The state of ``uuid`` (made by ``create`` for a new uuid)."""
        state = self._states.get(uuid)
        if state is not None:
            self._states.move_to_end(uuid)
            return state
        while len(self._states) >= self.capacity:
            old, dropped = next(iter(self._states.items()))
            if dropped.busy:  # in use right now: keep it (the table may exceed its capacity briefly)
                break
            del self._states[old]
            logger.warning(
                "token2wav: dropped the state of uuid %r (more than %d answers open without finalize)",
                old,
                self.capacity,
            )
        state = create()
        self._states[uuid] = state
        return state

    def pop(self, uuid: Hashable) -> StreamState | None:
        return self._states.pop(uuid, None)

    def discard(self, uuid: Hashable, state: StreamState) -> None:
        """Forget ``uuid`` if it still names ``state``."""
        if self._states.get(uuid) is state:
            del self._states[uuid]
