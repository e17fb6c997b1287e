"""What a Ray Serve deployment of GLM-4-Voice is made of: one frozen, validated :class:`ServeConfig`.

Everything the token server already knows (checkpoint, dtype, streams per engine, queue, limits, the
HTTP surface's host names) is its :class:`~glm4voice.server.settings.ServerSettings`, read the same way
as ``model_server.py`` reads it; this module adds what Ray places and scales: how many engine and
speech replicas (fixed, or autoscaled between two counts on ongoing requests), what each reserves
(GPUs, CPUs) and where the speech side goes (:class:`Placement`). :func:`engine_options` and friends
turn it into the options of each ``serve.deployment``. No Ray import here: the config is plain data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from glm4voice.defaults import GPU_MAX_CONCURRENT_TURNS, MAX_CONCURRENT_TURNS
from glm4voice.devices import AUTO, DECODER_DTYPE_CHOICES
from glm4voice.hub import PUBLISHED_DECODER, PUBLISHED_SPEECH_TOKENIZER
from glm4voice.pipeline import PipelineConfig
from glm4voice.server.settings import ServerSettings

SERVE_APP = "glm4voice"
"""The Serve application with the HTTP ingress (route prefix ``/``) and the speech side."""
ENGINE_APP = "glm4voice-engine"
"""The Serve application of the token engines, deployed (and placed on the GPUs) first."""
ENGINE_DEPLOYMENT = "TokenEngine"
SPEECH_DEPLOYMENT = "SpeechSide"
INGRESS_DEPLOYMENT = "Ingress"


SERVE_PORT = 8000
"""Ray Serve's HTTP port (its own default)."""
SHARED_SPEECH_GPUS = 0.4
"""A speech replica's share of a GPU when it sits beside an engine replica (``Placement.SHARED``). The
engine takes the rest, more than half, so that two engines never share one GPU."""
AUTOSCALE_TARGET = 0.75
"""Autoscaling aims at this fraction of a replica's streams (turns) in use."""
INGRESS_MAX_ONGOING = 4096
"""Requests one ingress replica holds at once (every open token stream, realtime session and chat
completion): far above what the engines take, so that refusals come from the engines' queue."""
REPLICA_GRACE_S = 5.0
"""How long a replica that is being stopped lets its open requests run."""
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0


def speech_pipeline(**fields: Any) -> PipelineConfig:
    """A speech replica's :class:`PipelineConfig` (``fields`` as its own): paced generation off. The
    replica reads its tokens from an engine replica through Ray Serve, whose streams do not push back:
    pacing would only read them later while the engine generates each answer to its end anyway, and
    each paced turn would keep one of the replica's ``max_ongoing_requests`` for its whole playback."""
    return PipelineConfig(**{"pace_generation": False, **fields})


class Placement(str, enum.Enum):
    """Where the speech side (speech tokenizer + decoder) runs on a GPU cluster."""

    SHARED = "shared"
    """Beside an engine replica on the same GPU (fractional ``num_gpus``: the speech replica takes
    :data:`SHARED_SPEECH_GPUS`, the engine the rest; one speech replica per engine replica)."""
    SEPARATE = "separate"
    """On GPUs of its own (``num_gpus`` = ``speech_gpus``, 1 by default)."""


@dataclass(frozen=True)
class ReplicaSpec:
    """How many replicas of one deployment, and what each reserves."""

    replicas: int = 1
    """Replicas at start (the fixed count, unless ``max_replicas`` is larger)."""
    max_replicas: int | None = None
    """More than ``replicas``: autoscale between ``replicas`` and this on ongoing requests."""
    gpus: float = 0.0
    """``num_gpus`` of each replica (1 = a GPU of its own; a fraction shares one)."""
    cpus: float = 0.0
    """``num_cpus`` of each replica (0: not reserved, e.g. a test cluster with 2 CPUs)."""

    def __post_init__(self) -> None:
        if self.replicas < 0 or (self.max_replicas is not None and self.max_replicas < max(1, self.replicas)):
            raise ValueError(f"need 0 <= replicas <= max_replicas, got {self.replicas}, {self.max_replicas}")
        if not 0 <= self.gpus <= 1 and not float(self.gpus).is_integer():
            raise ValueError(f"gpus must be a fraction of one GPU or a whole number, got {self.gpus}")
        if self.gpus < 0 or self.cpus < 0:
            raise ValueError(f"gpus and cpus must be >= 0, got {self.gpus}, {self.cpus}")

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.replicas


@dataclass(frozen=True)
class ServeConfig:
    server: ServerSettings = field(default_factory=ServerSettings)
    """The token server's settings, per engine replica (``max_concurrent_streams`` is one engine's
    batch and its ``max_ongoing_requests``; ``max_queue`` the requests a router lets wait for a free
    replica; ``host``/``port`` and ``allowed_hosts`` the HTTP surface's)."""
    tokenizer_path: str = PUBLISHED_SPEECH_TOKENIZER
    flow_path: str = PUBLISHED_DECODER
    decoder_dtype: str = AUTO
    pipeline: PipelineConfig = field(default_factory=speech_pipeline)
    """The speech replicas' pipeline (:func:`speech_pipeline`: not paced)."""
    engine: ReplicaSpec = field(default_factory=ReplicaSpec)
    speech: ReplicaSpec = field(default_factory=ReplicaSpec)
    """``replicas=0``: no speech side (``/generate_stream`` only; the OpenAI routes need it)."""
    max_concurrent_turns: int | None = None
    """Turns one speech replica runs at once (its ``max_ongoing_requests``); default as web_demo.py:
    32 on a GPU, 8 on a CPU."""
    ingress_replicas: int = 1
    engine_factory: str | None = None
    """``module:function`` that returns the token backend of a replica (``function(settings)``; e.g. a
    benchmark's forced answers); default: ``glm4voice.server.engine_backend.build_engine``."""

    def __post_init__(self) -> None:
        if self.decoder_dtype not in DECODER_DTYPE_CHOICES:
            raise ValueError(f"decoder_dtype must be one of {DECODER_DTYPE_CHOICES}, got {self.decoder_dtype!r}")
        if self.engine.replicas < 1:
            raise ValueError("at least one engine replica is needed")
        if self.ingress_replicas < 1:
            raise ValueError(f"ingress_replicas must be at least 1, got {self.ingress_replicas}")
        if self.max_concurrent_turns is not None and self.max_concurrent_turns < 1:
            raise ValueError(f"max_concurrent_turns must be at least 1, got {self.max_concurrent_turns}")
        if self.engine_factory is not None and ":" not in self.engine_factory:
            raise ValueError(f"engine_factory must be 'module:function', got {self.engine_factory!r}")

    @property
    def on_gpu(self) -> bool:
        return self.server.device.startswith("cuda")

    @property
    def turns_per_speech_replica(self) -> int:
        if self.max_concurrent_turns is not None:
            return self.max_concurrent_turns
        return GPU_MAX_CONCURRENT_TURNS if self.on_gpu else MAX_CONCURRENT_TURNS

    @property
    def replica_device(self) -> str:
        """The device inside a replica: Ray shows a GPU replica only its own GPU(s), as ``cuda:0``."""
        return "cuda:0" if self.on_gpu else "cpu"


def gpu_shares(placement: Placement, speech_gpus: float | None = None) -> tuple[float, float]:
    """``(engine, speech)`` ``num_gpus`` of one replica each for ``placement``."""
    if placement is Placement.SHARED:
        speech = SHARED_SPEECH_GPUS if speech_gpus is None else speech_gpus
        if not 0 < speech < 0.5:
            raise ValueError(f"a speech replica beside an engine takes less than half a GPU, got {speech}")
        return round(1.0 - speech, 6), speech
    return 1.0, 1.0 if speech_gpus is None else speech_gpus


def _scaling(spec: ReplicaSpec, per_replica: int) -> dict[str, Any]:
    if spec.autoscaled:
        target = max(1.0, AUTOSCALE_TARGET * per_replica)
        return {"autoscaling_config": {
            "min_replicas": spec.replicas, "initial_replicas": spec.replicas, "max_replicas": spec.max_replicas,
            "target_ongoing_requests": target,
        }}  # fmt: skip
    return {"num_replicas": spec.replicas}


def _actor(spec: ReplicaSpec) -> dict[str, Any]:
    return {"num_gpus": spec.gpus, "num_cpus": spec.cpus}


def _lifecycle() -> dict[str, Any]:
    return {"graceful_shutdown_timeout_s": REPLICA_GRACE_S, "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S}  # fmt: skip


def engine_options(config: ServeConfig) -> dict[str, Any]:
    """``serve.deployment`` options of the token engine: one engine (one GPU) per replica, at most its
    batch of streams at once; the rest wait in the router's queue, up to ``max_queue``, then 503."""
    streams = config.server.max_concurrent_streams
    return {"name": ENGINE_DEPLOYMENT, "max_ongoing_requests": streams, "max_queued_requests": config.server.max_queue,
            "ray_actor_options": _actor(config.engine), **_scaling(config.engine, streams), **_lifecycle()}  # fmt: skip


def speech_options(config: ServeConfig) -> dict[str, Any]:
    turns = config.turns_per_speech_replica
    return {"name": SPEECH_DEPLOYMENT, "max_ongoing_requests": turns, "max_queued_requests": config.server.max_queue,
            "ray_actor_options": _actor(config.speech), **_scaling(config.speech, turns), **_lifecycle()}  # fmt: skip


def ingress_options(config: ServeConfig) -> dict[str, Any]:
    return {"name": INGRESS_DEPLOYMENT, "num_replicas": config.ingress_replicas,
            "max_ongoing_requests": INGRESS_MAX_ONGOING, "ray_actor_options": {"num_cpus": 0}, **_lifecycle()}  # fmt: skip
