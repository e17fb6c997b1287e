"""Answers kept for multi-turn chat completions: an audio id -> the answer's exact token ids.

A client cites an earlier answer as ``{"role": "assistant", "audio": {"id": ...}}``; its ids go back
into the prompt unchanged. Entries expire at ``expires_at`` (seconds since the epoch, as OpenAI sends
it); expired entries and the oldest beyond ``max_entries`` are dropped whenever an entry is added (no
background task).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_TTL_S = 3600
DEFAULT_MAX_ENTRIES = 10_000
"""About 80 MB at most (2000 ids of 4 bytes each per answer)."""


@dataclass(frozen=True)
class StoredAnswer:
    reply_ids: np.ndarray
    """int32 token ids."""
    transcript: str
    expires_at: int


class AudioStore:
    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
    ):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, StoredAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def expiry(self) -> int:
        """``expires_at`` of an entry added now."""
        return int(self._clock() + self.ttl_s)

    def put(self, audio_id: str, reply_ids: Sequence[int], transcript: str, expires_at: int) -> None:
        self._expire()
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[audio_id] = StoredAnswer(np.asarray(reply_ids, dtype=np.int32), transcript, int(expires_at))

    def get(self, audio_id: str) -> StoredAnswer | None:
        entry = self._entries.get(audio_id)
        if entry is not None and entry.expires_at <= self._clock():
            del self._entries[audio_id]
            return None
        return entry

    def _expire(self) -> None:
        now = self._clock()
        for audio_id in [k for k, v in self._entries.items() if v.expires_at <= now]:
            del self._entries[audio_id]
