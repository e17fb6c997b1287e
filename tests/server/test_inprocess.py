"""The in-process token client against the HTTP one: the same requests, run against two token servers
with the same settings around the same kind of scripted backend, one served by uvicorn on a loopback
port (``AsyncTokenClient``), one in process (``InProcessTokenClient``), must give the same token ids,
the same errors with the same messages, the same admission and back-pressure, and the same
bookkeeping (slots freed, outcomes counted)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from glm4voice.client import (
    IN_PROCESS_URL,
    AsyncTokenClient,
    InProcessTokenClient,
    ServerBusyError,
    StreamFailedError,
    TokenServerError,
)
from glm4voice.server.app import create_app
from glm4voice.server.inprocess import InProcessTokenServer
from glm4voice.server.metrics import Outcome
from glm4voice.server.settings import ServerSettings
from glm4voice.server.streaming import EngineRejected
from glm4voice.serving import ConnectionLimits, build_server

from support import free_port, until

WAIT_S = 60.0
"""Deadline for a condition that must become true (never a speed check)."""
QUEUE_TIMEOUT_S = 3.0
"""How long a request waits for a slot in the back-pressure test: far longer than one loopback request."""
REJECT_BUSY_SEED = 11
REJECT_BAD_SEED = 12
FAIL_AT_START_SEED = 13
FAIL_AFTER_SEED = 14
FAIL_AFTER_TOKENS = 3
EMPTY_SEED = 15
HOLD_SEED = 16
HOLD_AFTER_TOKENS = 2
MAX_PROMPT_TOKENS = 64


class ContractStream:
    """Deterministic ids from the prompt; failures, holds and empty answers chosen by the seed."""

    def __init__(self, backend: ContractBackend, prompt_ids: list[int], length: int, seed: int):
        self.backend, self.length, self.seed = backend, length, seed
        self.base = sum(prompt_ids) % 997
        self.position = 0
        self.cancelled = asyncio.Event()

    def __aiter__(self) -> ContractStream:
        return self

    async def __anext__(self) -> int:
        await asyncio.sleep(0)  # one token per turn of the event loop, as an engine step
        if self.seed == FAIL_AT_START_SEED or (self.seed == FAIL_AFTER_SEED and self.position == FAIL_AFTER_TOKENS):
            raise RuntimeError("injected engine fault (test)")
        if self.seed == HOLD_SEED and self.position == HOLD_AFTER_TOKENS:
            release = asyncio.create_task(self.backend.release.wait())
            cancel = asyncio.create_task(self.cancelled.wait())
            await asyncio.wait({release, cancel}, return_when=asyncio.FIRST_COMPLETED)
            release.cancel()
            cancel.cancel()
        if self.cancelled.is_set() or self.position >= self.length or self.seed == EMPTY_SEED:
            raise StopAsyncIteration
        self.position += 1
        return self.base + 7 * self.position

    def cancel(self) -> None:
        self.cancelled.set()
        self.backend.cancelled += 1


class ContractBackend:
    """A :class:`glm4voice.server.backend.TokenBackend` without a model."""

    is_token_backend = True

    def __init__(self, folder: Path):
        self.checkpoint_folder = folder
        self.vocab_size = json.loads((folder / "config.json").read_text())["padded_vocab_size"]
        self.release = asyncio.Event()
        self.cancelled = 0
        self.failure_callbacks = []

    async def start(self) -> None:
        self.release = asyncio.Event()

    async def stop(self) -> None:
        self.release.set()

    def stats(self) -> dict[str, float]:
        return {"running": 1.0}

    def add_failure_callback(self, callback) -> None:
        self.failure_callbacks.append(callback)

    def submit(self, prompt_ids, request) -> ContractStream:
        if request.seed == REJECT_BUSY_SEED:
            raise EngineRejected(503, "the engine queue is full: test; retry later", retry_after=True)
        if request.seed == REJECT_BAD_SEED:
            raise EngineRejected(422, "invalid request: refused by the test engine")
        return ContractStream(self, list(prompt_ids), request.max_new_tokens, request.seed or 0)


def settings(**fields) -> ServerSettings:
    base = ServerSettings(host="127.0.0.1", port=free_port(), model_path="unused", device="cpu", dtype="float32",
                          max_concurrent_streams=4, max_queue=4, max_seq_len=256,
                          max_prompt_tokens=MAX_PROMPT_TOKENS, max_new_tokens_cap=1000, log_level="warning")  # fmt: skip
    return replace(base, **fields)


class Side:
    """One token server and its client: ``http`` (uvicorn on a loopback port) or ``inprocess``."""

    def __init__(self, kind, client, state, backend):
        self.kind, self.client, self.state, self.backend = kind, client, state, backend

    def outcomes(self) -> dict[str, float]:
        return {o.value: self.state.metrics.requests.labels(o.value)._value.get() for o in Outcome}


@asynccontextmanager
async def http_side(folder: Path, text_tokenizer, config: ServerSettings):
    backend = ContractBackend(folder)
    app = create_app(backend, config, text_tokenizer)
    state = app.state.server
    server = build_server(app, config.host, config.port, ConnectionLimits(), before_shutdown=state.begin_shutdown,
                          lifespan="on", log_level="warning", timeout_graceful_shutdown=5)  # fmt: skip
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started or task.done())
    assert server.started, "the HTTP token server did not start"
    client = AsyncTokenClient(f"http://{config.host}:{config.port}")
    try:
        yield Side("http", client, state, backend), server.request_exit
    finally:
        await client.aclose()
        server.request_exit()
        await asyncio.wait_for(task, WAIT_S)


@asynccontextmanager
async def inprocess_side(folder: Path, text_tokenizer, config: ServerSettings):
    backend = ContractBackend(folder)
    tokens = InProcessTokenServer(backend, config, text_tokenizer)
    async with tokens.running(), InProcessTokenClient(tokens) as client:
        # stopping: what leaving `running()` does first (as uvicorn's shutdown does for the HTTP side)
        yield Side("inprocess", client, tokens.state, backend), tokens.begin_shutdown


async def outcome(client, *args, **params) -> tuple:
    """What a caller sees: the ids, or the error's type, message and fields (and the ids before it)."""
    tokens: list[int] = []
    try:
        async for token in client.stream(*args, **params):
            tokens.append(token)
    except TokenServerError as error:
        fields = {k: getattr(error, k) for k in ("status", "text", "detail", "retry_after", "tokens_received")
                  if hasattr(error, k)}  # fmt: skip
        return type(error).__name__, str(error), fields, tokens
    except ValueError as error:
        return "ValueError", str(error), {}, tokens
    return "ok", tokens


REQUESTS = [
    ("ids", (), dict(prompt_token_ids=[1, 2, 3], max_new_tokens=5, seed=1)),
    ("text prompt", ("hello <|user|>",), dict(max_new_tokens=4, temperature=0.2, top_p=0.8)),
    ("greedy, long answer", (), dict(prompt_token_ids=[9] * 10, max_new_tokens=100, temperature=0)),
    ("bad temperature", (), dict(prompt_token_ids=[1], temperature=-0.5)),
    ("bad top_p", (), dict(prompt_token_ids=[1], top_p=0.0)),
    ("over the cap", (), dict(prompt_token_ids=[1], max_new_tokens=1001)),
    ("bad seed", (), dict(prompt_token_ids=[1], seed=-3)),
    ("id outside the vocabulary", (), dict(prompt_token_ids=[1, 10**9])),
    ("prompt too long", (), dict(prompt_token_ids=[1] * (MAX_PROMPT_TOKENS + 1))),
    ("empty prompt", (), dict(prompt_token_ids=[])),
    ("body too large", (), dict(prompt_token_ids=[123456] * 200_000)),
    ("two prompts", ("hi",), dict(prompt_token_ids=[1])),
    ("NaN", (), dict(prompt_token_ids=[1], temperature=float("nan"))),
    ("engine busy", (), dict(prompt_token_ids=[1], seed=REJECT_BUSY_SEED)),
    ("engine refuses", (), dict(prompt_token_ids=[1], seed=REJECT_BAD_SEED)),
    ("fails at start", (), dict(prompt_token_ids=[1], seed=FAIL_AT_START_SEED, max_new_tokens=10)),
    ("fails after 3 tokens", (), dict(prompt_token_ids=[1], seed=FAIL_AFTER_SEED, max_new_tokens=10)),
    ("no tokens", (), dict(prompt_token_ids=[1], seed=EMPTY_SEED)),
]


def test_every_answer_and_error_is_the_same_in_process_and_over_http(tiny_checkpoints, text_tokenizer):
    async def scenario():
        config = settings()
        results = {}
        for side_of in (http_side, inprocess_side):
            async with side_of(tiny_checkpoints.llm, text_tokenizer, config) as (side, _):
                results[side.kind] = [await outcome(side.client, *args, **params) for _, args, params in REQUESTS]
                await until(lambda: side.state.admission.active == 0 and not side.state.jobs)
                results[side.kind].append(side.outcomes())
                results[side.kind].append(await side.client.health())
        return results

    results = asyncio.run(scenario())
    http, inprocess = results["http"], results["inprocess"]
    for (name, _, _), a, b in zip(REQUESTS, http, inprocess):
        assert a == b, f"{name}: HTTP {a} != in-process {b}"
    assert http[-2:] == inprocess[-2:]  # outcome counters, /health's body
    seen = dict(zip([name for name, _, _ in REQUESTS], inprocess))
    # and what they are (both could be wrong in the same way)
    assert seen["ids"] == ("ok", [6 + 7 * k for k in range(1, 6)])
    assert seen["greedy, long answer"][0] == "ok" and len(seen["greedy, long answer"][1]) == 100
    kind, message, fields, _ = seen["bad temperature"]
    assert kind == "RequestRejectedError" and fields["status"] == 422 and fields["detail"][0]["field"] == "temperature"
    assert seen["over the cap"][2]["status"] == 422 and "at most 1000" in seen["over the cap"][1]
    assert seen["prompt too long"][2]["status"] == 413
    assert seen["body too large"][2]["status"] == 413 and "bytes" in seen["body too large"][1]
    assert seen["two prompts"][0] == seen["NaN"][0] == "ValueError"
    assert seen["engine busy"][0] == "ServerBusyError" and seen["engine busy"][2]["retry_after"] == 2
    assert seen["engine refuses"][2]["status"] == 422
    kind, message, fields, tokens = seen["fails at start"]
    assert kind == "StreamFailedError" and fields["tokens_received"] == 0 and "HTTP 500: engine error" in message
    kind, message, fields, tokens = seen["fails after 3 tokens"]
    assert kind == "StreamFailedError" and fields["tokens_received"] == FAIL_AFTER_TOKENS == len(tokens)
    assert "injected engine fault" in fields["text"]
    assert seen["no tokens"] == ("ok", [])
    counts, health = inprocess[-2:]
    assert counts[Outcome.ENGINE_ERROR.value] == 2 and counts[Outcome.BUSY.value] == 1
    assert health["status"] == "ready" and health["active_streams"] == 0 and health["max_queue"] == 4


def test_admission_back_pressure_and_cancellation_are_the_same(tiny_checkpoints, text_tokenizer):
    """One slot, one place in the queue: a held stream, one waiting (it times out), one refused at
    once; leaving the held stream early frees its slot (the engine stream is cancelled), and the
    next request is served."""

    async def scenario(side_of) -> tuple:
        # the refused request must reach the server while the waiting one still waits (an HTTP round trip took
        # 30-60 ms beside 4 busy loops: the 0.5 s this test had was a margin of 10)
        config = settings(max_concurrent_streams=1, max_queue=1, queue_timeout_s=QUEUE_TIMEOUT_S)
        async with side_of(tiny_checkpoints.llm, text_tokenizer, config) as (side, _):
            client, state = side.client, side.state
            held = client.stream(prompt_token_ids=[5], seed=HOLD_SEED, max_new_tokens=50)
            first = [await anext(held), await anext(held)]
            assert state.admission.active == 1
            waiting = asyncio.create_task(outcome(client, prompt_token_ids=[6], max_new_tokens=3))
            await until(lambda: state.admission.waiting == 1)
            refused = await outcome(client, prompt_token_ids=[7], max_new_tokens=3)
            timed_out = await waiting
            await held.aclose()  # the caller leaves early: its slot and the engine stream are freed
            await until(lambda: state.admission.active == 0 and side.backend.cancelled == 1 and not state.jobs)
            served = await outcome(client, prompt_token_ids=[8], max_new_tokens=3)
            return first, refused, timed_out, served, side.outcomes()

    async def both():
        return await scenario(http_side), await scenario(inprocess_side)

    http, inprocess = asyncio.run(both())
    assert http == inprocess
    first, refused, timed_out, served, counts = inprocess
    assert first == [5 + 7, 5 + 14]
    assert refused[0] == "ServerBusyError" and refused[2]["retry_after"] == 2
    assert "all 1 streams are busy and 1 requests are waiting; retry later" in refused[1]
    assert (
        timed_out[0] == "ServerBusyError" and f"no stream slot became free within {QUEUE_TIMEOUT_S:g} s" in timed_out[1]
    )
    assert served == ("ok", [8 + 7, 8 + 14, 8 + 21])
    assert counts[Outcome.CANCELLED.value] == 1 and counts[Outcome.BUSY.value] == 2
    assert counts[Outcome.COMPLETED.value] == 1


def test_shutdown_ends_an_open_stream_with_the_same_error(tiny_checkpoints, text_tokenizer):
    async def scenario(side_of):
        config = settings()
        async with side_of(tiny_checkpoints.llm, text_tokenizer, config) as (side, stop):
            result = asyncio.create_task(outcome(side.client, prompt_token_ids=[5], seed=HOLD_SEED, max_new_tokens=50))
            await until(lambda: side.state.admission.active == 1 and side.backend.cancelled == 0 and side.state.jobs
                        and next(iter(side.state.jobs)).tokens_sent == HOLD_AFTER_TOKENS)  # fmt: skip
            stop()  # as on SIGTERM
            value = await result
            after = await outcome(side.client, prompt_token_ids=[1]) if side.kind == "inprocess" else None
            return value, after

    async def both():
        return await scenario(http_side), await scenario(inprocess_side)

    (http, _), (inprocess, after) = asyncio.run(both())
    assert http == inprocess
    kind, message, fields, tokens = inprocess
    assert kind == "StreamFailedError" and len(tokens) == HOLD_AFTER_TOKENS
    assert fields["text"] == f"the server is shutting down; generation stopped after {HOLD_AFTER_TOKENS} tokens"
    assert after[0] == "ServerBusyError" and "the server is shutting down" in after[1]


def test_a_dead_engine_stops_the_in_process_server_and_says_why(tiny_checkpoints, text_tokenizer):
    """The engine's worker dies: open streams end with its reason, new requests and /health answer
    503 with it, and the owner's callback runs (the one-process command then exits non-zero)."""

    async def scenario():
        backend = ContractBackend(tiny_checkpoints.llm)
        tokens = InProcessTokenServer(backend, settings(), text_tokenizer)
        stopped = []
        tokens.on_engine_failure(lambda: stopped.append(True))
        async with tokens.running():
            client = InProcessTokenClient(tokens)
            assert client.base_url == IN_PROCESS_URL
            result = asyncio.create_task(outcome(client, prompt_token_ids=[5], seed=HOLD_SEED, max_new_tokens=50))
            await until(lambda: tokens.state.jobs and next(iter(tokens.state.jobs)).tokens_sent == HOLD_AFTER_TOKENS)
            for callback in backend.failure_callbacks:
                callback(RuntimeError("boom"))
            open_stream = await result
            refused = await outcome(client, prompt_token_ids=[1])
            with pytest.raises(ServerBusyError) as unhealthy:
                await client.health()
            return open_stream, refused, unhealthy.value, stopped, tokens.failure

    open_stream, refused, unhealthy, stopped, failure = asyncio.run(scenario())
    reason = "the engine failed (RuntimeError: boom); the server is exiting"
    assert open_stream[0] == StreamFailedError.__name__ and open_stream[2]["text"].startswith(reason)
    assert refused[0] == "ServerBusyError" and reason in refused[1]
    assert '"status": "engine failed"' in unhealthy.text
    assert stopped == [True] and isinstance(failure, RuntimeError)
