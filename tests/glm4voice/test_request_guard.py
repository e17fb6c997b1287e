"""glm4voice.request_guard: the Host allow-list and the cross-site rules, as rules and on a real
loopback server (HTTP and WebSocket handshakes)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from glm4voice.request_guard import HostPolicy, RequestGuard, host_name, wildcard_notice
from glm4voice.serving import ConnectionLimits, build_server

from support import free_port

WAIT_S = 60.0
LOOPBACK = HostPolicy.for_server("127.0.0.1")


def refusal(policy: HostPolicy, method: str = "POST", kind: str = "http", **headers: str):
    return policy.refusal(kind, method, Headers({k.replace("_", "-"): v for k, v in headers.items()}))


@pytest.mark.parametrize(
    "value,name",
    [("localhost:10000", "localhost"), ("LOCALHOST.", "localhost"), ("[::1]:8888", "::1"), ("::1", "::1"),
     ("127.0.0.1", "127.0.0.1"), ("Voice.Example:443", "voice.example"), ("", None), ("a b", None),
     ("evil.example/x", None), ("user@evil.example", None), ("[::1", None)],
)  # fmt: skip
def test_host_names_are_normalized(value, name):
    assert host_name(value) == name


def test_the_policy_answers_to_loopback_the_bind_address_and_allowed_hosts():
    assert LOOPBACK.names == {"localhost", "127.0.0.1", "::1"}
    assert HostPolicy.for_server("0.0.0.0").names == LOOPBACK.names == HostPolicy.for_server("::").names
    assert "myhost.lan" in HostPolicy.for_server("myhost.lan").names
    policy = HostPolicy.for_server("127.0.0.1", ["voice.example", " Other.Example. "])
    assert {"voice.example", "other.example"} <= policy.names and not policy.any_host
    assert HostPolicy.for_server("127.0.0.1", ["*"]).any_host
    with pytest.raises(ValueError, match="not a host name"):
        HostPolicy.for_server("127.0.0.1", ["a b"])
    assert "--allowed-hosts" in wildcard_notice("0.0.0.0", HostPolicy.for_server("0.0.0.0"))
    assert wildcard_notice("0.0.0.0", HostPolicy.for_server("0.0.0.0", ["voice.example"])) is None
    assert wildcard_notice("127.0.0.1", LOOPBACK) is None


def test_hosts_other_than_the_servers_are_refused():
    for host in ("localhost:1", "127.0.0.1:1", "[::1]:1", None):
        assert refusal(LOOPBACK, "GET", **({"host": host} if host else {})) is None
    status, text = refusal(LOOPBACK, "GET", host="evil.example:80")
    assert status == 400 and "--allowed-hosts evil.example" in text
    assert refusal(HostPolicy.for_server("127.0.0.1", ["*"]), "GET", host="evil.example") is None


def test_cross_site_requests_are_refused_and_same_origin_ones_are_not():
    same = {"host": "127.0.0.1:8888"}
    assert refusal(LOOPBACK, origin="http://127.0.0.1:8888", **same) is None
    assert refusal(LOOPBACK, origin="http://localhost:3000", **same) is None  # a loopback page
    assert refusal(LOOPBACK, sec_fetch_site="same-origin", **same) is None
    assert refusal(LOOPBACK, "GET", sec_fetch_site="cross-site", **same) is None  # a link to the page
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"}, {"origin": "file://"},
                    {"sec_fetch_site": "cross-site"}, {"origin": "http://127.0.0.1:8888@evil.example"}):  # fmt: skip
        status, text = refusal(LOOPBACK, **headers, **same)
        assert status == 403 and "cross-site request refused" in text, headers
    assert refusal(LOOPBACK, "GET", origin="http://evil.example", **same)[0] == 403  # a cross-origin read
    assert refusal(LOOPBACK, "GET", kind="websocket", sec_fetch_site="cross-site", **same)[0] == 403
    proxied = HostPolicy.for_server("127.0.0.1", ["voice.example"])  # a proxy that rewrites Host
    assert refusal(proxied, origin="https://voice.example", host="127.0.0.1:8888") is None
    anything = HostPolicy.for_server("127.0.0.1", ["*"])  # '*' opens Host, not Origin
    assert refusal(anything, origin="https://voice.example", host="voice.example") is None
    assert refusal(anything, origin="https://evil.example", host="voice.example")[0] == 403
    assert refusal(anything, origin="https://voice.example:8443", host="voice.example")[0] == 403


def test_the_guard_on_a_real_server_covers_http_and_websocket_handshakes():
    async def echo(websocket):
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    async def hello(request):
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello, methods=["GET", "POST"]), WebSocketRoute("/ws", echo)])
    app.add_middleware(RequestGuard, policy=LOOPBACK)
    port = free_port()
    server = build_server(app, "127.0.0.1", port, ConnectionLimits(header_timeout_s=1.0), lifespan="off",
                          log_level="warning", timeout_graceful_shutdown=5)  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    url = f"127.0.0.1:{port}"
    try:
        assert httpx.post(f"http://{url}/", content="x").text == "hello"
        refused = httpx.post(f"http://{url}/", content="x", headers={"Origin": "http://evil.example"})
        assert refused.status_code == 403 and "cross-site request refused" in refused.text
        assert httpx.get(f"http://{url}/", headers={"Host": "evil.example"}).status_code == 400
        with connect(f"ws://{url}/ws", open_timeout=WAIT_S) as websocket:  # a script: no Origin
            websocket.send("hi")
            assert websocket.recv(timeout=WAIT_S) == "hi"
        with connect(f"ws://{url}/ws", origin=f"http://{url}", open_timeout=WAIT_S) as websocket:  # the page itself
            websocket.send("again")
            assert websocket.recv(timeout=WAIT_S) == "again"
        with pytest.raises(InvalidStatus) as caught:  # cross-site WebSocket hijacking
            connect(f"ws://{url}/ws", origin="http://evil.example", open_timeout=WAIT_S)
        assert caught.value.response.status_code == 403
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as rebound:  # DNS rebinding
            rebound.sendall(b"GET /ws HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
            assert rebound.recv(4096).startswith(b"HTTP/1.1 403 ")
        with connect(f"ws://{url}/ws", open_timeout=WAIT_S) as websocket:  # upgraded: no header timeout
            with socket.create_connection(("127.0.0.1", port)) as silent:  # opened after the WebSocket
                silent.settimeout(WAIT_S)
                assert silent.recv(10) == b""  # closed by the header timeout
            websocket.send("still here")
            assert websocket.recv(timeout=WAIT_S) == "still here"
    finally:
        server.request_exit()
        thread.join(WAIT_S)
