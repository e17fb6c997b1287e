"""Which token ids each KV cache slot holds, so that a new request reuses the longest cached prefix
of its prompt (a conversation's next turn starts with the previous prompt and answer).

The slots are the engine's KV cache slots. Each is *busy* (a running request writes it), *cached*
(its request ended; its keys and values stay until the slot is needed) or *empty*. For every slot
the host keeps the token ids at its positions and how many leading positions hold valid keys and
values (``length``): for a request that ended, its prompt and every reply token but the last (the
last one was drawn, never fed back).

Placing a request (:meth:`PrefixCache.place`):

* the *source* is the slot, busy or not, whose valid prefix agrees longest with the prompt (at most
  ``len(prompt) - 1`` tokens: the last prompt token is computed, its logits give the first reply
  token); only the common prefix is reused, whatever follows a divergence is recomputed;
* a prompt that a slot holds whole *as its prompt* (the same request again: a retry) reuses all of
  it and the first-token logits kept with it, so nothing is recomputed and the same seed draws the
  same reply: recomputing the last token alone would round differently from the first time, and
  that is enough to change a sampled token;
* the *target* is the lowest free slot whose loss is nothing: an empty slot, a cached one whose
  whole content is a prefix of the prompt (the same conversation, going on), or one whose content
  begins with the whole prompt (a retry replaces the old reply); a repeat stays in the slot that
  holds it (no copy). If every free slot holds another conversation, the least recently used one
  is evicted. (Where a slot lies does not matter for speed: decode batches are compact, see
  glm4voice.llm.runner);
* if source and target differ, the engine copies positions ``[0, reuse)`` from source to target (a
  device copy of ``reuse`` positions in every layer: microseconds against the prefill it saves), and
  a cached source that the prompt supersedes becomes empty (its content lives on in the target).

Busy slots may be sources: their valid positions only ever grow, and every write to them is
ordered before the copy on the device. Everything here runs on the engine's worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Placement:
    slot: int
    """The slot the request gets."""
    reuse: int
    """Leading prompt tokens whose keys and values the slot holds once ``copy_from`` is copied.
    The whole prompt (a repeat): its first-token logits are kept too, no prefill is needed."""
    copy_from: int | None
    """Copy positions ``[0, reuse)`` (and the first-token logits, for a repeat) from this slot into
    ``slot`` first (None: already in place)."""
    evicted: bool
    """A cached conversation other than this prompt's was dropped to make room."""
    repeat: bool = False
    """``reuse`` is the whole prompt: draw the first token from the kept logits."""


class PrefixCache:
    def __init__(self, slots: int, capacity: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tokens = np.zeros((slots, capacity), dtype=np.int64)
        """Token id at each position of each slot (valid below ``length``)."""
        self.length = np.zeros(slots, dtype=np.int64)
        """Leading positions of each slot whose keys and values are written and match ``tokens``."""
        self.busy = np.zeros(slots, dtype=bool)
        self.prompt_len = np.zeros(slots, dtype=np.int64)
        """Length of the prompt whose first-token logits the slot keeps (0: none)."""
        self.last_used = np.zeros(slots, dtype=np.int64)
        self._clock = 0

    @property
    def slots(self) -> int:
        return self.busy.shape[0]

    def has_free_slot(self) -> bool:
        return not self.busy.all()

    def cached_slots(self) -> int:
        """Free slots that hold a conversation."""
        return int(((~self.busy) & (self.length > 0)).sum())

    def common_prefix(self, prompt: np.ndarray, limit: int) -> np.ndarray:
        """For every slot, how many leading positions (at most ``limit``) hold ``prompt``'s ids."""
        m = min(int(self.length.max(initial=0)), limit)
        if m <= 0:
            return np.zeros(self.slots, dtype=np.int64)
        # [slots, m]: position agrees and is valid
        agree = (self.tokens[:, :m] == prompt[:m]) & (np.arange(m) < self.length[:, None])
        return np.where(agree.all(axis=1), m, agree.argmin(axis=1))

    def place(self, prompt: Sequence[int]) -> Placement:
        """Choose a slot for ``prompt`` (see the module docstring) and mark it busy, holding the
        reused prefix. There must be a free slot (:meth:`has_free_slot`)."""
        free = ~self.busy
        if not free.any():
            raise RuntimeError("no free KV cache slot")
        ids = np.asarray(prompt, dtype=np.int64)
        n = ids.shape[0]
        if not self.enabled:
            slot = int(np.flatnonzero(free)[0])
            self._take(slot, ids, 0)
            return Placement(slot, 0, None, False)
        agree = self.common_prefix(ids, n)  # up to the whole prompt
        superseded = (self.length > 0) & (agree == self.length)  # all it holds is in the prompt
        retried = agree == n  # it holds the whole prompt, then an old reply
        repeats = retried & (self.prompt_len == n)  # ... as its prompt, with the first-token logits
        if repeats.any():
            source = int(np.flatnonzero(repeats & free)[0] if (repeats & free).any() else np.flatnonzero(repeats)[0])
            reuse = n
        else:
            reusable = np.minimum(agree, n - 1)
            source = int(reusable.argmax())
            reuse = int(reusable[source])
        no_loss = free & ((self.length == 0) | superseded | retried)
        evicted = False
        if reuse == n and free[source]:  # a repeat stays in its slot: the same decode rows, the same reply
            target = source
        elif no_loss.any():
            target = int(np.flatnonzero(no_loss)[0])
        else:  # every free slot holds another conversation: drop the least recently used one
            candidates = np.flatnonzero(free)
            target = int(candidates[self.last_used[candidates].argmin()])
            evicted = True
        copy_from = None
        if reuse > 0 and source != target:
            copy_from = source
            if free[source] and superseded[source]:
                self._forget(source)  # its whole content is about to live on in the target
        repeat = reuse == n
        self._take(target, ids, reuse)
        if repeat:
            self.prompt_len[target] = n
        return Placement(target, reuse, copy_from, evicted, repeat)

    def _take(self, slot: int, ids: np.ndarray, reuse: int) -> None:
        self.busy[slot] = True
        self.tokens[slot, :reuse] = ids[:reuse]
        self.length[slot] = reuse
        self.prompt_len[slot] = 0
        self._touch(slot)

    def _forget(self, slot: int) -> None:
        self.length[slot] = 0
        self.prompt_len[slot] = 0

    def prompt_done(self, slot: int, n: int) -> None:
        """The slot's whole prompt (``n`` tokens) is written and its first-token logits are kept."""
        self.prompt_len[slot] = n

    def written(self, slot: int, start: int, ids: Sequence[int]) -> None:
        """Positions ``start ..`` of ``slot`` now hold ``ids`` (a prefill chunk)."""
        end = start + len(ids)
        self.tokens[slot, start:end] = ids
        self.length[slot] = end

    def drawn(self, slot: int, position: int, token: int) -> None:
        """``token`` was drawn for ``position``: every earlier position is written; this one will
        be when the token is fed to the next step (if ever)."""
        self.tokens[slot, position] = token
        self.length[slot] = position

    def release(self, slot: int, keep: bool) -> None:
        """The slot's request ended; ``keep``: its keys and values stay valid for later requests."""
        self.busy[slot] = False
        if not (keep and self.enabled):
            self._forget(slot)
        self._touch(slot)

    def drop_cached(self) -> None:
        """Forget the cached content of every free slot."""
        self.length[~self.busy] = 0
        self.prompt_len[~self.busy] = 0

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self.last_used[slot] = self._clock
