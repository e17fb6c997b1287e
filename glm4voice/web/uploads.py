"""Which files a request to the page may name: only those its own browser session uploaded.

Gradio's HTTP API takes a file input as a JSON object ``{"path": ..., "meta": {"_type":
"gradio.FileData"}}``, and before a handler runs it copies (or downloads) whatever that ``path``
names into its cache. The page only ever needs files that the person's own browser uploaded or
recorded (both go through ``POST /gradio_api/upload``) and the sample prompts, so every other
path is refused before Gradio reads, copies, stats or fetches anything:

1. :class:`UploadGuard` (ASGI middleware around the whole app) gives each browser a random session
   cookie (:data:`SESSION_COOKIE`, HttpOnly), records under it the paths that the upload route
   answers with (:class:`SessionUploads`), and answers HTTP 403 to any other request whose JSON
   body names a file that is neither one of this browser session's uploads nor a sample prompt
   (a server path, a URL, a relative path, another session's upload). The refusal names no path.
2. Gradio's own "only files in the upload folder" check, which Gradio skips for an app that was
   mounted rather than launched: :func:`guard_uploads` turns it on.

Scripts use the same flow as the page: one HTTP client that keeps cookies (``httpx.Client``,
``requests.Session``, ``gradio_client.Client``) uploads the file, then names the returned path.
A browser's uploads are shared by its tabs (the cookie is the browser's).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from http.cookies import CookieError, SimpleCookie
from typing import Any

import gradio as gr
from gradio.route_utils import API_PREFIX
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

SESSION_COOKIE = "glm4voice_session"
"""The browser session's cookie (random, HttpOnly, SameSite=Lax)."""
UPLOAD_ROUTE = f"{API_PREFIX}/upload"
MAX_REQUEST_BYTES = 1 << 20
"""Largest body of a request other than an upload (a turn's inputs are a few kB; files are uploaded)."""
MAX_SESSIONS = 10_000
"""Browser sessions whose uploads are remembered (the least recently active are forgotten first)."""
MAX_FILES_PER_SESSION = 64
"""Uploads remembered per browser session (the oldest are forgotten first)."""
REFUSED_FILE = (
    "This request names a file that this browser session did not upload. Upload or record it first "
    f"(POST {UPLOAD_ROUTE}, keeping the session cookie that the page sets), then name the path that the "
    "upload answered with."
)
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


class SessionUploads:
    """The files each browser session uploaded, and the files every session may use (the samples).

    Plain data owned by the app; bounded (:data:`MAX_SESSIONS`, :data:`MAX_FILES_PER_SESSION`).
    Paths are compared as normalised absolute strings: nothing here touches the file system.
    """

    def __init__(self, max_sessions: int = MAX_SESSIONS, max_files_per_session: int = MAX_FILES_PER_SESSION):
        self.max_sessions = max_sessions
        self.max_files_per_session = max_files_per_session
        self._uploads: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self._shared: set[str] = set()

    def record(self, session: str, paths: Iterable[str]) -> None:
        """``session`` uploaded ``paths``."""
        owned = self._uploads.pop(session, None) or OrderedDict()
        self._uploads[session] = owned  # most recently active last
        for path in paths:
            key = _normalised(path)
            if key is None:
                continue
            owned.pop(key, None)
            owned[key] = None
            while len(owned) > self.max_files_per_session:
                owned.popitem(last=False)
        while len(self._uploads) > self.max_sessions:
            self._uploads.popitem(last=False)

    def share(self, paths: Iterable[str]) -> None:
        """Every session may use ``paths`` (the page's sample prompts)."""
        self._shared.update(key for key in map(_normalised, paths) if key is not None)

    def allows(self, session: str | None, path: object) -> bool:
        key = _normalised(path)
        if key is None:
            return False
        return key in self._shared or (session is not None and key in self._uploads.get(session, ()))


def _normalised(path: object) -> str | None:
    """An absolute path as a normalised string; None for anything else (relative paths, URLs)."""
    if not isinstance(path, str) or "\x00" in path or not os.path.isabs(path):
        return None
    return os.path.normpath(path)


def browser_session(request: Any) -> str | None:
    """The browser session of a request (a ``gr.Request`` or a Starlette request), as set by :class:`UploadGuard`."""
    if request is None:
        return None
    cookies = getattr(request, "cookies", None) or {}
    value = cookies.get(SESSION_COOKIE)
    return value if isinstance(value, str) and _SESSION_ID.match(value) else None


def named_files(value: Any) -> Iterator[dict]:
    """Every JSON object with a string ``path`` in ``value`` (what Gradio treats as a file), depth-first
    without recursion (a deeply nested body cannot exhaust the stack)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("path"), str):
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class UploadGuard:
    """ASGI middleware: the browser-session cookie, the record of uploads, and the refusal of every
    request body that names a file its session may not use (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        uploads: SessionUploads,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        own_routes: tuple[str, ...] = (),
    ):
        self.app = app
        self.uploads = uploads
        self.max_request_bytes = max_request_bytes
        self.own_routes = own_routes
        """Path prefixes of routes that are not Gradio's (they take no Gradio file objects)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route(scope).startswith(self.own_routes):
            await self.app(scope, receive, send)
            return
        session = _session_from_headers(scope)
        if session is None:
            session = secrets.token_urlsafe(32)
            scope = _with_cookie(scope, session)
            send = _setting_cookie(send, session)
        if _route(scope) == UPLOAD_ROUTE:
            await self.app(scope, receive, self._recording_uploads(send, session))
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive, self.max_request_bytes)
        if body is None:
            await _refuse(scope, send, 413, f"The request body is larger than {self.max_request_bytes} bytes.")
            return
        problem = self._problem(body, session)
        if problem is not None:
            await _refuse(scope, send, *problem)
            return
        await self.app(scope, _replaying(body, receive), send)

    def _problem(self, body: bytes, session: str) -> tuple[int, str] | None:
        if not body:
            return None
        try:
            data = json.loads(body)
        except RecursionError:
            return 400, "The request body is nested too deeply."
        except ValueError:
            return None  # not JSON: nothing behind this guard parses it as JSON either
        for file in named_files(data):
            if not self.uploads.allows(session, file["path"]):
                logger.warning("refused a request naming a file its browser session did not upload")
                return 403, REFUSED_FILE
        return None

    def _recording_uploads(self, send: Send, session: str) -> Send:
        """``send`` of the upload route: its answer (the list of stored paths) is recorded under
        ``session`` before the client gets it, so the client can never name a path not yet recorded."""
        start: Message | None = None
        chunks: list[bytes] = []

        async def recording_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                if message["status"] != 200:
                    await send(message)
                return
            if message["type"] != "http.response.body" or start is None or start["status"] != 200:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            try:
                paths = json.loads(body)
            except ValueError:
                paths = []
            if isinstance(paths, list):
                self.uploads.record(session, (p for p in paths if isinstance(p, str)))
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return recording_send


def guard_uploads(app: Any, demo: gr.Blocks, uploads: SessionUploads, own_routes: tuple[str, ...] = ()) -> None:
    """Install both layers on ``app`` (the FastAPI app that ``demo`` is mounted in). Requests under
    ``own_routes`` (path prefixes of the app's routes that are not the page's) pass untouched."""
    # Gradio runs its own upload-folder check only for Blocks that ran launch(): a mounted page
    # never did, so its handlers would get any path at all. The flag enables nothing else.
    demo.has_launched = True
    app.add_middleware(UploadGuard, uploads=uploads, own_routes=own_routes)


# --- ASGI plumbing ---------------------------------------------------------------------------------------


def _route(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _session_from_headers(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            cookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except CookieError:  # a malformed cookie header: treated as no session
                continue
            morsel = cookie.get(SESSION_COOKIE)
            if morsel is not None and _SESSION_ID.match(morsel.value):
                return morsel.value
    return None


def _with_cookie(scope: Scope, session: str) -> Scope:
    """The request as if it had carried the new session cookie (the handlers read it from there)."""
    headers = [(n, v) for n, v in scope.get("headers", ()) if n != b"cookie"]
    others = [v for n, v in scope.get("headers", ()) if n == b"cookie"]
    cookie = b"; ".join([*others, f"{SESSION_COOKIE}={session}".encode()])
    return {**scope, "headers": [*headers, (b"cookie", cookie)]}


def _setting_cookie(send: Send, session: str) -> Send:
    header = f"{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax".encode()

    async def cookie_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"set-cookie", header)]}
        await send(message)

    return cookie_send


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None if it is larger than ``limit``."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app behind the guard: the body read already, then the client's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await JSONResponse({"detail": message, "error": message}, status_code=status)(scope, no_body, send)
