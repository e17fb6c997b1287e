"""Real servers on loopback for the OpenAI-compatible API tests: the token server (model_server.py with a
request recorder) and the web process (web_demo's app with fixed block cuts and a decoder counter), both
with the tiny checkpoints on CPU, started once per test session."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import ROOT, ServerProcess, free_port

TOKEN_SLOTS = 4
WAIT_S = 120.0
"""Deadline for conditions that must become true (never a speed check)."""


class TokenServer:
    def __init__(self, url: str):
        self.url = url

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def requests(self) -> list[dict]:
        """Every request so far: its prompt ids and the ids it streamed (tests/openai_api/recording_server.py)."""
        return httpx.get(self.url + "/test/requests", timeout=30).json()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                if sample.name + (f"{{{labels}}}" if labels else "") == name:
                    return sample.value
        return 0.0

    def cancelled(self) -> float:
        return self.metric("glm4voice_requests_total{outcome=cancelled}")

    def wait_idle(self) -> dict:
        """Until no stream holds a slot (a stream that was left is closed by the server)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            health = self.health()
            if (health["active_streams"], health["open_requests"], health["engine"]["active_streams"]) == (0, 0, 0):
                return health
            assert time.monotonic() < deadline, f"streams still open: {health}"
            time.sleep(0.05)


class WebServer:
    def __init__(self, url: str, process: ServerProcess):
        self.url = url
        self.process = process

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def decoder(self) -> dict:
        return httpx.get(self.url + "/test/decoder", timeout=30).json()


def token_server_args(checkpoints, port: int, *extra: str) -> list[str]:
    return [str(ROOT / "tests/openai_api/recording_server.py"), "--host", "127.0.0.1", "--port", str(port),
            "--model-path", str(checkpoints.llm), "--device", "cpu", "--dtype", "float32",
            "--max-concurrent-streams", str(TOKEN_SLOTS), "--max-queue", "0", "--max-seq-len", "4096", "--no-stop-tokens",
            *extra]  # fmt: skip


def web_server_args(checkpoints, port: int, server_url: str) -> list[str]:
    return [str(ROOT / "tests/openai_api/web_server.py"), "--host", "127.0.0.1", "--port", str(port),
            "--model-path", str(checkpoints.llm), "--tokenizer-path", str(checkpoints.speech_tokenizer),
            "--flow-path", str(checkpoints.decoder), "--server-url", server_url, "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="session")
def token_server(tiny_checkpoints):
    port = free_port()
    with ServerProcess(token_server_args(tiny_checkpoints, port), f"http://127.0.0.1:{port}/health"):
        yield TokenServer(f"http://127.0.0.1:{port}")


@pytest.fixture(scope="session")
def web(tiny_checkpoints, token_server):
    port = free_port()
    args = web_server_args(tiny_checkpoints, port, token_server.url)
    with ServerProcess(args, f"http://127.0.0.1:{port}/v1/models", timeout=300) as process:
        yield WebServer(f"http://127.0.0.1:{port}", process)


@pytest.fixture(scope="session")
def models(tiny_checkpoints):
    """The tiny models in the test process (the page's path, expected speech codes)."""
    from flow_inference import AudioDecoder
    from glm4voice.text_tokenizer import GLMTokenizer
    from speech_tokenizer import SpeechTokenizer

    class Models:
        text_tokenizer = GLMTokenizer.from_pretrained(tiny_checkpoints.llm)
        speech_tokenizer = SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device="cpu")
        decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu")

    return Models
