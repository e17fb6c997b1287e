"""What the ingress knows of each replica it sends work to (``GET /replicas``), without asking.

A replica starts every stream it takes with its own counters (:class:`~glm4voice.serve.messages.Accepted`),
and the caller counts what it routed there, what is still open and whether it saw the replica die.
Asking the replicas instead (``handle.broadcast("stats")``) would wait behind their work: Ray Serve
counts such a call against ``max_ongoing_requests``, so a full replica answers only once a stream ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ReplicaEntry:
    replica: str
    reported: dict[str, Any] = field(default_factory=dict)
    """The replica's own counters, as of the last stream it took from this process."""
    routed: int = 0
    """Streams (turns) this process sent there."""
    open: int = 0
    """Of them, in flight now."""
    lost: bool = False
    """This process saw the replica die (a stream ended with its actor's death)."""


class ReplicaBoard:
    """One per deployment and caller process (plain data; no calls, no timers)."""

    def __init__(self) -> None:
        self.entries: dict[str, ReplicaEntry] = {}

    def accepted(self, replica: str, counters: dict[str, Any]) -> None:
        entry = self.entries.setdefault(replica, ReplicaEntry(replica))
        entry.reported = dict(counters)
        entry.routed += 1
        entry.open += 1

    def ended(self, replica: str) -> None:
        self.entries[replica].open -= 1

    def lost(self, replica: str) -> None:
        self.entries[replica].lost = True

    def as_list(self) -> list[dict[str, Any]]:
        return [asdict(entry) for entry in self.entries.values()]
