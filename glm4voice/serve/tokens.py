"""The caller's side of a ``TokenEngine`` stream: for the token server's app, and for the speech side.

- :class:`RemoteTokenStream`: one request's token ids from whichever engine replica Ray Serve picks,
  as the ``TokenStream`` that ``glm4voice.server`` streams. Refusals become :class:`EngineRejected`
  (503 + Retry-After when every replica is busy and the router's queue is full, or when no replica
  took the request within the queue timeout); a replica that dies before the stream's first token is
  replaced by another at once (the client saw nothing; a seed gives the same answer there), one that
  dies later ends the stream with :class:`ReplicaLost`.
- :class:`RayTokenBackend`: the ``TokenBackend`` of ``glm4voice.server.app.create_app`` on top of
  that, so that the ingress serves ``POST /generate_stream``, ``/health`` and ``/metrics`` with the
  token server's own code (validation, NDJSON lines, error bodies).
- :class:`RayTokenClient`: the ``TokenStreamClient`` of a :class:`~glm4voice.pipeline.VoiceChat` (the
  speech side's), with the errors of :mod:`glm4voice.client`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, cast

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from glm4voice.client import RequestRejectedError, ServerBusyError, StreamFailedError, request_body
from glm4voice.hub import resolve_checkpoint
from glm4voice.serve.board import ReplicaBoard
from glm4voice.serve.messages import Accepted, Failed, Refused, Tokens
from glm4voice.server.schema import (
    GenerateRequest,
    PromptLimits,
    RequestError,
    check_prompt_ids,
    parse_generate_request,
)
from glm4voice.server.settings import ServerSettings
from glm4voice.server.streaming import EngineRejected
from glm4voice.text_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_MODEL_FILE, GLMTokenizer

logger = logging.getLogger("glm4voice.serve")

REPLACEMENTS = 2
"""Times a stream that has not sent a token yet is sent to another replica when its replica dies."""


class ReplicaLost(RuntimeError):
    """The engine replica serving a stream stopped after the stream's first token."""


class StreamCounters:
    """The caller's view of the streams it routed (plain counters; ``/health`` and ``/metrics``), and
    of each replica (:class:`~glm4voice.serve.board.ReplicaBoard`, ``GET /replicas``)."""

    GAUGES = frozenset({"running", "streams_open"})

    def __init__(self) -> None:
        self.streams_started = 0
        self.streams_open = 0
        self.streams_busy = 0
        self.streams_moved = 0
        """Streams sent to another replica because theirs died before their first token."""
        self.streams_lost = 0
        """Streams cut off by the death of their replica."""
        self.board = ReplicaBoard()

    def as_dict(self) -> dict[str, float]:
        return {"running": True, "streams_started": self.streams_started, "streams_open": self.streams_open,
                "streams_busy": self.streams_busy, "streams_moved": self.streams_moved,
                "streams_lost": self.streams_lost}  # fmt: skip


class RemoteTokenStream:
    """Token ids of one request served by the engine replicas (``TokenStream``: ``async for``, ``cancel()``)."""

    def __init__(self, start: Callable[[], DeploymentResponseGenerator[Any]], queue_timeout_s: float,
                 counters: StreamCounters | None = None):  # fmt: skip
        self._start = start
        self._queue_timeout_s = queue_timeout_s
        self._counters = counters or StreamCounters()
        self._call: DeploymentResponseGenerator[Any] | None = None
        self._ids: deque[int] = deque()
        self._deadline = time.monotonic() + queue_timeout_s
        self._moves_left = REPLACEMENTS
        self._done = False
        self.replica: str | None = None
        """The replica serving the stream (once it has taken it)."""
        self.tokens = 0
        self._counters.streams_started += 1
        self._counters.streams_open += 1

    def __aiter__(self) -> RemoteTokenStream:
        return self

    async def __anext__(self) -> int:
        while not self._ids:
            if self._done:
                raise StopAsyncIteration
            message = await self._receive()
            if message is None:
                self._end()
                raise StopAsyncIteration
            if isinstance(message, Tokens):
                self._ids.extend(message.ids)
            elif isinstance(message, Accepted):
                self.replica = message.replica
                self._counters.board.accepted(message.replica, message.counters)
            elif isinstance(message, Refused):
                self._end()
                raise EngineRejected(message.status, message.text, message.retry_after)
            elif isinstance(message, Failed):
                self._end()
                raise RuntimeError(message.text)
        self.tokens += 1
        return self._ids.popleft()

    async def _receive(self) -> Any:
        """The next message of the replica's stream (None at its end), sending the request again to
        another replica if its own died before it sent a token."""
        while True:
            try:
                if self._call is None:  # starting the call can fail as iterating it can
                    self._call = self._start()
                if self.replica is None:  # still waiting in a router's queue for a free replica
                    return await asyncio.wait_for(anext(self._call), max(0.0, self._deadline - time.monotonic()))
                return await anext(self._call)
            except StopAsyncIteration:
                return None
            except TimeoutError:
                self._abandon()
                self._counters.streams_busy += 1
                text = f"no stream slot became free within {self._queue_timeout_s:g} s; retry later"
                raise EngineRejected(503, text, retry_after=True) from None
            except BackPressureError as error:
                self._end()
                self._counters.streams_busy += 1
                waiting = error.args[0] if error.args else "the most"  # (num_queued_requests, max_queued_requests, ...)
                text = f"every engine replica is busy and {waiting} requests are waiting; retry later"
                raise EngineRejected(503, text, retry_after=True) from None
            except RayActorError as error:
                replica = self._lose_replica()
                if self.tokens == 0 and not self._ids and self._moves_left > 0:
                    logger.warning("engine replica %s stopped before the stream's first token; sending the "
                                   "request to another replica", replica or "(not yet known)")  # fmt: skip
                    self._moves_left -= 1
                    self._counters.streams_moved += 1
                    self._call = None
                    continue
                self._end()
                self._counters.streams_lost += 1
                raise ReplicaLost(
                    f"the engine replica {replica} serving this stream stopped after {self.tokens} tokens "
                    f"({type(error).__name__}); Ray Serve replaces it, and a new request goes to a running one"
                ) from None
            except BaseException:  # the replica's own failure (a bug), or this task cancelled: the stream is over
                self._abandon()
                raise

    def cancel(self) -> None:
        """Stop the request (the replica cancels the engine stream; idempotent)."""
        self._abandon()

    def _lose_replica(self) -> str | None:
        replica, self.replica = self.replica, None
        if replica is not None:
            self._counters.board.lost(replica)
            self._counters.board.ended(replica)
        return replica

    def _abandon(self) -> None:
        try:
            if self._call is not None and not self._done:
                self._call.cancel()  # type: ignore[no-untyped-call]
        finally:  # the stream is over for the counters even if Ray's cancel raises
            self._end()

    def _end(self) -> None:
        if not self._done:
            self._done = True
            self._counters.streams_open -= 1
            if self.replica is not None:
                self._counters.board.ended(self.replica)


def _generate(
    streaming: DeploymentHandle[Any], ids: list[int], request: GenerateRequest
) -> DeploymentResponseGenerator[Any]:
    """``TokenEngine.generate`` through a streaming handle (``handle.options(stream=True)``)."""
    return cast(DeploymentResponseGenerator[Any], streaming.generate.remote(ids, request))


def tokenizer_folder(model_path: str | Path) -> Path:
    """The LLM checkpoint's text tokenizer files only (a hub id downloads just those)."""
    return resolve_checkpoint(model_path, allow_patterns=[TOKENIZER_MODEL_FILE, TOKENIZER_CONFIG_FILE])


class RayTokenBackend:
    """``glm4voice.server``'s ``TokenBackend`` served by the ``TokenEngine`` replicas."""

    is_token_backend = True

    def __init__(self, engine: DeploymentHandle[Any], settings: ServerSettings):
        self.engine = engine
        self.streaming = engine.options(stream=True)
        self.settings = settings
        self.counters = StreamCounters()
        self.vocab_size = 0
        self.max_seq_len = settings.max_seq_len

    @property
    def checkpoint_folder(self) -> Path:
        return tokenizer_folder(self.settings.model_path)

    async def start(self) -> None:
        """Waits for a running engine replica (the vocabulary and sequence length come from it)."""
        info = await self.engine.info.remote()
        self.vocab_size = info["vocab_size"]
        self.max_seq_len = info["max_seq_len"]

    async def stop(self) -> None:
        """Nothing: Ray Serve owns the engine replicas."""

    def submit(self, prompt_ids: list[int], request: GenerateRequest) -> RemoteTokenStream:
        ids = list(prompt_ids)
        return RemoteTokenStream(lambda: _generate(self.streaming, ids, request), self.settings.queue_timeout_s,
                                 self.counters)  # fmt: skip

    def stats(self) -> dict[str, float]:
        return self.counters.as_dict()

    @property
    def counter_names(self) -> frozenset[str]:
        return frozenset(self.counters.as_dict()) - StreamCounters.GAUGES

    @property
    def board(self) -> ReplicaBoard:
        return self.counters.board


class RayTokenClient:
    """A :class:`~glm4voice.pipeline.TokenStreamClient` on the engine replicas: the request is checked
    as ``model_server.py`` checks it, and failures are :mod:`glm4voice.client`'s errors."""

    base_url = "the token engine replicas (Ray Serve)"

    def __init__(self, engine: DeploymentHandle[Any], settings: ServerSettings, tokenizer: GLMTokenizer,
                 info: dict[str, Any]):  # fmt: skip
        self.streaming = engine.options(stream=True)
        self.settings = settings
        self.tokenizer = tokenizer
        engine_limit = info["max_seq_len"] - 1
        self.limits = PromptLimits(min(settings.prompt_limit, engine_limit), vocab_size=info["vocab_size"])
        self.counters = StreamCounters()

    async def stream(self, prompt: str | None = None, **params: Any) -> AsyncGenerator[int, None]:
        """Token ids as the engine generates them (see :meth:`glm4voice.client.AsyncTokenClient.stream`)."""
        try:
            body = json.dumps(request_body(prompt, **params)).encode()
            request = parse_generate_request(body, self.settings.max_new_tokens_cap)
            if request.prompt_token_ids is not None:
                ids = list(request.prompt_token_ids)
            else:
                ids = self.tokenizer.encode_prompt(cast(str, request.prompt))  # (one of the two is given)
            check_prompt_ids(ids, self.limits)
        except RequestError as error:
            raise RequestRejectedError(error.status, error.text, error.detail) from error
        stream = RemoteTokenStream(lambda: _generate(self.streaming, ids, request), self.settings.queue_timeout_s,
                                   self.counters)  # fmt: skip
        try:
            async for token in stream:
                yield token
        except EngineRejected as error:
            if error.status == 503:
                raise ServerBusyError(error.text, self.settings.retry_after_s if error.retry_after else None) from None
            raise RequestRejectedError(error.status, error.text) from None
        except Exception as error:
            raise StreamFailedError(str(error), stream.tokens) from error
        finally:
            stream.cancel()
