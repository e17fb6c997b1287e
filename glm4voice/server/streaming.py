"""A validated ``/generate_stream`` request's life: wait for a slot, run one engine stream, hand out
its tokens; and the HTTP response that sends them as NDJSON lines.

:func:`job_tokens` is the transport-free core, shared by the HTTP response and the in-process server
(``glm4voice.server.inprocess``): it waits for a stream slot (refused with 503 when the wait is too
long), submits to the engine and yields the token ids; a failure before the first token is a
:class:`StreamRefused` (the JSON answer the HTTP server sends instead of a stream), one after it a
:class:`StreamBroken` (the stream's final error line). The engine stream is cancelled and the slot
released when the consumer stops early, so a client that goes away frees its slot at the engine's
next step.

:class:`TokenStreamResponse` (one ASGI response per request) holds the status line back until the
first token exists (so a failure before it is a clean JSON answer), then sends one line per token;
a task listens for the client's disconnect the whole time and cancels everything at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from glm4voice.server import wire
from glm4voice.server.admission import AdmissionClosed, Ticket
from glm4voice.server.metrics import Outcome, ServerMetrics

logger = logging.getLogger("glm4voice.server")


class TokenStream(Protocol):
    def __aiter__(self) -> AsyncIterator[int]: ...
    def cancel(self) -> None: ...


class EngineRejected(Exception):
    """The engine refused a request at submission: HTTP ``status`` and a message."""

    def __init__(self, status: int, text: str, retry_after: bool = False):
        super().__init__(text)
        self.status = status
        self.text = text
        self.retry_after = retry_after


class StreamRefused(Exception):
    """The request ends before its first token: ``response`` is the JSON answer (status, body,
    Retry-After) the HTTP server sends instead of a stream."""

    def __init__(self, response: Response):
        super().__init__(bytes(response.body).decode("utf-8", errors="replace").strip())
        self.response = response


class StreamBroken(Exception):
    """The stream failed after its first token: ``text`` is the final error line's message."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


@dataclass(eq=False)
class StreamJob:
    """Everything one request needs once validated (per-request state, dropped at the end)."""

    request_id: str
    prompt_ids: list[int]
    submit: Callable[[], TokenStream]
    """Submit to the engine; raises :class:`EngineRejected` or fails otherwise."""
    ticket: Ticket
    arrived: float
    queue_timeout_s: float
    retry_after_s: int
    metrics: ServerMetrics
    tokens_sent: int = 0
    outcome: Outcome = Outcome.CANCELLED
    headers_sent: bool = False
    answered: bool = False
    """The whole answer has been handed to the server."""
    stream: TokenStream | None = None
    shutting_down: bool = False
    stop_reason: str = "the server is shutting down"
    on_end: Callable[[StreamJob], None] | None = None
    """Called once when the request's life ends (the server forgets it)."""
    ended: bool = False

    def end(self) -> None:
        """The request's life is over: release its slot, tell ``on_end``, count its outcome (idempotent)."""
        if self.ended:
            return
        self.ended = True
        self.ticket.release()
        self.stream = None
        if self.on_end is not None:
            self.on_end(self)
        self.metrics.count(self.outcome)
        logger.debug("%s: %s, %d tokens", self.request_id, self.outcome.value, self.tokens_sent)

    def stop_for_shutdown(self, reason: str = "the server is shutting down") -> None:
        """End this stream now: its client gets a final error line saying ``reason`` (called on
        server shutdown)."""
        self.shutting_down = True
        self.stop_reason = reason
        if self.stream is not None:
            self.stream.cancel()


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A JSON error answer (one line, as the stream's error lines)."""
    content = (json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8")
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def busy_headers(retry_after_s: int) -> dict[str, str]:
    return {"Retry-After": str(retry_after_s)}


def refusal(status: int, text: str, retry_after_s: int | None = None) -> StreamRefused:
    """A :class:`StreamRefused` answering ``status`` (with Retry-After when ``retry_after_s`` is given)."""
    headers = busy_headers(retry_after_s) if retry_after_s is not None else None
    return StreamRefused(json_response(status, wire.error_body(text), headers))


async def job_tokens(job: StreamJob) -> AsyncGenerator[int, None]:
    """The token ids of ``job`` (see the module doc): raises :class:`StreamRefused` before the first
    token, :class:`StreamBroken` after it; sets ``job.outcome``. Closing it early (or cancelling the
    task that iterates it) cancels the engine stream. The caller ends the job (:meth:`StreamJob.end`)."""
    metrics = job.metrics
    waited_from = time.perf_counter()
    try:
        admitted = await job.ticket.wait(job.queue_timeout_s)
    except AdmissionClosed as error:
        job.outcome = Outcome.SHUTDOWN
        raise refusal(503, str(error), job.retry_after_s) from None
    metrics.queue_wait.observe(time.perf_counter() - waited_from)
    if not admitted:
        job.outcome = Outcome.BUSY
        raise refusal(
            503, f"no stream slot became free within {job.queue_timeout_s:g} s; retry later", job.retry_after_s
        )
    if job.shutting_down:
        job.outcome = Outcome.SHUTDOWN
        raise refusal(503, job.stop_reason, job.retry_after_s)
    try:
        stream = job.stream = job.submit()
    except EngineRejected as error:
        raise _rejected(job, error) from None
    except Exception as error:
        logger.exception("%s: the engine refused the request", job.request_id)
        job.outcome = Outcome.ENGINE_ERROR
        raise refusal(500, f"engine error: {error}") from None
    metrics.prompt_tokens.inc(len(job.prompt_ids))
    finished = False
    try:
        tokens = aiter(stream)
        while True:
            try:
                token_id = await anext(tokens)
            except StopAsyncIteration:
                finished = True
                break
            except Exception as error:
                finished = True
                if isinstance(error, EngineRejected) and not job.tokens_sent:
                    # a remote backend (glm4voice.serve) hears of a refusal when the stream starts
                    raise _rejected(job, error) from None
                logger.exception("%s: the engine failed after %d tokens", job.request_id, job.tokens_sent)
                job.outcome = Outcome.ENGINE_ERROR
                if job.tokens_sent:
                    raise StreamBroken(f"engine error: {error}") from None
                raise refusal(500, f"engine error: {error}") from None
            if job.tokens_sent == 0:
                metrics.time_to_first_token.observe(time.perf_counter() - job.arrived)
            job.tokens_sent += 1
            metrics.tokens_generated.inc()
            yield token_id
        if job.shutting_down:
            job.outcome = Outcome.SHUTDOWN
            text = f"{job.stop_reason}; generation stopped after {job.tokens_sent} tokens"
            if job.tokens_sent:
                raise StreamBroken(text)
            raise refusal(503, text, job.retry_after_s)
        job.outcome = Outcome.COMPLETED
    finally:
        if not finished:
            stream.cancel()


def _rejected(job: StreamJob, error: EngineRejected) -> StreamRefused:
    job.outcome = Outcome.BUSY if error.status == 503 else Outcome.REJECTED
    return refusal(error.status, error.text, job.retry_after_s if error.retry_after else None)


class TokenStreamResponse(Response):
    media_type = wire.MEDIA_TYPE

    def __init__(self, job: StreamJob, on_end: Callable[[StreamJob], None] | None = None):
        # no Response.__init__: it would declare a Content-Length for an empty body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job
        if on_end is not None:
            job.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job = self.job
        try:
            async with anyio.create_task_group() as group:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not job.answered:  # (servers also report a disconnect once the answer is complete)
                        logger.info("%s: client disconnected after %d tokens", job.request_id, job.tokens_sent)
                        group.cancel_scope.cancel()

                group.start_soon(watch_disconnect)
                try:
                    await self._serve(send)
                except OSError:  # the socket went away while sending (ASGI 2.4 servers)
                    job.outcome = Outcome.CANCELLED
                finally:
                    group.cancel_scope.cancel()
        finally:
            job.end()

    async def _serve(self, send: Send) -> None:
        job = self.job
        try:
            async with aclosing(job_tokens(job)) as tokens:
                async for token_id in tokens:
                    if not job.headers_sent:
                        await send(
                            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                        )
                        job.headers_sent = True
                    await send({"type": "http.response.body", "body": wire.token_line(token_id), "more_body": True})
        except StreamRefused as refused:
            await self._send_whole(send, refused.response)
            return
        except StreamBroken as broken:
            await send({"type": "http.response.body", "body": wire.error_line(broken.text), "more_body": True})
        if not job.headers_sent:  # the engine ended the stream without a token
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            job.headers_sent = True
        job.answered = True
        job.end()  # before the answer's last byte: a client that has it reads /health and /metrics with it counted
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_whole(self, send: Send, response: Response) -> None:
        self.job.end()  # before the client can have the answer (see _serve)
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        self.job.answered = True
        await send({"type": "http.response.body", "body": response.body, "more_body": False})
