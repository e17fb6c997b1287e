"""The ``/generate_stream`` response: wait for a slot, run one engine stream, send NDJSON lines.

One ASGI response object per request, owning that request's whole life after validation:
it waits for a stream slot (503 + Retry-After when the wait is too long), submits to the engine,
holds the status line back until the first token exists (so a failure before it is a clean JSON
500), then sends one line per token. A task listens for the client's disconnect the whole time
and cancels everything at once; the engine stream is cancelled and the slot released in
``finally``, so a client that goes away frees its slot at the engine's next step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol

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


class TokenStreamResponse(Response):
    media_type = wire.MEDIA_TYPE

    def __init__(self, job: StreamJob, on_end: Callable[[StreamJob], None] | None = None):
        # no Response.__init__: it would declare a Content-Length for an empty body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job
        self.on_end = on_end

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
            job.ticket.release()
            job.stream = None
            if self.on_end is not None:
                self.on_end(job)
            job.metrics.count(job.outcome)
            logger.debug("%s: %s, %d tokens", job.request_id, job.outcome.value, job.tokens_sent)

    async def _serve(self, send: Send) -> None:
        job = self.job
        metrics = job.metrics
        waited_from = time.perf_counter()
        try:
            admitted = await job.ticket.wait(job.queue_timeout_s)
        except AdmissionClosed as error:
            job.outcome = Outcome.SHUTDOWN
            await self._send_whole(
                send, json_response(503, wire.error_body(str(error)), busy_headers(job.retry_after_s))
            )
            return
        metrics.queue_wait.observe(time.perf_counter() - waited_from)
        if not admitted:
            job.outcome = Outcome.BUSY
            text = f"no stream slot became free within {job.queue_timeout_s:g} s; retry later"
            await self._send_whole(send, json_response(503, wire.error_body(text), busy_headers(job.retry_after_s)))
            return
        if job.shutting_down:
            job.outcome = Outcome.SHUTDOWN
            await self._send_whole(
                send, json_response(503, wire.error_body(job.stop_reason), busy_headers(job.retry_after_s))
            )
            return
        try:
            stream = job.stream = job.submit()
        except EngineRejected as error:
            await self._refuse(send, error)
            return
        except Exception as error:
            logger.exception("%s: the engine refused the request", job.request_id)
            job.outcome = Outcome.ENGINE_ERROR
            await self._send_whole(send, json_response(500, wire.error_body(f"engine error: {error}")))
            return
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
                    if isinstance(error, EngineRejected) and not job.headers_sent:
                        # a remote backend (glm4voice.serve) hears of a refusal when the stream starts
                        await self._refuse(send, error)
                        return
                    logger.exception("%s: the engine failed after %d tokens", job.request_id, job.tokens_sent)
                    job.outcome = Outcome.ENGINE_ERROR
                    if job.headers_sent:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": wire.error_line(f"engine error: {error}"),
                                "more_body": True,
                            }
                        )
                    else:
                        await self._send_whole(send, json_response(500, wire.error_body(f"engine error: {error}")))
                        return
                    break
                if not job.headers_sent:
                    await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                    job.headers_sent = True
                await send({"type": "http.response.body", "body": wire.token_line(token_id), "more_body": True})
                if job.tokens_sent == 0:
                    metrics.time_to_first_token.observe(time.perf_counter() - job.arrived)
                job.tokens_sent += 1
                metrics.tokens_generated.inc()
            if job.shutting_down and job.outcome is not Outcome.ENGINE_ERROR:
                job.outcome = Outcome.SHUTDOWN
                text = f"{job.stop_reason}; generation stopped after {job.tokens_sent} tokens"
                if not job.headers_sent:
                    await self._send_whole(
                        send, json_response(503, wire.error_body(text), busy_headers(job.retry_after_s))
                    )
                    return
                await send({"type": "http.response.body", "body": wire.error_line(text), "more_body": True})
            elif job.outcome is not Outcome.ENGINE_ERROR:
                job.outcome = Outcome.COMPLETED
            if not job.headers_sent:  # the engine ended the stream without a token
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                job.headers_sent = True
            job.answered = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not finished:
                stream.cancel()

    async def _refuse(self, send: Send, error: EngineRejected) -> None:
        job = self.job
        job.outcome = Outcome.BUSY if error.status == 503 else Outcome.REJECTED
        headers = busy_headers(job.retry_after_s) if error.retry_after else None
        await self._send_whole(send, json_response(error.status, wire.error_body(error.text), headers))

    async def _send_whole(self, send: Send, response: Response) -> None:
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        self.job.answered = True
        await send({"type": "http.response.body", "body": response.body, "more_body": False})
