"""The real processes the browser tests drive: the token server (tests/openai_api/recording_server.py:
model_server.py that also records the prompt ids it is sent) and web_demo.py, on loopback ports, with the
tiny checkpoints on CPU."""

from __future__ import annotations

from openai_api.conftest import TokenServer
from support import ROOT, ServerProcess, free_port

SERVER_SLOTS = 2


class Stack:
    def __init__(self, server: ServerProcess, web: ServerProcess, server_url: str, web_url: str):
        self.server, self.web, self.server_url, self.web_url = server, web, server_url, web_url
        self.token_server = TokenServer(server_url)
        """Its recorded requests, metrics and health (tests/openai_api/conftest.py)."""

    def requests(self) -> list[dict]:
        """Every request the token server got since it (re)started: its prompt ids and the ids it streamed."""
        return self.token_server.requests()

    def wait_idle(self) -> dict:
        """Until no stream holds a slot of the token server (a closed stream frees its slot)."""
        return self.token_server.wait_idle()


def start_stack(checkpoints):
    """Start both processes (a generator: yields the :class:`Stack`, stops them when resumed)."""
    server_port, web_port = free_port(), free_port()
    server_url, web_url = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{web_port}/"
    server = ServerProcess(
        [str(ROOT / "tests/openai_api/recording_server.py"), "--host", "127.0.0.1", "--port", str(server_port),
         "--model-path", str(checkpoints.llm), "--device", "cpu", "--dtype", "float32", "--max-concurrent-streams",
         str(SERVER_SLOTS), "--max-queue", "0", "--max-seq-len", "4096", "--no-stop-tokens"],
        server_url + "/health",
    )  # fmt: skip
    web = ServerProcess(
        [str(ROOT / "web_demo.py"), "--host", "127.0.0.1", "--port", str(web_port), "--server-url", server_url,
         "--model-path", str(checkpoints.llm), "--tokenizer-path", str(checkpoints.speech_tokenizer),
         "--flow-path", str(checkpoints.decoder), "--device", "cpu", "--random-weights-notice"],
        web_url, timeout=240,
    )  # fmt: skip
    server.start()
    try:
        web.start()
        try:
            yield Stack(server, web, server_url, web_url)
        finally:
            web.stop()
    finally:
        server.stop()
