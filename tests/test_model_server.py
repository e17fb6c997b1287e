"""System tests of model_server.py: a real uvicorn server process with the tiny checkpoint on CPU,
driven by curl, requests (the original web demo's code path), httpx and our clients."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from glm4voice.client import (
    AsyncTokenClient,
    RequestRejectedError,
    ServerBusyError,
    ServerUnavailableError,
    StreamFailedError,
    TokenClient,
)
from glm4voice.defaults import ENGINE_FAILED_EXIT_CODE
from glm4voice.protocol import SpecialTokens, TextInput, render_prompt_text

import hostile_clients
from server.fault_server import FAIL_AFTER_SEED, FAIL_AFTER_TOKENS, FAIL_AT_START_SEED, KILL_ENGINE_SEED
from support import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow

MAX_PROMPT_TOKENS = 384
MAX_NEW_TOKENS_CAP = 2000
MAIN_SLOTS = 16
FAULT_SLOTS = 2
FAULT_QUEUE_TIMEOUT_S = 3
FAULT_NEW_TOKENS_CAP = 8000
"""Streams that only a disconnect ends in the time of a test."""
WAIT_S = 60.0
"""Generous deadline for conditions that must become true (never a speed assertion)."""
TOKEN_LINE = re.compile(rb'^\{"token_id": (\d+), "error_code": 0\}$')


class Server:
    def __init__(self, process: ServerProcess, url: str):
        self.process = process
        self.url = url

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def health(self) -> dict:
        response = httpx.get(self.url + "/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return values

    def wait_idle(self) -> dict:
        """Until no stream holds a slot or waits, in the server and in the engine."""
        deadline = time.monotonic() + WAIT_S
        while True:
            health = self.health()
            engine = health["engine"]
            counts = (
                health["active_streams"],
                health["queue_length"],
                health["open_requests"],
                engine["active_streams"],
                engine["queued"],
            )
            if counts == (0, 0, 0, 0, 0):
                return health
            assert time.monotonic() < deadline, f"streams still active: {health}"
            time.sleep(0.05)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def _server_args(script: str, checkpoint: Path, port: int, *extra: str) -> list[str]:
    return [str(ROOT / script), "--host", "127.0.0.1", "--port", str(port), "--model-path", str(checkpoint),
            "--device", "cpu", "--dtype", "float32", "--max-new-tokens-cap", str(MAX_NEW_TOKENS_CAP), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    port = free_port()
    args = _server_args("model_server.py", tiny_checkpoints.llm, port, "--max-concurrent-streams", str(MAIN_SLOTS),
                        "--max-queue", "64", "--max-seq-len", "512", "--max-prompt-tokens", str(MAX_PROMPT_TOKENS))  # fmt: skip
    with ServerProcess(args, f"http://127.0.0.1:{port}/health") as process:
        yield Server(process, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def fault_server(tiny_checkpoints):
    """Small limits (2 streams, 1 waiting, a short queue timeout) and injected engine failures."""
    port = free_port()
    args = _server_args("tests/server/fault_server.py", tiny_checkpoints.llm, port, "--max-concurrent-streams",
                        str(FAULT_SLOTS), "--max-queue", "1", "--queue-timeout", str(FAULT_QUEUE_TIMEOUT_S), "--max-seq-len", "8192",
                        "--max-new-tokens-cap", str(FAULT_NEW_TOKENS_CAP))  # fmt: skip
    with ServerProcess(args, f"http://127.0.0.1:{port}/health") as process:
        yield Server(process, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def stop_ids(special_tokens: SpecialTokens) -> frozenset[int]:
    return special_tokens.stop_ids


def text_prompt(text: str) -> str:
    return render_prompt_text("", TextInput(text))


def assert_complete(ids: list[int], max_new_tokens: int, stop_ids: frozenset[int]) -> None:
    """A finished stream: max_new_tokens ids, or fewer ending with (only) a stop id."""
    assert ids, "empty stream"
    assert not stop_ids & set(ids[:-1]), f"a stop id inside the stream: {ids}"
    assert len(ids) == max_new_tokens or (len(ids) < max_new_tokens and ids[-1] in stop_ids), ids


@contextmanager
def health_monitor(server: Server, poll_s: float = 0.25):
    """Poll /health in a thread during the block; every answer must be 200."""
    answers: list[object] = []
    done = threading.Event()

    def poll():
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                try:
                    answers.append(client.get(server.url + "/health").status_code)
                except httpx.HTTPError as error:
                    answers.append(repr(error))
                done.wait(poll_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        done.set()
        thread.join(timeout=30)
    assert answers and all(a == 200 for a in answers), f"/health did not always answer 200: {answers}"


# --- the original's interface ---------------------------------------------------------------------


def test_health_reports_ready(server):
    health = server.health()
    assert health["status"] == "ready"
    assert health["device"] == "cpu" and health["dtype"] == "float32" and health["weights"] == "float32"
    assert health["max_concurrent_streams"] == MAIN_SLOTS
    assert health["max_prompt_tokens"] == MAX_PROMPT_TOKENS
    assert health["engine"]["running"] is True


def test_curl_streams_the_original_wire_format(server, stop_ids):
    body = json.dumps({"prompt": text_prompt("Hello!"), "temperature": 0.2, "top_p": 0.8, "max_new_tokens": 12})
    # curl -d sends Content-Type: application/x-www-form-urlencoded; the original accepted that
    result = subprocess.run(["curl", "-sS", "-N", "--fail-with-body", "-X", "POST", "-d", body, server.url + "/generate_stream"],
                            capture_output=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert result.stdout.endswith(b"\n")
    matches = [TOKEN_LINE.match(line) for line in lines]
    assert all(matches), lines
    assert_complete([int(m.group(1)) for m in matches], 12, stop_ids)


def test_original_web_demo_request_code_works_unchanged(server, special_tokens):
    """The original web demo's request and parsing, verbatim in substance: ``requests.post`` of
    ``data=json.dumps(...)`` (no Content-Type), Gradio's float numbers, ``iter_lines`` and
    ``json.loads(chunk)["token_id"]``."""
    import requests

    temperature, top_p, max_new_token = 0.2, 0.8, 16.0  # gr.Number values are floats
    inputs = text_prompt("Tell me a story.")
    response = requests.post(
        server.url + "/generate_stream",
        data=json.dumps(
            {"prompt": inputs, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_token}
        ),
        stream=True,
    )
    audio_offset, end_token_id = special_tokens.audio_offset, special_tokens.user
    text_tokens, audio_tokens, complete_tokens = [], [], []
    for chunk in response.iter_lines():
        token_id = json.loads(chunk)["token_id"]
        if token_id == end_token_id:
            break
        complete_tokens.append(token_id)
        if token_id >= audio_offset:
            audio_tokens.append(token_id - audio_offset)
        else:
            text_tokens.append(token_id)
    assert response.status_code == 200
    assert 1 <= len(complete_tokens) <= 16
    assert len(text_tokens) + len(audio_tokens) == len(complete_tokens)


def test_text_prompt_is_tokenized_like_the_original(server, text_tokenizer):
    """A prompt string gets [gMASK]<sop> in front and its special-token texts become ids: the
    same greedy stream as sending those ids."""
    prompt = text_prompt("What time is it?") + "<|begin_of_audio|><|audio_5|><|end_of_audio|>"
    ids = text_tokenizer.encode_prompt(prompt)
    assert ids[:2] == text_tokenizer.prefix_ids
    with TokenClient(server.url) as client:
        from_text = client.generate(prompt, temperature=0, max_new_tokens=10)
        from_ids = client.generate(prompt_token_ids=ids, temperature=0, max_new_tokens=10)
        without_prefix = client.generate(prompt_token_ids=ids[2:], temperature=0, max_new_tokens=10)
    assert from_text == from_ids
    assert without_prefix != from_ids  # ids are taken as given


def test_seed_replays_a_sampled_stream(server):
    params = dict(prompt_token_ids=[100, 200, 300], temperature=1.0, top_p=0.9, max_new_tokens=10)
    with TokenClient(server.url) as client:
        first = client.generate(seed=7, **params)
        again = client.generate(seed=7, **params)
        other = client.generate(seed=8, **params)
    assert first == again
    assert first != other


# --- many users -----------------------------------------------------------------------------------


def test_concurrent_greedy_streams_equal_single_client_streams(server, stop_ids):
    prompts = [text_prompt(text) for text in ("Hello!", "How are you today?", "讲一个故事", "Numbers: 1, 2, 3")]
    max_new = 12

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        async with AsyncTokenClient(server.url) as client:
            alone = [await client.generate(p, temperature=0, max_new_tokens=max_new) for p in prompts]
            together = await asyncio.gather(
                *(
                    client.generate(prompts[i % len(prompts)], temperature=0, max_new_tokens=max_new)
                    for i in range(MAIN_SLOTS)
                )
            )
        return alone, list(together)

    with health_monitor(server):
        alone, together = asyncio.run(run())
    for ids in alone:
        assert_complete(ids, max_new, stop_ids)
    assert len({tuple(ids) for ids in alone}) == len(prompts)
    for i, ids in enumerate(together):
        assert ids == alone[i % len(prompts)], f"client {i}"
    server.wait_idle()


def test_disconnect_storms_free_every_slot_and_leak_no_memory(server):
    """50 clients drop at random points (while queued, before or after some tokens), 3 times."""
    rng = random.Random(0)
    max_new = 400  # far more than any client reads: only a disconnect ends these streams early

    async def client_that_leaves(http: httpx.AsyncClient, index: int) -> int | None:
        """Lines read before leaving (None: left before any answer, perhaps before connecting)."""
        body = {"prompt_token_ids": [100 + index, 200, 300], "temperature": 0, "max_new_tokens": max_new}
        leave_after = rng.randint(-1, 3)
        if leave_after < 0:  # gone before the first token (often while queued)
            try:
                await asyncio.wait_for(http.post("/generate_stream", json=body), timeout=rng.uniform(0.01, 0.3))
            except TimeoutError:
                return None
            raise AssertionError("a 400-token stream finished within 0.3 s")
        read = 0
        async with http.stream("POST", "/generate_stream", json=body) as response:
            assert response.status_code == 200
            async for _ in response.aiter_lines():
                read += 1
                if read > leave_after:
                    break
        return read

    async def storm() -> list[int | None]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S, limits=limits) as http:
            return await asyncio.gather(*(client_that_leaves(http, i) for i in range(50)))

    before = server.metrics()
    rss, streamed = [], 0
    with health_monitor(server):
        for _ in range(3):
            read = asyncio.run(storm())
            assert len(read) == 50 and max(r or 0 for r in read) <= 4
            streamed += sum(r is not None for r in read)
            server.wait_idle()
            rss.append(server.rss_bytes())
    after = server.metrics()
    assert after["glm4voice_active_streams"] == 0 and after["glm4voice_queue_length"] == 0
    # the streams were cancelled in the engine, not run to their end (a few may meet a stop token)
    assert after["glm4voice_engine_requests_finished_total"] - before["glm4voice_engine_requests_finished_total"] <= 10
    outcomes = {o: after[f"glm4voice_requests_total{{outcome={o}}}"] - before[f"glm4voice_requests_total{{outcome={o}}}"]
                for o in ("completed", "cancelled", "rejected", "busy", "engine_error")}  # fmt: skip
    assert outcomes["rejected"] == outcomes["busy"] == outcomes["engine_error"] == 0, outcomes
    assert streamed <= outcomes["cancelled"] + outcomes["completed"] <= 150, (streamed, outcomes)
    assert "Exception in ASGI application" not in server.process.log()
    growth = rss[-1] - rss[0]
    assert growth < 32 * 2**20, f"server RSS grew by {growth / 2**20:.1f} MiB over two storms: {rss}"


# --- bad input ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("malformed JSON", b'{"prompt": "hi",', 400, "not valid JSON"),
    ("empty body", b"", 400, "empty"),
    ("NaN", b'{"prompt": "hi", "temperature": NaN}', 400, "not valid JSON"),
    ("not an object", b'["hi"]', 422, "must be a JSON object"),
    ("missing prompt", b'{"temperature": 0.5}', 422, "exactly one of"),
    ("both prompts", b'{"prompt": "hi", "prompt_token_ids": [1]}', 422, "exactly one of"),
    ("prompt not a string", b'{"prompt": 5}', 422, "prompt: Input should be a valid string"),
    ("temperature a string", b'{"prompt": "hi", "temperature": "hot"}', 422, "temperature"),
    ("temperature null", b'{"prompt": "hi", "temperature": null}', 422, "temperature"),
    (
        "temperature < 0",
        b'{"prompt": "hi", "temperature": -0.1}',
        422,
        "temperature: Input should be greater than or equal to 0",
    ),
    ("top_p 0", b'{"prompt": "hi", "top_p": 0}', 422, "top_p: Input should be greater than 0"),
    ("top_p > 1", b'{"prompt": "hi", "top_p": 1.01}', 422, "top_p: Input should be less than or equal to 1"),
    (
        "max_new_tokens 0",
        b'{"prompt": "hi", "max_new_tokens": 0}',
        422,
        "max_new_tokens: Input should be greater than or equal to 1",
    ),
    ("max_new_tokens < 0", b'{"prompt": "hi", "max_new_tokens": -5}', 422, "max_new_tokens"),
    (
        "max_new_tokens above cap",
        b'{"prompt": "hi", "max_new_tokens": %d}' % (MAX_NEW_TOKENS_CAP + 1),
        422,
        f"at most {MAX_NEW_TOKENS_CAP}",
    ),
    (
        "max_new_tokens fractional",
        b'{"prompt": "hi", "max_new_tokens": 10.5}',
        422,
        "max_new_tokens: Input should be a valid integer",
    ),
    ("max_new_tokens bool", b'{"prompt": "hi", "max_new_tokens": true}', 422, "max_new_tokens"),
    ("seed negative", b'{"prompt": "hi", "seed": -1}', 422, "seed"),
    ("unknown field", b'{"prompt": "hi", "top_k": 5}', 422, "top_k: unknown field"),
    ("ids not ints", b'{"prompt_token_ids": [1, "2"]}', 422, "prompt_token_ids.1"),
    ("ids empty", b'{"prompt_token_ids": []}', 422, "must not be empty"),
    ("id outside vocabulary", b'{"prompt_token_ids": [1, 99999999]}', 422, "outside the vocabulary"),
    ("id negative", b'{"prompt_token_ids": [-1]}', 422, "outside the vocabulary"),
    ("prompt too long", json.dumps({"prompt": "hello " * 2000}).encode(), 413, f"at most {MAX_PROMPT_TOKENS}"),
    (
        "ids too long",
        json.dumps({"prompt_token_ids": [5] * (MAX_PROMPT_TOKENS + 1)}).encode(),
        413,
        f"at most {MAX_PROMPT_TOKENS}",
    ),
    ("body too large", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413, "bytes"),
]


def test_bad_requests_get_a_clear_error_before_any_streaming(server):
    before = server.metrics()
    with health_monitor(server), httpx.Client(base_url=server.url, timeout=30) as http:
        for name, body, status, message in BAD_REQUESTS:
            response = http.post("/generate_stream", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == status, (name, response.text)
            assert response.headers["content-type"] == "application/json", name
            error = response.json()
            assert error["error_code"] == 1 and message in error["text"], (name, error)
    after = server.metrics()
    assert after["glm4voice_requests_total{outcome=rejected}"] - before[
        "glm4voice_requests_total{outcome=rejected}"
    ] == len(BAD_REQUESTS)
    assert after["glm4voice_tokens_generated_total"] == before["glm4voice_tokens_generated_total"]
    assert server.health()["status"] == "ready"


def test_validation_errors_name_every_bad_field(server):
    with TokenClient(server.url) as client, pytest.raises(RequestRejectedError) as caught:
        client.generate("hi", temperature=-1, top_p=2.0)
    assert caught.value.status == 422
    assert {d["field"] for d in caught.value.detail} == {"temperature", "top_p"}


def test_unknown_paths_and_methods_answer_json(server):
    assert httpx.get(server.url + "/nowhere").json() == {"error_code": 1, "text": "Not Found"}
    response = httpx.get(server.url + "/generate_stream")
    assert response.status_code == 405 and response.json()["error_code"] == 1


# --- hostile input (issue 19, items 7 and 8) --------------------------------------------------------

OUT_OF_RANGE = [
    ("temperature 1e39 (not a float32)", {"temperature": 1e39}, "temperature"),
    ("temperature 1e300", {"temperature": 1e300}, "temperature"),
    ("temperature -1e39", {"temperature": -1e39}, "temperature"),
    ("temperature 1e-300 (a float32 zero)", {"temperature": 1e-300}, "temperature"),
    ("top_p 1e-50 (a float32 zero)", {"top_p": 1e-50}, "top_p"),
    ("top_p 5e-324", {"top_p": 5e-324}, "top_p"),
    ("top_p 1e-39 (float32 subnormal)", {"top_p": 1e-39}, "top_p"),
    ("seed 2**63", {"seed": 2**63}, "seed"),
    ("max_new_tokens 2**70", {"max_new_tokens": 2**70}, "max_new_tokens"),
]


def test_unrepresentable_sampling_values_get_422_and_never_reach_the_engine(server):
    """Item 7: ``temperature: 1e39`` used to stop the engine for everyone, ``top_p: 1e-50`` gave 500."""
    before = server.health()["engine"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name, fields, field in OUT_OF_RANGE:
            response = http.post("/generate_stream", content=json.dumps({"prompt": "hi", **fields}))
            assert response.status_code == 422, (name, response.text)
            error = response.json()
            assert error["error_code"] == 1 and error["text"].startswith(f"invalid request: {field}: "), (name, error)
    after = server.health()["engine"]
    assert after["running"] is True
    for counter in ("prompt_tokens", "tokens_generated", "requests_finished", "requests_failed"):
        assert after[counter] == before[counter], counter  # nothing reached the engine
    with TokenClient(server.url) as client:  # and it still serves
        assert len(client.generate("hi", temperature=0.5, top_p=0.9, max_new_tokens=4, seed=1)) >= 1


BAD_FIELD_VALUES = {
    "prompt": [None, 5, 1.5, True, [], ["hi"], {"text": "hi"}],
    "temperature": [None, "0.5", [], {}, True, -1, 1e39, 1e300, 100.5, 1e-300, -1e-300],
    "top_p": [None, "1", [], {}, False, 0, 0.0, -0.5, 1.0000001, 1e-50, 5e-324, 1e-39, 2],
    "max_new_tokens": [None, "10", [], {}, True, 0, -1, 10.5, 1e20, 2**70, MAX_NEW_TOKENS_CAP + 1, 0.001],
    "seed": ["1", [], {}, True, -1, 2**63, 2**64, 1.5, 1e30],
    "prompt_token_ids": [[], "1 2", [1.5], [True], [None], [[1]], [-1], [2**40], {"0": 1}, 5],
}
RAW_NUMBER_LITERALS = {
    "temperature": ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "1e-400e"],
    "top_p": ["NaN", "Infinity", "1e400", "1e-400", "-0", "0e0"],
    "max_new_tokens": ["NaN", "-Infinity", "1e400", "9" * 5000, "--1", "0x10"],
    "seed": ["NaN", "1e400", "9" * 4400, "+1"],
}
INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x80", b"\xc0\xaf"]
CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=xyz", "application/octet-stream", "application/json; charset=latin-1",
                 "image/png", "x/" + "y" * 2000]  # fmt: skip
VALID_BODY = {"prompt": "hi", "temperature": 0.2, "top_p": 0.8, "max_new_tokens": 4, "seed": 1}


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.choice(["int", "float", "str", "bool", "null", "list", "dict"] if depth < 5 else ["int", "str", "null"])
    if kind == "int":
        return rng.choice([0, -1, 2**31, -(2**63), 10**30, rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-320, 3.14, -0.0])
    if kind == "str":
        return "".join(rng.choice('ab<|>\\"\u00e9\u4e2d\ud83d\ude00\x00\n') for _ in range(rng.randint(0, 12)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"x_{random_json(rng, 5)}": random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def hostile_bodies(seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` request bodies that are all invalid, of many kinds (seeded: the same list every run)."""
    rng = random.Random(seed)
    bodies: list[tuple[str, bytes]] = [
        ("100k nested arrays", b"[" * 100_000 + b"]" * 100_000),
        ("100k nested objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ("nested arrays as the prompt", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("nested objects in an unknown field", b'{"prompt": "hi", "x": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}"),
        ("unclosed nesting", b"[" * 100_000),
        ("empty", b""),
        ("whitespace", b" \r\n\t "),
        ("byte order mark, bad field", b"\xef\xbb\xbf" + json.dumps({**VALID_BODY, "seed": -1}).encode()),
        ("utf-16 with a bad field", json.dumps({**VALID_BODY, "top_p": 0}).encode("utf-16")),
        ("form fields", b"prompt=hi&temperature=0.2"),
        ("multipart", b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--xyz--\r\n'),
        ("a 2 MiB prompt", json.dumps({"prompt": "a" * (2 << 20)}).encode()),
        ("a prompt of 50k words", json.dumps({"prompt": "hello " * 50_000}).encode()),
        ("a 200 KB field name", json.dumps({"prompt": "hi", "k" * 200_000: 1}).encode()),
        ("duplicate key, last one bad", b'{"prompt": "hi", "prompt": 5}'),
    ]
    fields = list(BAD_FIELD_VALUES)
    while len(bodies) < count:
        kind = rng.randrange(7)
        if kind == 0:  # one field of a valid body has a bad value
            field = rng.choice(fields)
            value = rng.choice(BAD_FIELD_VALUES[field])
            body = dict(VALID_BODY)
            if field == "prompt_token_ids":
                del body["prompt"]
            body[field] = value
            bodies.append((f"{field}={value!r:.40}", json.dumps(body).encode()))
        elif kind == 1:  # a number literal that JSON or the field cannot take
            field = rng.choice(list(RAW_NUMBER_LITERALS))
            literal = rng.choice(RAW_NUMBER_LITERALS[field])
            text = json.dumps({**VALID_BODY, field: "@"}).replace('"@"', literal)
            bodies.append((f"{field} literal {literal:.20}", text.encode()))
        elif kind == 2:  # an unknown field with a random value
            body = {**VALID_BODY, f"x_{rng.randrange(10**6)}": random_json(rng)}
            bodies.append(("unknown field", json.dumps(body).encode()))
        elif kind == 3:  # a random JSON value that is not a request
            value = random_json(rng)
            if isinstance(value, dict):
                value[f"x_{rng.randrange(10**6)}"] = 1
            bodies.append((f"random JSON {type(value).__name__}", json.dumps(value).encode()))
        elif kind == 4:  # invalid UTF-8 inside the prompt string
            bad = rng.choice(INVALID_UTF8)
            bodies.append((f"invalid UTF-8 {bad!r}", b'{"prompt": "h' + bad + b'i"}'))
        elif kind == 5:  # a valid body cut short
            text = json.dumps(VALID_BODY).encode()
            bodies.append(("truncated", text[: rng.randrange(1, len(text))]))
        else:  # random bytes
            bodies.append(("random bytes", rng.randbytes(rng.randrange(1, 200))))
    return bodies


def test_every_hostile_body_gets_a_4xx_with_a_message_and_the_server_keeps_serving(server, stop_ids):
    """Item 8: a property over many hostile bodies (random JSON shapes, huge numbers, NaN/Infinity
    literals, wrong types, huge strings, invalid UTF-8, deep nesting) sent with assorted content types:
    each gets a 4xx JSON error with a message, none reaches the engine, and good requests still work."""
    rng = random.Random(19)
    before = server.metrics()
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for index, (name, body) in enumerate(hostile_bodies(seed=19, count=400)):
            content_type = rng.choice(CONTENT_TYPES)
            headers = {} if content_type is None else {"Content-Type": content_type}
            response = http.post("/generate_stream", content=body, headers=headers)
            what = (index, name, content_type, body[:80])
            assert 400 <= response.status_code < 500, (what, response.status_code, response.text[:300])
            error = response.json()
            assert error["error_code"] == 1 and len(error["text"]) > 10, (what, error)
            if index % 50 == 0:  # the server keeps serving good requests meanwhile
                assert http.get("/health").json()["status"] == "ready"
    after = server.metrics()
    assert after["glm4voice_tokens_generated_total"] == before["glm4voice_tokens_generated_total"]
    assert after["glm4voice_engine_prompt_tokens_total"] == before["glm4voice_engine_prompt_tokens_total"]
    with TokenClient(server.url) as client:
        assert_complete(client.generate(prompt_token_ids=[1, 2, 3], temperature=0, max_new_tokens=5), 5, stop_ids)
    assert "Exception in ASGI application" not in server.process.log()


# --- exposure: hosts and cross-site requests (issue 19, item 10) ------------------------------------


def test_requests_naming_another_host_are_refused_with_a_message(server):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 reaches the
    server with ``Host: evil.example``; the server answers only to its own names."""
    port = server.url.rsplit(":", 1)[1]
    before = server.metrics()["glm4voice_tokens_generated_total"]
    body = json.dumps({"prompt": "hi", "max_new_tokens": 3})
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io", "10.0.0.1"):
            for response in (http.get("/health", headers={"Host": host}),
                             http.post("/generate_stream", content=body, headers={"Host": host})):  # fmt: skip
                assert response.status_code == 400, (host, response.text)
                error = response.json()
                assert error["error_code"] == 1 and "does not answer to the host" in error["text"], error
                assert "--allowed-hosts" in error["text"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "localhost."):
            assert http.get("/health", headers={"Host": host}).status_code == 200, host
    assert server.metrics()["glm4voice_tokens_generated_total"] == before


def test_cross_site_browser_posts_are_refused_and_other_clients_still_work(server, stop_ids):
    """A page on another site can POST ``text/plain`` to localhost without asking CORS; browsers
    mark such requests with Origin / Sec-Fetch-Site, which curl, requests and our client never send."""
    before = server.metrics()["glm4voice_tokens_generated_total"]
    body = json.dumps({"prompt": "hi", "max_new_tokens": 3})
    cross_site = [
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
        {"Origin": "null", "Content-Type": "application/x-www-form-urlencoded"},  # sandboxed frame, file://
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},  # a browser that left Origin out
        {"Origin": "http://127.0.0.1.evil.example:80", "Content-Type": "text/plain"},
    ]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for headers in cross_site:
            response = http.post("/generate_stream", content=body, headers=headers)
            assert response.status_code == 403, (headers, response.text)
            assert response.json()["error_code"] == 1 and "cross-site request refused" in response.json()["text"]
        # the server's own origin, and pages served from a loopback name, are not cross-site
        for origin in (server.url, "http://localhost:3000"):
            with http.stream("POST", "/generate_stream", content=body, headers={"Origin": origin}) as response:
                assert response.status_code == 200, origin
                assert len([line for line in response.iter_lines() if line]) >= 1
    assert server.metrics()["glm4voice_tokens_generated_total"] - before <= 2 * 3
    # what the original web demo, README's curl and our client send keeps working
    import requests

    response = requests.post(server.url + "/generate_stream", data=body, stream=True, timeout=60)
    assert response.status_code == 200 and json.loads(next(response.iter_lines()))["error_code"] == 0
    curl = subprocess.run(["curl", "-sS", "-N", "--fail-with-body", "-d", body, server.url + "/generate_stream"],
                          capture_output=True, timeout=120)  # fmt: skip
    assert curl.returncode == 0 and TOKEN_LINE.match(curl.stdout.splitlines()[0]), curl
    with TokenClient(server.url) as client:
        assert_complete(client.generate(prompt_token_ids=[5, 6], temperature=0, max_new_tokens=3), 3, stop_ids)


@pytest.fixture(scope="module")
def exposed_server(tiny_checkpoints):
    """A server behind a proxy name (--allowed-hosts), with short header timeouts, on a machine whose
    open-file limit is 1024 (soft and hard: it cannot raise it)."""
    port = free_port()
    args = _server_args("model_server.py", tiny_checkpoints.llm, port, "--max-concurrent-streams", "2",
                        "--max-seq-len", "8192", "--max-new-tokens-cap", str(FAULT_NEW_TOKENS_CAP),
                        "--allowed-hosts", "voice.example, Other.Example.", "--header-timeout", str(HEADER_TIMEOUT_S))  # fmt: skip
    with ServerProcess(args, f"http://127.0.0.1:{port}/health", nofile=1024) as process:
        yield Server(process, f"http://127.0.0.1:{port}")


def test_allowed_hosts_adds_the_names_a_proxy_forwards(exposed_server):
    with httpx.Client(base_url=exposed_server.url, timeout=60) as http:
        for host in ("voice.example", "voice.example:443", "other.example", "localhost"):
            assert http.get("/health", headers={"Host": host}).status_code == 200, host
        assert http.get("/health", headers={"Host": "evil.example"}).status_code == 400
        proxied = {"Host": "voice.example", "Origin": "https://voice.example"}  # the proxy's own page
        response = http.post(
            "/generate_stream", content=json.dumps({"prompt": "hi", "max_new_tokens": 2}), headers=proxied
        )
        assert response.status_code == 200, response.text
        response = http.post(
            "/generate_stream", content="{}", headers={"Host": "voice.example", "Origin": "https://evil.example"}
        )
        assert response.status_code == 403


# --- connections: idle and slowloris clients (issue 19, item 9) --------------------------------------

HEADER_TIMEOUT_S = 5
IDLE_CONNECTIONS = 1100
"""More than the server's open-file limit (1024)."""
SLOW_CONNECTIONS = 300


def test_idle_connections_beyond_the_open_file_limit_do_not_starve_health_or_streams(exposed_server):
    """Item 9: ~1,000 connections that never send a byte used to exhaust the server's 1024 file
    descriptors, and /health timed out. Now the oldest idle ones make room; a stream goes on."""
    with httpx.Client(base_url=exposed_server.url, timeout=WAIT_S) as http:
        body = {"prompt_token_ids": [51, 52], "temperature": 0, "max_new_tokens": FAULT_NEW_TOKENS_CAP}
        with http.stream("POST", "/generate_stream", json=body) as stream:
            lines = stream.iter_lines()
            next(lines)
            port = int(exposed_server.url.rsplit(":", 1)[1])
            hostile_clients.raise_own_open_file_limit(IDLE_CONNECTIONS + 256)
            with hostile_clients.idle_connections(port, IDLE_CONNECTIONS) as idle:
                health = httpx.get(exposed_server.url + "/health", timeout=WAIT_S)  # a new connection
                assert health.status_code == 200 and health.json()["active_streams"] == 1
                assert hostile_clients.closed_by_server(idle) > 0
                for _ in range(5):  # the stream was not closed to make room
                    assert TOKEN_LINE.match(next(lines).encode())
    exposed_server.wait_idle()
    assert "Too many open files" not in exposed_server.process.log()


def test_slowloris_connections_are_closed_after_the_header_timeout(exposed_server):
    """Item 9: 300 connections sending their headers a byte at a time used to be held as long as
    they kept sending. Now each is answered 408 and closed; /health answers meanwhile."""
    port = int(exposed_server.url.rsplit(":", 1)[1])
    results, statuses = asyncio.run(hostile_clients.slowloris_while_probing(port, exposed_server.url + "/health",
                                                                           SLOW_CONNECTIONS, give_up_s=WAIT_S * 2))  # fmt: skip
    still_open = sum(result is None for result in results)
    assert still_open == 0, f"{still_open} of {SLOW_CONNECTIONS} slow connections were still open after {WAIT_S * 2} s"
    assert all(result.startswith(b"HTTP/1.1 408 ") for result in results), {r[:40] for r in results}
    assert statuses and set(statuses) == {200}, statuses
    assert exposed_server.health()["status"] == "ready"


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_first_token_latency(server):
    before = server.metrics()
    with TokenClient(server.url) as client:
        ids = client.generate(prompt_token_ids=[7, 8, 9], temperature=0, max_new_tokens=9)
    after = server.metrics()

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("glm4voice_tokens_generated_total") == len(ids)
    assert delta("glm4voice_requests_total{outcome=completed}") == 1
    assert delta("glm4voice_time_to_first_token_seconds_count") == 1
    assert delta("glm4voice_prompt_tokens_total") == 3
    assert delta("glm4voice_engine_tokens_generated_total") == len(ids)
    assert delta("glm4voice_engine_decode_steps_total") >= 1
    assert after["glm4voice_active_streams"] == 0 and after["glm4voice_queue_length"] == 0


# --- docs/API.md ----------------------------------------------------------------------------------


def api_doc_examples() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    return re.findall(r"<!-- test: (.+?) -->\n```bash\n(.*?)```", text, flags=re.S)


def test_api_doc_has_examples_for_every_endpoint():
    scripts = "\n".join(script for _, script in api_doc_examples())
    for path in ("/generate_stream", "/health", "/metrics"):
        assert path in scripts


@pytest.mark.parametrize("expect,script", api_doc_examples(), ids=lambda v: re.sub(r"\W+", "-", v)[:40])
def test_api_doc_curl_examples_run(server, expect, script):
    script = script.replace("http://localhost:10000", server.url)
    result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    if expect == "ndjson":
        lines = out.splitlines()
        assert lines and all(TOKEN_LINE.match(line.encode()) for line in lines), out
    elif expect == "json":
        assert json.loads(out)["status"] == "ready"
    elif expect.startswith("status "):
        status = expect.split()[1]
        assert out.startswith(f"HTTP/1.1 {status}"), out
        assert json.loads(out.split("\r\n\r\n", 1)[1])["error_code"] == 1
    elif expect.startswith("contains "):
        assert expect.split()[1] in out, out
    else:
        raise AssertionError(f"unknown expectation {expect!r} in docs/API.md")


# --- failures, back-pressure, disconnects (small server with fault injection) -----------------------


def test_engine_failure_mid_stream_ends_with_an_error_line(fault_server):
    body = json.dumps(
        {"prompt_token_ids": [1, 2, 3], "temperature": 0.5, "max_new_tokens": 50, "seed": FAIL_AFTER_SEED}
    )
    result = subprocess.run(
        ["curl", "-sS", "-N", "-d", body, fault_server.url + "/generate_stream"], capture_output=True, timeout=120
    )
    lines = result.stdout.splitlines()
    assert len(lines) == FAIL_AFTER_TOKENS + 1, lines
    assert all(TOKEN_LINE.match(line) for line in lines[:-1])
    last = json.loads(lines[-1])
    assert last["error_code"] == 1 and "injected engine fault" in last["text"]
    with TokenClient(fault_server.url) as client:
        with pytest.raises(StreamFailedError) as caught:
            client.generate(prompt_token_ids=[1, 2, 3], temperature=0.5, max_new_tokens=50, seed=FAIL_AFTER_SEED)
        assert caught.value.tokens_received == FAIL_AFTER_TOKENS
        # the server survives and serves the next request
        assert len(client.generate(prompt_token_ids=[1, 2, 3], temperature=0, max_new_tokens=5)) >= 1
    log = fault_server.process.log()
    assert "Traceback" in log and "InjectedFault: injected engine fault" in log
    fault_server.wait_idle()


def test_engine_failure_before_the_first_token_is_a_json_500(fault_server):
    before = fault_server.metrics()["glm4voice_requests_total{outcome=engine_error}"]
    response = httpx.post(fault_server.url + "/generate_stream", timeout=60,
                          json={"prompt_token_ids": [1, 2, 3], "max_new_tokens": 5, "seed": FAIL_AT_START_SEED})  # fmt: skip
    assert response.status_code == 500
    assert response.json()["error_code"] == 1 and "injected engine fault" in response.json()["text"]
    assert fault_server.metrics()["glm4voice_requests_total{outcome=engine_error}"] == before + 1
    fault_server.wait_idle()


def test_a_dead_engine_ends_open_streams_with_an_error_line_and_the_server_exits_non_zero(tiny_checkpoints):
    """Item 7: when the engine's worker dies, the server does not stay up answering 503 for ever: open
    streams end with an error line, and the process exits with ENGINE_FAILED_EXIT_CODE, saying why."""
    port = free_port()
    args = _server_args("tests/server/fault_server.py", tiny_checkpoints.llm, port, "--max-concurrent-streams", "2",
                        "--max-seq-len", "8192", "--max-new-tokens-cap", str(FAULT_NEW_TOKENS_CAP))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with ServerProcess(args, url + "/health") as process:
        with TokenClient(url) as client:
            open_stream = client.stream(prompt_token_ids=[61, 62], temperature=0, max_new_tokens=FAULT_NEW_TOKENS_CAP)
            next(open_stream)
            killer = httpx.post(url + "/generate_stream", timeout=WAIT_S,
                                json={"prompt_token_ids": [1, 2], "max_new_tokens": 50, "seed": KILL_ENGINE_SEED})  # fmt: skip
            last = json.loads(killer.text.splitlines()[-1])
            assert last["error_code"] == 1 and re.search("engine error|the engine failed", last["text"]), killer.text
            with pytest.raises(StreamFailedError, match="engine error|the engine failed"):
                list(open_stream)  # its last line is an error line, not a cut connection
        code = process.wait_exit(WAIT_S)
        log = process.log()
    assert code == ENGINE_FAILED_EXIT_CODE, log
    assert "the engine failed (InjectedWorkerDeath: injected engine worker death (test))" in log
    assert f"exiting with code {ENGINE_FAILED_EXIT_CODE}" in log and "supervisor" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=10)


def test_full_server_answers_503_with_retry_after_then_recovers_when_clients_leave(fault_server, stop_ids):
    """2 streams + 1 waiting: the next request gets 503 at once, the waiting one 503 after the
    queue timeout; when the two streaming clients disconnect their slots serve new requests."""
    long_body = {"prompt_token_ids": [11, 12, 13], "temperature": 0, "max_new_tokens": FAULT_NEW_TOKENS_CAP}
    finished_before = fault_server.health()["engine"]["requests_finished"]

    async def run() -> None:
        async with httpx.AsyncClient(base_url=fault_server.url, timeout=WAIT_S) as http:
            holders = []  # (response context, line iterator): both must stay referenced
            for _ in range(FAULT_SLOTS):
                context = http.stream("POST", "/generate_stream", json=long_body)
                response = await context.__aenter__()
                assert response.status_code == 200
                lines = response.aiter_lines()
                await anext(lines)
                holders.append((context, lines))
            waiting = asyncio.ensure_future(http.post("/generate_stream", json=long_body))
            deadline = time.monotonic() + WAIT_S
            while (await http.get("/health")).json()["queue_length"] != 1:
                assert time.monotonic() < deadline and not waiting.done(), "the third request was not queued"
                await asyncio.sleep(0.02)
            refused = await http.post("/generate_stream", json=long_body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            assert "busy" in refused.json()["text"]
            timed_out = await waiting
            assert timed_out.status_code == 503 and timed_out.headers["retry-after"] == "2"
            assert f"no stream slot became free within {FAULT_QUEUE_TIMEOUT_S} s" in timed_out.json()["text"]
            for context, _ in holders:  # the clients leave mid-stream
                await context.__aexit__(None, None, None)

    asyncio.run(run())
    fault_server.wait_idle()
    with TokenClient(fault_server.url) as client:
        assert_complete(client.generate(prompt_token_ids=[1, 2], temperature=0, max_new_tokens=6), 6, stop_ids)
    metrics = fault_server.metrics()
    assert metrics["glm4voice_requests_total{outcome=busy}"] >= 2
    # the engine cancelled the holders' streams (they did not run to their end) and finished only the last one
    assert fault_server.health()["engine"]["requests_finished"] - finished_before <= 1 + 1  # + a chance stop token


def test_client_reports_busy_server_and_unreachable_server(fault_server):
    long_body = dict(prompt_token_ids=[21, 22], temperature=0, max_new_tokens=FAULT_NEW_TOKENS_CAP)
    with TokenClient(fault_server.url) as client:
        holders = [client.stream(**long_body) for _ in range(FAULT_SLOTS)]
        for holder in holders:
            next(holder)
        with pytest.raises(ServerBusyError) as caught:  # waits in the queue, then 503
            client.generate(prompt_token_ids=[1], max_new_tokens=3)
        assert caught.value.retry_after == 2
        for holder in holders:
            holder.close()
    fault_server.wait_idle()
    with TokenClient(f"http://127.0.0.1:{free_port()}") as client, pytest.raises(ServerUnavailableError):
        client.generate("hi")


# --- benchmark -----------------------------------------------------------------------------------


def test_load_generator_runs_against_the_server_and_refuses_other_hosts(server):
    command = [sys.executable, "-m", "bench.server", "--url", server.url, "--concurrency", "1,2", "--requests", "2",
               "--max-new-tokens", "4", "--no-warmup"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ") and lines[1].startswith("command: python -m bench.server")
    rows = [line.split() for line in lines if re.match(r"\s+\d+\s+\d+", line)]
    assert [row[:4] for row in rows] == [["1", "2", "0", "0"], ["2", "2", "0", "0"]]
    refused = subprocess.run([*command[:3], "--url", "http://10.1.2.3:10000"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode != 0 and "loopback addresses only" in refused.stderr


def test_a_quantization_method_reaches_the_engine(tiny_checkpoints, stop_ids):
    """``--dtype int8 --quant-method torchao``: the engine holds torchao's int8 weights (/health names the
    method; the default int8 method would be ``int8:fused``) and answers."""
    port = free_port()
    args = _server_args("model_server.py", tiny_checkpoints.llm, port, "--max-concurrent-streams", "2",
                        "--max-seq-len", "256")  # fmt: skip
    args[args.index("float32")] = "int8"
    with ServerProcess([*args, "--quant-method", "torchao"], f"http://127.0.0.1:{port}/health"):
        url = f"http://127.0.0.1:{port}"
        health = httpx.get(url + "/health", timeout=30).json()
        assert (health["dtype"], health["weights"]) == ("int8", "int8:torchao")
        with TokenClient(url) as client:
            ids = list(client.stream(prompt=text_prompt("Hello!"), max_new_tokens=8, temperature=0.2, top_p=0.8))
        assert_complete(ids, 8, stop_ids)


# --- command line ---------------------------------------------------------------------------------


def test_cli_has_the_original_flags_and_refuses_what_it_cannot_do():
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "model_server.py"), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert help_text.returncode == 0
    for flag in ("--host", "--port", "--model-path", "--dtype", "--device", "--max-concurrent-streams", "--max-queue",
                 "--max-prompt-tokens", "--max-new-tokens-cap", "--eager"):  # fmt: skip
        assert flag in help_text.stdout
    for dtype in ("int4", "fp8"):  # GPU-only dtypes: refused on the CPU, naming what works there
        refused = subprocess.run([sys.executable, str(ROOT / "model_server.py"), "--dtype", dtype, "--device", "cpu"],
                                 capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert refused.returncode == 2 and f"--dtype {dtype} needs" in refused.stderr
        assert "on the CPU use --dtype int8 or float32" in refused.stderr
    for flags, words in (
        (["--dtype", "int4", "--quant-method", "fused"], "int4 has no method 'fused' (one of "),
        (["--quant-method", "hqq"], "needs a quantized dtype (int8, fp8, int4), not bfloat16"),
    ):
        refused = subprocess.run([sys.executable, str(ROOT / "model_server.py"), *flags, "--device", "cpu"],
                                 capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "model_server.py"), "--max-concurrent-streams", "0"],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and "max_concurrent_streams" in bad.stderr
    device = "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    no_gpu = subprocess.run(
        [sys.executable, str(ROOT / "model_server.py"), "--device", device], capture_output=True, text=True, cwd=ROOT
    )
    assert no_gpu.returncode == 2 and f"--device {device}" in no_gpu.stderr


def test_shutdown_ends_open_streams_with_an_error_line_and_queued_requests_with_503(fault_server):
    """SIGTERM: streams end at once with a final error line, queued requests get 503, the process
    exits without waiting out its grace period. (Stops the fault server: keep this test last.)"""
    long_body = dict(prompt_token_ids=[31, 32], temperature=0, max_new_tokens=FAULT_NEW_TOKENS_CAP)
    outcome: dict[str, BaseException] = {}
    with TokenClient(fault_server.url) as client:
        holders = [client.stream(**long_body) for _ in range(FAULT_SLOTS)]
        for holder in holders:
            next(holder)

        def queued_request():
            try:
                client.generate(**long_body)
            except BaseException as error:  # noqa: BLE001 - handed to the test thread
                outcome["queued"] = error

        waiter = threading.Thread(target=queued_request)
        waiter.start()
        deadline = time.monotonic() + WAIT_S
        while client.health()["queue_length"] != 1:
            assert time.monotonic() < deadline and waiter.is_alive()
            time.sleep(0.02)
        fault_server.process.stop()  # SIGTERM, then waits for the exit
        waiter.join(timeout=WAIT_S)
        for holder in holders:
            with pytest.raises(StreamFailedError, match="the server is shutting down"):
                list(holder)
    assert isinstance(outcome.get("queued"), ServerBusyError) and "shutting down" in str(outcome["queued"])
    log = fault_server.process.log()
    assert "shutting down: stopped 3 open requests" in log
    assert "CancelledError" not in log and "Exception in ASGI application" not in log
