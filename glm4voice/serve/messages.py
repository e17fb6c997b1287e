"""What the deployments send each other (pickled by Ray): plain frozen data, one class per message.

A token stream (``TokenEngine.generate``) is :class:`Accepted` (the replica took the request: it is no
longer waiting in a router's queue; with the replica's own counters, for ``GET /replicas``), then :class:`Tokens` until the engine ends it, or
:class:`Refused` (the engine turned it down, as ``model_server.py`` would with a 4xx/503) or
:class:`Failed` (the engine failed; its text is the error's, as the token server would say it).

A speech-side turn (``SpeechSide.generate``) is :class:`Accepted`, then a series of :class:`TurnUpdate`: the turn's events
(``glm4voice.pipeline.events``) and the reply ids its demultiplexer kept meanwhile (so that the caller
can tell what was generated when it stops a turn early). ``SpeechSide.prepare_input`` answers the
tokenized input, or :class:`InputRefused` with the pipeline's failure kind and message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glm4voice.pipeline import FailureKind, TurnEvent


@dataclass(frozen=True)
class Accepted:
    replica: str
    """The serving replica's id (``serve.get_replica_context().replica_id.unique_id``)."""
    counters: dict[str, Any]
    """The replica's own counters (its ``stats()``) as it takes the request."""


@dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...]
    """Every id generated since the previous message (one, unless the reader fell behind)."""


@dataclass(frozen=True)
class Refused:
    status: int
    text: str
    retry_after: bool


@dataclass(frozen=True)
class Failed:
    text: str


TokenMessage = Accepted | Tokens | Refused | Failed


@dataclass(frozen=True)
class TurnUpdate:
    events: tuple[TurnEvent, ...]
    reply_ids: tuple[int, ...]
    """Reply ids kept since the previous update (in order)."""


@dataclass(frozen=True)
class InputRefused:
    kind: FailureKind
    message: str
