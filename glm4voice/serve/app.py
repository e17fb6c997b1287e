"""The two Serve applications and how they are started, in order, and stopped.

- ``glm4voice-engine`` (:data:`~glm4voice.serve.config.ENGINE_APP`): the ``TokenEngine`` deployment
  alone, no HTTP route. Deployed first, so that on a GPU cluster every engine replica has its GPU
  before any speech replica takes a share of one (with ``Placement.SHARED`` an engine takes more than
  half a GPU and a speech replica the rest, which pairs them one to one).
- ``glm4voice`` (:data:`~glm4voice.serve.config.SERVE_APP`): the ``Ingress`` at route prefix ``/``
  and the ``SpeechSide`` deployment it calls.

    deploy(config)      # serve.start + both apps; returns once every replica is running
    undeploy()          # both apps deleted (the replicas stop)
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve import Application

from glm4voice.serve.config import (
    ENGINE_APP,
    SERVE_APP,
    ServeConfig,
    engine_options,
    ingress_options,
    speech_options,
)
from glm4voice.serve.engine import TokenEngine
from glm4voice.serve.ingress import Ingress
from glm4voice.serve.speech import SpeechSide

logger = logging.getLogger("glm4voice.serve")


def engine_application(config: ServeConfig) -> Application:
    return serve.deployment(**engine_options(config))(TokenEngine).bind(config)


def front_application(config: ServeConfig) -> Application:
    speech = serve.deployment(**speech_options(config))(SpeechSide).bind(config) if config.speech.replicas else None
    return serve.deployment(**ingress_options(config))(Ingress).bind(config, speech)


def deploy(config: ServeConfig) -> None:
    """Start Serve's HTTP proxy on ``config.server``'s host and port (if Serve is not running yet), then
    the engine application, then the front one; returns when all their replicas are running."""
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    logger.info("deploying %s: %d engine replica(s)", ENGINE_APP, config.engine.replicas)
    serve.run(engine_application(config), name=ENGINE_APP, route_prefix=None)
    logger.info("deploying %s: the ingress and %d speech replica(s)", SERVE_APP, config.speech.replicas)
    serve.run(front_application(config), name=SERVE_APP, route_prefix="/")


def undeploy() -> None:
    """Delete both applications (front first), waiting until their replicas have stopped."""
    for name in (SERVE_APP, ENGINE_APP):
        serve.delete(name)
