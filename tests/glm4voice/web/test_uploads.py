"""The upload guard in front of the page: per browser session, before anything reads a file."""

from __future__ import annotations

import asyncio
import json

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from glm4voice.web.uploads import (
    SESSION_COOKIE,
    UPLOAD_ROUTE,
    SessionUploads,
    UploadGuard,
    browser_session,
    named_files,
)


def test_each_session_may_use_its_own_uploads_and_the_shared_samples_only():
    uploads = SessionUploads()
    uploads.record("a", ["/tmp/gradio/1/q.wav", "relative.wav", "http://host/x.wav"])
    uploads.share(["/tmp/gradio/2/sample_en.wav"])
    assert uploads.allows("a", "/tmp/gradio/1/q.wav")
    assert uploads.allows("a", "/tmp/gradio/1/../1/./q.wav")  # the same path, spelled differently
    assert not uploads.allows("b", "/tmp/gradio/1/q.wav") and not uploads.allows(None, "/tmp/gradio/1/q.wav")
    assert uploads.allows("b", "/tmp/gradio/2/sample_en.wav") and uploads.allows(None, "/tmp/gradio/2/sample_en.wav")
    for path in ("relative.wav", "http://host/x.wav", "/etc/passwd", "/dev/zero", 42, None, "/tmp/a\x00b"):
        assert not uploads.allows("a", path), path


def test_the_record_is_bounded():
    uploads = SessionUploads(max_sessions=2, max_files_per_session=2)
    uploads.record("a", ["/u/1", "/u/2", "/u/3"])
    assert [uploads.allows("a", f"/u/{i}") for i in (1, 2, 3)] == [False, True, True]
    uploads.record("b", ["/u/b"])
    uploads.record("a", ["/u/4"])  # a is active again: b is now the least recently active
    uploads.record("c", ["/u/c"])
    assert not uploads.allows("b", "/u/b") and uploads.allows("a", "/u/4") and uploads.allows("c", "/u/c")


def test_named_files_finds_every_file_object_without_recursion():
    body = {"data": ["audio", {"path": "/a", "meta": {}}, [{"x": {"path": "/b"}}], {"path": 3}], "n": None}
    assert sorted(f["path"] for f in named_files(body)) == ["/a", "/b"]
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert list(named_files(deep)) == []


def guarded_app(uploads: SessionUploads) -> tuple[UploadGuard, list]:
    seen: list = []

    async def upload(request: Request):
        seen.append(browser_session(request))
        return JSONResponse(["/tmp/gradio/abc/question.wav"])

    async def call(request: Request):
        seen.append(browser_session(request))
        return JSONResponse({"body": (await request.body()).decode()})

    app = Starlette(routes=[Route(UPLOAD_ROUTE, upload, methods=["POST"]), Route("/call", call, methods=["POST"])])
    return UploadGuard(app, uploads=uploads, max_request_bytes=200_000), seen


def test_the_guard_ties_uploads_to_a_cookie_and_refuses_other_files():
    uploads = SessionUploads()
    guard, seen = guarded_app(uploads)

    async def scenario():
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://page") as client:
            uploaded = await client.post(UPLOAD_ROUTE, files={"files": ("q.wav", b"RIFF", "audio/wav")})
            session = client.cookies.get(SESSION_COOKIE)
            own = {"data": [{"path": "/tmp/gradio/abc/question.wav", "meta": {"_type": "gradio.FileData"}}]}
            allowed = await client.post("/call", json=own)
            refused = [
                await client.post("/call", json={"data": [{"path": path}]})
                for path in ("/etc/passwd", "/dev/zero", "question.wav", "http://localhost/x.wav")
            ]
            deep = await client.post("/call", content=b"[" * 50_000 + b"]" * 50_000)
            large = await client.post("/call", content=b" " * 200_001)
            plain = await client.post("/call", content=b"not json")
        async with httpx.AsyncClient(transport=transport, base_url="http://page") as stranger:
            theirs = await stranger.post("/call", json=own)
        return uploaded, session, allowed, refused, deep, large, plain, theirs

    uploaded, session, allowed, refused, deep, large, plain, theirs = asyncio.run(scenario())
    assert uploaded.status_code == 200 and session and SESSION_COOKIE in uploaded.headers["set-cookie"]
    assert "HttpOnly" in uploaded.headers["set-cookie"]
    assert uploads.allows(session, "/tmp/gradio/abc/question.wav")
    assert allowed.status_code == 200 and json.loads(allowed.json()["body"])["data"][0]["path"].endswith("question.wav")
    for response in (*refused, theirs):
        assert response.status_code == 403 and "did not upload" in response.json()["detail"]
        assert "/etc" not in response.text and "/tmp" not in response.text
    assert deep.status_code == 400 and large.status_code == 413
    assert plain.status_code == 200 and plain.json()["body"] == "not json"
    assert seen[0] == seen[1] == session  # the handlers see the session, the first request included


def test_the_apps_own_routes_pass_the_guard_untouched():
    """The OpenAI-compatible API and the turn streams take no Gradio file objects: their bodies (a
    spoken question in base64 can be megabytes) are neither read nor checked, and get no cookie."""

    async def api(request: Request):
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(
        routes=[Route("/v1/chat/completions", api, methods=["POST"]), Route("/call", api, methods=["POST"])]
    )
    guard = UploadGuard(app, uploads=SessionUploads(), max_request_bytes=1000, own_routes=("/v1/",))

    async def scenario():
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://page") as client:
            big = json.dumps({"messages": [{"path": "/etc/passwd"}], "audio": "A" * 5000})
            return await client.post("/v1/chat/completions", content=big), await client.post("/call", content=big)

    own, page = asyncio.run(scenario())
    assert own.status_code == 200 and own.json()["bytes"] > 5000 and "set-cookie" not in own.headers
    assert page.status_code == 413
