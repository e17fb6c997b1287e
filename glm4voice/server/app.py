"""The token server's FastAPI app: ``POST /generate_stream``, ``GET /health``, ``GET /metrics``.

    app = create_app(engine, ServerSettings(...))   # engine: a glm4voice.llm Engine or a TokenBackend
    serve(app, settings)                            # uvicorn until SIGINT/SIGTERM (or the engine dies)

``model_server.py`` is the command line around these two. Everything a running server holds is in
one :class:`ServerState` (``app.state.server``); nothing lives in module globals. The lifespan starts
the engine (load, warm-up) and loads the text tokenizer before the port accepts connections.
Requests pass :mod:`glm4voice.request_guard` (Host allow-list, no cross-site browser requests) and
connections :mod:`glm4voice.serving`'s limits. If the engine's worker dies (an engine that tells,
``add_failure_callback``), open streams end with an error line and the process exits with
:data:`~glm4voice.defaults.ENGINE_FAILED_EXIT_CODE`, so that a supervisor restarts it instead of a
server answering 503 for ever. Wire formats: docs/API.md.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from glm4voice.defaults import ENGINE_FAILED_EXIT_CODE
from glm4voice.devices import device_name
from glm4voice.request_guard import RequestGuard, wildcard_notice
from glm4voice.server import wire
from glm4voice.server.admission import Admission, AdmissionClosed, QueueFull
from glm4voice.server.backend import TokenBackend
from glm4voice.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from glm4voice.server.metrics import Outcome, ServerMetrics
from glm4voice.server.schema import PromptLimits, RequestError, check_prompt_ids, parse_generate_request
from glm4voice.server.settings import ServerSettings
from glm4voice.server.streaming import StreamJob, StreamRefused, TokenStreamResponse, json_response, refusal
from glm4voice.serving import build_server
from glm4voice.text_tokenizer import GLMTokenizer

logger = logging.getLogger("glm4voice.server")


@dataclass
class ServerState:
    """Per-app state (``app.state.server``): nothing lives in module globals."""

    settings: ServerSettings
    backend: TokenBackend
    tokenizer: GLMTokenizer | None
    admission: Admission
    metrics: ServerMetrics
    ready: bool = False
    device_name: str = ""
    request_ids: Any = field(default_factory=lambda: itertools.count(1))
    jobs: set[StreamJob] = field(default_factory=set)
    """Requests past validation whose response has not ended (queued or streaming)."""
    failure: BaseException | None = None
    """Why the engine died (None while it runs)."""
    request_exit: Callable[[], None] | None = None
    """Stops the server process (set by :func:`serve`)."""

    @property
    def stop_reason(self) -> str:
        if self.failure is not None:
            return f"the engine failed ({type(self.failure).__name__}: {self.failure}); the server is exiting"
        return "the server is shutting down"

    def begin_shutdown(self) -> None:
        """Stop accepting work and end every open stream with an error line, at once (instead
        of letting the server cut the connections after its grace period)."""
        if not self.ready and self.admission.closed:
            return
        self.ready = False
        self.admission.close(self.stop_reason)
        for job in list(self.jobs):
            job.stop_for_shutdown(self.stop_reason)
        logger.info("shutting down: stopped %d open requests", len(self.jobs))

    def engine_failed(self, error: BaseException) -> None:
        """The engine's worker died (its streams have ended with an error): stop serving and exit
        non-zero; answering 503 until someone restarts the process by hand helps nobody."""
        if self.failure is not None:
            return
        self.failure = error
        logger.critical(
            "the engine failed (%s: %s): ending open requests and exiting with code %d so that a supervisor "
            "(or glm4voice.launch) restarts the server", type(error).__name__, error, ENGINE_FAILED_EXIT_CODE,
        )  # fmt: skip
        self.begin_shutdown()
        if self.request_exit is not None:
            self.request_exit()

    def text_tokenizer(self) -> GLMTokenizer:
        """The text tokenizer (loaded by the lifespan before the server is ready)."""
        if self.tokenizer is None:
            raise RuntimeError("the text tokenizer is not loaded yet (the server has not started)")
        return self.tokenizer

    def limits(self) -> PromptLimits:
        """Prompt limits (once the engine has started: they depend on the loaded model)."""
        engine_limit = getattr(self.backend, "max_seq_len", self.settings.max_seq_len) - 1
        return PromptLimits(min(self.settings.prompt_limit, engine_limit), vocab_size=self.backend.vocab_size)


def create_app(engine: Any, settings: ServerSettings, tokenizer: GLMTokenizer | None = None) -> FastAPI:
    """The FastAPI app around ``engine`` (a ``glm4voice.llm`` engine, or any :class:`TokenBackend`).

    The lifespan starts the engine (load + warm-up) and loads the text tokenizer from the
    checkpoint folder unless one is given; only then does the server accept connections.
    """
    from glm4voice.server.engine_backend import as_backend

    backend = as_backend(engine, settings)
    admission = Admission(settings.max_concurrent_streams, settings.max_queue)
    metrics = ServerMetrics(active_streams=lambda: admission.active, queue_length=lambda: admission.waiting)
    state = ServerState(settings, backend, tokenizer, admission, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = time.perf_counter()
        logger.info("starting the engine: %s on %s (%s)", settings.model_path, settings.device, settings.dtype)
        await backend.start()
        watch = getattr(backend, "add_failure_callback", None)
        if watch is not None:
            watch(state.engine_failed)
        try:
            if state.tokenizer is None:
                state.tokenizer = await anyio.to_thread.run_sync(
                    GLMTokenizer.from_pretrained, backend.checkpoint_folder
                )
            metrics.register_engine(backend.stats, getattr(backend, "counter_names", frozenset()))
            state.device_name = device_name(settings.device)
            state.ready = True
            logger.info(
                "ready in %.1f s: serving on http://%s:%d", time.perf_counter() - started, settings.host, settings.port
            )
            yield
        finally:
            state.begin_shutdown()
            logger.info("stopping the engine")
            await backend.stop()

    app = FastAPI(title="GLM-4-Voice token server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(RequestGuard, policy=settings.host_policy, respond=_refusal)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        return json_response(error.status_code, wire.error_body(str(error.detail)), dict(error.headers or {}))

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        arrived = time.perf_counter()
        if not state.ready:  # before reading the body: a stopping server answers 503 whatever it is
            metrics.count(Outcome.SHUTDOWN)
            return refusal(503, state.stop_reason, settings.retry_after_s).response
        try:
            body = await _read_body(request, settings.max_body_bytes, settings.connection_limits.header_timeout_s)
        except RequestError as error:
            metrics.count(Outcome.REJECTED)
            return json_response(error.status, wire.error_body(error.text, error.detail))
        except ClientDisconnect:  # gone while its body was being read: nobody to answer
            metrics.count(Outcome.CANCELLED)
            return Response(status_code=400)
        try:
            job = await open_stream(state, body, arrived)
        except StreamRefused as refused:
            return refused.response
        return TokenStreamResponse(job)

    @app.get("/health")
    async def health() -> Response:
        return health_response(state)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app


async def open_stream(state: ServerState, body: bytes, arrived: float) -> StreamJob:
    """Validate a ``/generate_stream`` body, tokenize its prompt and reserve a slot: the request's
    :class:`StreamJob` (run it with :func:`glm4voice.server.streaming.job_tokens`, then ``job.end()``).
    Every refusal here happens before streaming: :class:`StreamRefused` with the JSON answer. Shared
    by the HTTP route and the in-process server (``glm4voice.server.inprocess``)."""
    settings = state.settings
    if not state.ready:
        state.metrics.count(Outcome.SHUTDOWN)
        raise refusal(503, state.stop_reason, settings.retry_after_s)
    try:
        if len(body) > settings.max_body_bytes:  # (the HTTP route refuses it while reading)
            raise RequestError(
                413, f"the request body has {len(body)} bytes; this server accepts at most {settings.max_body_bytes}"
            )
        parsed = parse_generate_request(body, settings.max_new_tokens_cap)
        if parsed.prompt is not None:
            prompt_ids = await anyio.to_thread.run_sync(state.text_tokenizer().encode_prompt, parsed.prompt)
        else:
            assert parsed.prompt_token_ids is not None  # the schema requires exactly one of the two
            prompt_ids = list(parsed.prompt_token_ids)
        check_prompt_ids(prompt_ids, state.limits())
    except RequestError as error:
        state.metrics.count(Outcome.REJECTED)
        raise StreamRefused(json_response(error.status, wire.error_body(error.text, error.detail))) from None
    try:
        ticket = state.admission.reserve()
    except QueueFull as error:
        state.metrics.count(Outcome.BUSY)
        raise refusal(503, f"{error}; retry later", settings.retry_after_s) from None
    except AdmissionClosed as error:
        state.metrics.count(Outcome.SHUTDOWN)
        raise refusal(503, str(error), settings.retry_after_s) from None
    request_id = f"req-{next(state.request_ids)}"
    logger.debug("%s: %d prompt tokens, %s", request_id, len(prompt_ids), parsed)
    job = StreamJob(
        request_id=request_id,
        prompt_ids=prompt_ids,
        submit=lambda: state.backend.submit(prompt_ids, parsed),
        ticket=ticket,
        arrived=arrived,
        queue_timeout_s=settings.queue_timeout_s,
        retry_after_s=settings.retry_after_s,
        metrics=state.metrics,
        on_end=state.jobs.discard,
    )
    state.jobs.add(job)
    return job


def health_response(state: ServerState) -> Response:
    """The ``GET /health`` answer: 200 while ready, else 503 (same body; ``status`` says why)."""
    settings, admission = state.settings, state.admission
    engine = state.backend.stats()
    healthy = state.ready and engine.get("running", True)
    if state.failure is not None:
        status = "engine failed"
    else:
        status = "ready" if healthy else ("engine stopped" if state.ready else "stopping")
    body = {
        "status": status,
        "active_streams": admission.active,
        "queue_length": admission.waiting,
        "open_requests": len(state.jobs),
        "max_concurrent_streams": settings.max_concurrent_streams,
        "max_queue": settings.max_queue,
        "max_prompt_tokens": state.limits().max_prompt_tokens if state.ready else None,
        "max_new_tokens_cap": settings.max_new_tokens_cap,
        "model": settings.model_path,
        "device": settings.device,
        "device_name": state.device_name,
        "dtype": settings.dtype,
        "weights": settings.weights,
        "engine": engine,
    }
    if state.failure is not None:
        body["error"] = state.stop_reason
    return json_response(200 if healthy else 503, body)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body has {declared} bytes; this server accepts at most {limit}")
    chunks, size = [], 0
    with anyio.move_on_after(timeout_s) as deadline:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
    if deadline.cancelled_caught:
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s")
    return b"".join(chunks)


def _refusal(status: int, text: str) -> Response:
    return json_response(status, wire.error_body(text))


def serve(app: FastAPI, settings: ServerSettings) -> int:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM: 0; 1 if it never started;
    :data:`~glm4voice.defaults.ENGINE_FAILED_EXIT_CODE` if it stopped because the engine died."""
    state: ServerState = app.state.server
    if notice := wildcard_notice(settings.host, settings.host_policy):
        logger.warning(notice)
    server = build_server(
        app, settings.host, settings.port, settings.connection_limits, before_shutdown=state.begin_shutdown,
        log_level=settings.log_level, lifespan="on", timeout_graceful_shutdown=settings.shutdown_grace_s,
    )  # fmt: skip
    state.request_exit = server.request_exit
    server.run()
    if state.failure is not None:
        logger.error("exiting with code %d: %s", ENGINE_FAILED_EXIT_CODE, state.stop_reason)
        return ENGINE_FAILED_EXIT_CODE
    if not server.started:
        logger.error("the server did not start (see the errors above)")
        return 1
    return 0
