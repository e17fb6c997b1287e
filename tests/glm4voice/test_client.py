"""The token clients against a real loopback HTTP server that is not the token server (a proxy's page)."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glm4voice.client import AsyncTokenClient, ProtocolError, TokenClient


class ProxyPage(BaseHTTPRequestHandler):
    """Answers every GET with 200 and an HTML page (what a proxy in front of a stopped server may send)."""

    def do_GET(self) -> None:
        body = b"<html><body>Service temporarily unavailable</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def proxy_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ProxyPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_health_answer_that_is_not_the_servers_json_is_a_protocol_error(proxy_url):
    with TokenClient(proxy_url) as client, pytest.raises(ProtocolError, match="not the server's JSON.*Service"):
        client.health()

    async def main():
        async with AsyncTokenClient(proxy_url) as client:
            await client.health()

    with pytest.raises(ProtocolError, match="not the server's JSON.*Service"):
        asyncio.run(main())
