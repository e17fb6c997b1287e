"""Answers kept by audio id: expiry at expires_at, a bound on how many are kept."""

from __future__ import annotations

from glm4voice.openai_api.store import AudioStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_expire_at_their_time_and_the_oldest_go_first():
    clock = Clock()
    store = AudioStore(ttl_s=60, max_entries=2, clock=clock)
    store.put("a", [1, 2, 3], "one", store.expiry())
    assert store.expiry() == 1060 and store.get("a").reply_ids.tolist() == [1, 2, 3]
    assert store.get("a").transcript == "one"
    clock.now = 1059.9
    assert store.get("a") is not None
    clock.now = 1060.0
    assert store.get("a") is None and len(store) == 0  # expired: gone
    for name in ("b", "c", "d"):
        store.put(name, [7], name, store.expiry())
    assert store.get("b") is None and store.get("c") is not None and store.get("d") is not None
    clock.now += 61
    store.put("e", [8], "e", store.expiry())  # adding drops the expired ones
    assert len(store) == 1 and store.get("e").reply_ids.dtype.name == "int32"
