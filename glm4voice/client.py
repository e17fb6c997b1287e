"""Clients of the token server (``model_server.py``): stream generated token ids, sync or async.

    from glm4voice.client import TokenClient

    with TokenClient("http://localhost:10000") as client:
        for token_id in client.stream(prompt_token_ids=ids, temperature=0.2, top_p=0.8, max_new_tokens=2000):
            ...

Every failure is a :class:`TokenServerError` subclass: :class:`RequestRejectedError` (4xx: the
server's message and per-field details), :class:`ServerBusyError` (503, with ``retry_after``),
:class:`ServerUnavailableError` (cannot connect, or no answer in time), :class:`StreamFailedError`
(the stream broke after it started: an error line from the server or a lost connection), and
:class:`ProtocolError` (an answer that is not the token server's wire format). Leaving the
iteration early (``break``, closing the generator, cancelling the task) closes the connection,
which frees the server's stream slot at its next decode step.

:class:`InProcessTokenClient` has :class:`AsyncTokenClient`'s interface over a token server in the
same process (``glm4voice.server.inprocess``, the one-process layout): same arguments, ids and errors.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import AbstractContextManager, aclosing, contextmanager
from typing import Any, Protocol

import httpx

from glm4voice.defaults import DEFAULT_SERVER_URL, WIRE_MAX_NEW_TOKENS, WIRE_TEMPERATURE, WIRE_TOP_P
from glm4voice.server.streaming import StreamBroken, StreamRefused
from glm4voice.server.wire import ErrorLine, WireFormatError, parse_line

DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=180.0, write=30.0, pool=30.0)
"""``read`` bounds the wait for each line, the first one included (the server's own queue
timeout, ``glm4voice.defaults.QUEUE_TIMEOUT_S`` by default, answers 503 well before that)."""
GENERATE_PATH = "/generate_stream"
HEALTH_PATH = "/health"
IN_PROCESS_URL = "in-process://engine"
"""What :attr:`InProcessTokenClient.base_url` says (messages name the model server by its URL)."""


class TokenServerError(Exception):
    """Base class of every client error."""


class RequestRejectedError(TokenServerError):
    """The server refused the request (HTTP 4xx) before streaming."""

    def __init__(self, status: int, text: str, detail: list[dict[str, Any]] | None = None):
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text
        self.detail = detail or []


class ServerBusyError(TokenServerError):
    """HTTP 503: every stream is busy and the queue is full (or the wait was too long)."""

    def __init__(self, text: str, retry_after: float | None):
        super().__init__(f"server busy: {text}" + (f" (retry after {retry_after:g} s)" if retry_after else ""))
        self.text = text
        self.retry_after = retry_after


class ServerUnavailableError(TokenServerError):
    """No connection to the server, or no answer in time."""


class StreamFailedError(TokenServerError):
    """The stream broke after it started (server error line, HTTP 500, lost connection)."""

    def __init__(self, text: str, tokens_received: int):
        super().__init__(f"stream failed after {tokens_received} tokens: {text}")
        self.text = text
        self.tokens_received = tokens_received


class ProtocolError(TokenServerError):
    """An answer that is not in the token server's wire format."""


def request_body(
    prompt: str | None = None,
    *,
    prompt_token_ids: list[int] | None = None,
    temperature: float = WIRE_TEMPERATURE,
    top_p: float = WIRE_TOP_P,
    max_new_tokens: int = WIRE_MAX_NEW_TOKENS,
    seed: int | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /generate_stream`` (exactly one of ``prompt`` / ``prompt_token_ids``);
    the defaults are the server's own (:mod:`glm4voice.defaults`)."""
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("give exactly one of prompt (text) and prompt_token_ids")
    body: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    if prompt_token_ids is None:
        body["prompt"] = prompt
    else:
        body["prompt_token_ids"] = [int(i) for i in prompt_token_ids]
    if seed is not None:
        body["seed"] = seed
    return body


def error_from_answer(status: int, headers: httpx.Headers, raw: bytes) -> TokenServerError:
    """The error a non-200 answer (``status``, its headers, its body) means (also used by the
    in-process client, ``glm4voice.server.inprocess``, on the same answers)."""
    text, detail = raw.decode("utf-8", errors="replace").strip()[:2000], None
    try:
        obj = json.loads(raw)
        if isinstance(obj, dict):
            text = str(obj.get("text") or obj.get("detail") or text)
            detail = obj.get("detail") if isinstance(obj.get("detail"), list) else None
    except ValueError:
        pass
    if status == 503:
        retry = headers.get("retry-after")
        return ServerBusyError(text, float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)
    if 400 <= status < 500:
        return RequestRejectedError(status, text, detail)
    if status >= 500:
        return StreamFailedError(f"HTTP {status}: {text}", 0)
    return ProtocolError(f"unexpected HTTP {status}: {text}")


def health_answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a ``/health`` answer, or the error it means (an answer that is not the
    server's JSON, e.g. a proxy's page: :class:`ProtocolError`)."""
    if response.status_code != 200:
        raise error_from_answer(response.status_code, response.headers, response.content)
    try:
        info = response.json()
    except ValueError:  # not JSON at all
        info = None
    if not isinstance(info, dict):
        raise ProtocolError(f"the /health answer is not the server's JSON: {response.text[:200]!r}")
    return info


class _LineReader:
    """Per-stream state: turns the answer's lines into token ids, or the right error."""

    def __init__(self) -> None:
        self.tokens = 0

    def token(self, line: str) -> int | None:
        if not line.strip():
            return None
        try:
            parsed = parse_line(line)
        except WireFormatError as error:
            raise ProtocolError(str(error)) from error
        if isinstance(parsed, ErrorLine):
            raise StreamFailedError(parsed.text, self.tokens)
        self.tokens += 1
        return parsed.token_id

    def lost(self, error: Exception) -> StreamFailedError:
        return StreamFailedError(f"connection lost ({type(error).__name__}: {error})", self.tokens)


class TokenClient:
    """Blocking client (``httpx.Client``); one instance can serve many threads."""

    def __init__(self, base_url: str = DEFAULT_SERVER_URL, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None):  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def stream(self, prompt: str | None = None, **params: Any) -> Iterator[int]:
        """Token ids as the server generates them (the stop token that ended the turn included).
        Keyword arguments: see :func:`request_body`."""
        body = request_body(prompt, **params)
        reader = _LineReader()
        with (
            _unavailable_on_transport_errors(self.base_url),
            self._http.stream("POST", GENERATE_PATH, json=body) as response,
        ):
            if response.status_code != 200:
                raise error_from_answer(response.status_code, response.headers, response.read())
            try:
                for line in response.iter_lines():
                    token = reader.token(line)
                    if token is not None:
                        yield token
            except (httpx.TransportError, httpx.StreamError) as error:
                raise reader.lost(error) from error

    def generate(self, prompt: str | None = None, **params: Any) -> list[int]:
        """The whole stream as a list."""
        return list(self.stream(prompt, **params))

    def health(self) -> dict[str, Any]:
        try:
            response = self._http.get(HEALTH_PATH)
        except httpx.TransportError as error:
            raise ServerUnavailableError(f"cannot reach {self.base_url}: {error}") from error
        return health_answer(response)

    def wait_until_ready(self, timeout: float, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll ``/health`` until it answers 200; ServerUnavailableError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except (ServerUnavailableError, ServerBusyError) as error:
                if time.monotonic() > deadline:
                    raise ServerUnavailableError(f"{self.base_url} not ready after {timeout:g} s: {error}") from error
            time.sleep(poll_s)


class AsyncTokenClient:
    """Asynchronous client (``httpx.AsyncClient``) for event-loop code (e.g. the web demo)."""

    def __init__(self, base_url: str = DEFAULT_SERVER_URL, *, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 256):  # fmt: skip
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport, limits=limits)

    async def __aenter__(self) -> AsyncTokenClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream(self, prompt: str | None = None, **params: Any) -> AsyncIterator[int]:
        """Async version of :meth:`TokenClient.stream` (use ``aclosing`` to stop early promptly)."""
        body = request_body(prompt, **params)
        reader = _LineReader()
        with _unavailable_on_transport_errors(self.base_url):
            async with self._http.stream("POST", GENERATE_PATH, json=body) as response:
                if response.status_code != 200:
                    raise error_from_answer(response.status_code, response.headers, await response.aread())
                try:
                    async for line in response.aiter_lines():
                        token = reader.token(line)
                        if token is not None:
                            yield token
                except (httpx.TransportError, httpx.StreamError) as error:
                    raise reader.lost(error) from error

    async def generate(self, prompt: str | None = None, **params: Any) -> list[int]:
        return [token async for token in self.stream(prompt, **params)]

    async def health(self) -> dict[str, Any]:
        try:
            response = await self._http.get(HEALTH_PATH)
        except httpx.TransportError as error:
            raise ServerUnavailableError(f"cannot reach {self.base_url}: {error}") from error
        return health_answer(response)


class InProcessServer(Protocol):
    """What :class:`InProcessTokenClient` needs (``glm4voice.server.inprocess.InProcessTokenServer``)."""

    def generate_stream(self, body: bytes) -> AsyncGenerator[int, None]: ...
    def health(self) -> Any: ...
    def make_way(self, starting_tokens: int = 0) -> AbstractContextManager[None]: ...


class InProcessTokenClient:
    """:class:`AsyncTokenClient`'s interface over a token server in this process (see
    ``glm4voice.server.inprocess``). Each request's body is encoded as the HTTP client encodes it and
    runs the server's own validation, admission and streaming code; a refusal is the same JSON answer,
    turned into an error by the same :func:`error_from_answer`: so it yields the same ids and raises
    the same :class:`TokenServerError` subclasses, with the same messages, as :class:`AsyncTokenClient`
    against ``model_server.py`` with the same settings. Leaving a stream early frees its slot."""

    def __init__(self, server: InProcessServer, base_url: str = IN_PROCESS_URL):
        self._server = server
        self.base_url = base_url

    async def __aenter__(self) -> InProcessTokenClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to close (the process owns the server); for :class:`AsyncTokenClient`'s interface."""

    async def stream(self, prompt: str | None = None, **params: Any) -> AsyncIterator[int]:
        """Token ids as the engine generates them (the stop token that ended the turn included).
        Keyword arguments: see :func:`request_body`."""
        body = _encode_json(request_body(prompt, **params))
        received = 0
        try:
            async with aclosing(self._server.generate_stream(body)) as tokens:
                async for token_id in tokens:
                    received += 1
                    yield token_id
        except StreamRefused as refused:
            raise _answer_error(refused.response) from None
        except StreamBroken as broken:
            raise StreamFailedError(broken.text, received) from None

    async def generate(self, prompt: str | None = None, **params: Any) -> list[int]:
        return [token async for token in self.stream(prompt, **params)]

    def make_way(self, starting_tokens: int = 0) -> AbstractContextManager[None]:
        """While in it, the engine starts no new step but those of requests with fewer than
        ``starting_tokens`` tokens (``Engine.make_way``; any thread). Only this client has it: an engine
        in another process cannot be asked."""
        return self._server.make_way(starting_tokens)

    async def health(self) -> dict[str, Any]:
        """``GET /health``'s body; the HTTP client's error when the server is not ready (503)."""
        response = self._server.health()
        if response.status_code != 200:
            raise _answer_error(response)
        return json.loads(response.body)


def _encode_json(body: dict[str, Any]) -> bytes:
    """``body`` as ``httpx`` encodes ``json=body`` (NaN and infinities raise ValueError before anything
    is sent, as there)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _answer_error(response: Any) -> TokenServerError:
    """The client error for a non-200 answer (a Starlette response): what the HTTP client makes of it."""
    return error_from_answer(response.status_code, httpx.Headers(list(response.headers.items())), response.body)


@contextmanager
def _unavailable_on_transport_errors(base_url: str) -> Iterator[None]:
    """Connection failures and timeouts outside a started stream mean the server is unavailable."""
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        raise ServerUnavailableError(f"cannot connect to {base_url}: {error}") from error
    except httpx.TimeoutException as error:
        raise ServerUnavailableError(f"{base_url} did not answer in time: {error}") from error
    except httpx.TransportError as error:
        raise ServerUnavailableError(f"{base_url}: {error}") from error
