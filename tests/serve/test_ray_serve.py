"""GLM-4-Voice on Ray Serve (``python -m glm4voice.serve``): the REAL command, starting a local Ray
cluster on this machine with the tiny checkpoints on the CPU (2 engine replicas of 4 streams each, 1
speech replica), driven over HTTP like any client: curl, the original web demo's ``requests`` code,
httpx, the openai SDK and the web demo itself pointed at the ingress.

One cluster for the module (starting Ray costs tens of seconds on a loaded 2-core machine). The engine
replicas are model_server.py's engine, except that a request seeded with ``HOLD_SEED`` stays in flight
after its first token until its client goes (tests/serve/held_engine.py): that is how a test keeps
replicas full without the engines using the CPU meanwhile. Nothing here waits on a clock: every "until"
below is a condition polled with a generous deadline, and which replica serves a stream is read from
the replicas' own counters (``GET /replicas``), one stream opened at a time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from serve.held_engine import HOLD_SEED, KILL_ENGINE_SEED, KILL_MARKER_ENV

from glm4voice import devices
from glm4voice.protocol import TextInput, render_prompt_text

from support import ROOT, ServerProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ENGINES = 2
STREAMS = 4
"""Streams per engine replica (its batch and its ``max_ongoing_requests``)."""
MAX_QUEUE = 16
"""Requests a router lets wait for a free replica (more than any burst below sends at once)."""
START_S = 900.0
WAIT_S = 300.0
"""Deadline for conditions that must become true on a loaded machine (never a speed check)."""
LONG = {"prompt_token_ids": [1, 2, 3] * 10, "max_new_tokens": 64, "seed": HOLD_SEED}
"""A turn that stays in flight after its first token until the test closes it."""
BUSY = "every engine replica is busy"
READY = "GLM-4-Voice on Ray Serve:"
BIND_FAILED = "Failed to bind to address"
START_ATTEMPTS = 3
RAY_DEFAULT_PORTS = frozenset({6379, 8076, 8265, 10001, 52365, 52366})
"""GCS, object manager, dashboard, client server, dashboard agent (HTTP, gRPC): a cluster may take them
after the test chose its port."""
LOST = "serving this stream stopped"


def text_prompt(text: str) -> str:
    return render_prompt_text("", TextInput(text))


def session_processes(sid: int) -> list[str]:
    """``pid command`` of every process of session ``sid`` (the command's and all of Ray's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                found.append(f"{entry.name} {command!r}")
        except (OSError, ValueError, IndexError):
            continue
    return found


def _routed_to(before: dict[str, dict], after: dict[str, dict]) -> str:
    """The replica that one more stream was routed to."""
    (replica,) = [r for r in after if after[r]["routed"] != before.get(r, {}).get("routed", 0)]
    return replica


def wait_until(condition, what: str, timeout: float = WAIT_S, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(poll_s)


class LongStream:
    """A turn held in flight (its first token line has arrived; nothing more comes until it is closed)."""

    def __init__(self, url: str, replica: str | None = None):
        self.client = httpx.Client(timeout=httpx.Timeout(WAIT_S))
        self.response = self.client.send(self.client.build_request("POST", url + "/generate_stream", json=LONG),
                                         stream=True)  # fmt: skip
        assert self.response.status_code == 200, self.response.read()
        self.lines = self.response.iter_lines()
        self.replica = replica
        assert "token_id" in self.next_line()

    def next_line(self) -> dict:
        return json.loads(next(self.lines))

    def close(self) -> None:
        self.response.close()
        self.client.close()


class Cluster:
    def __init__(self, args: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(tempfile.mkstemp(prefix="ray-serve-", suffix=".log")[1])
        self.kill_marker = self.log_path.with_suffix(".killed")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", KILL_MARKER_ENV: str(self.kill_marker)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "glm4voice.serve", *args], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.sid = self.process.pid
        self.open: list[LongStream] = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def wait_ready(self) -> None:
        """Until the command says every replica runs (the ingress answers before the speech side has started)."""

        def ready():
            assert self.process.poll() is None, f"the command exited with {self.process.returncode}:\n{self.log()}"
            return READY in self.log()

        wait_until(ready, f"the Ray Serve app at {self.url} has started", timeout=START_S, poll_s=1.0)

    def replicas(self) -> dict:
        response = httpx.get(self.url + "/replicas", timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def engines(self) -> dict[str, dict]:
        """What the ingress knows of each running engine replica (its own counters as it took its last
        stream, what was routed there, what is open), by replica id."""
        return {e["replica"]: e for e in self.replicas()["engine"] if not e["lost"]}

    def every_engine(self) -> dict[str, dict]:
        """:meth:`engines`, once every running engine replica has taken a stream from the ingress (held
        turns are opened until each has; Ray sends each to the replica with fewer ongoing requests)."""
        try:
            while len(self.engines()) < ENGINES:
                self.open_long()
        finally:
            self.close_all()
        return self.engines()

    def open_long(self) -> LongStream:
        """One more turn held in flight, and which replica took it."""
        before = self.engines()
        stream = LongStream(self.url)
        self.open.append(stream)
        stream.replica = _routed_to(before, self.engines())
        return stream

    def close(self, stream: LongStream) -> None:
        stream.close()
        self.open.remove(stream)

    def close_all(self) -> None:
        for stream in list(self.open):
            self.close(stream)
        self.wait_idle()

    def wait_idle(self) -> None:
        """Until no stream is open anywhere: the ingress's, and none on any replica."""

        seen: list[dict] = []

        def idle():
            state = {"ingress": httpx.get(self.url + "/health", timeout=30).json()["engine"], **self.replicas()}
            seen[:] = [state]
            return state["ingress"]["streams_open"] == 0 and all(e["open"] == 0 for e in state["engine"])

        try:
            wait_until(idle, "every stream has ended")
        except AssertionError as error:
            raise AssertionError(f"{error}; last seen: {seen}") from None

    def hold_full(self, replica: str) -> None:
        """Hold turns in flight until ``replica`` takes no more, while another replica still has room."""
        while sum(s.replica == replica for s in self.open) < STREAMS:
            self.open_long()
        others = [s for s in self.open if s.replica != replica]
        if len(others) == STREAMS * (ENGINES - 1):  # every replica full: free one slot elsewhere
            self.close(others[0])
            wait_until(lambda: self.engines()[others[0].replica]["open"] < STREAMS, "a slot frees")

    def served_by(self, body: dict) -> tuple[bytes, str]:
        """The whole answer to ``body`` (raw bytes), and the replica that served it."""
        before = self.engines()
        with httpx.stream("POST", self.url + "/generate_stream", json=body, timeout=WAIT_S) as response:
            assert response.status_code == 200, response.read()
            raw = response.read()
        return raw, _routed_to(before, self.engines())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    cluster = None
    try:
        for _ in range(START_ATTEMPTS):
            port = serve_port()
            args = ["--model-path", str(tiny_checkpoints.llm), "--tokenizer-path", str(tiny_checkpoints.speech_tokenizer),
                    "--flow-path", str(tiny_checkpoints.decoder), "--device", "cpu", "--dtype", "float32",
                    "--engine-replicas", str(ENGINES), "--speech-replicas", "1", "--num-cpus", "2",
                    "--max-concurrent-streams", str(STREAMS), "--max-queue", str(MAX_QUEUE), "--port", str(port),
                    "--queue-timeout", str(START_S), "--engine-factory", "tests.serve.held_engine:build"]  # fmt: skip
            cluster = Cluster(args, port)
            try:
                cluster.wait_ready()
                break
            except AssertionError:
                if BIND_FAILED not in cluster.log():  # the port was free when chosen, not when Serve bound it
                    raise
                reap(cluster)
        else:
            raise AssertionError(f"no free port for Ray Serve's proxy in {START_ATTEMPTS} tries")
        yield cluster
    finally:
        if cluster is not None:
            reap(cluster)


def reap(cluster: Cluster) -> None:
    """Stop the command; never leave Ray behind, even when a test failed."""
    for stream in list(cluster.open):
        stream.close()
    cluster.stop()
    for line in session_processes(cluster.sid):
        os.kill(int(line.split()[0]), signal.SIGKILL)
    cluster.kill_marker.unlink(missing_ok=True)


def serve_port() -> int:
    """A free loopback port that none of Ray's own processes listens on by default."""
    while (port := free_port()) in RAY_DEFAULT_PORTS:
        pass
    return port


@pytest.fixture(scope="module")
def direct(tiny_checkpoints):
    """model_server.py on the same checkpoint, with the same engine settings as a replica."""
    port = free_port()
    args = [str(ROOT / "model_server.py"), "--host", "127.0.0.1", "--port", str(port), "--model-path",
            str(tiny_checkpoints.llm), "--device", "cpu", "--dtype", "float32", "--max-concurrent-streams",
            str(STREAMS)]  # fmt: skip
    with ServerProcess(args, f"http://127.0.0.1:{port}/health", timeout=300) as process:
        process.url = f"http://127.0.0.1:{port}"
        yield process


SEEDED = {"prompt": text_prompt("What is the weather like on Mars?"), "temperature": 0.8, "top_p": 0.9,
          "max_new_tokens": 24, "seed": 1234}  # fmt: skip


@pytest.fixture(scope="module")
def expected(direct) -> bytes:
    """What model_server.py answers to SEEDED, byte for byte."""
    with httpx.stream("POST", direct.url + "/generate_stream", json=SEEDED, timeout=WAIT_S) as response:
        assert response.status_code == 200
        raw = response.read()
    assert raw.count(b"\n") >= 2 and b'"error_code": 0' in raw
    return raw


def expected_allocator() -> str:
    """What a replica's PYTORCH_CUDA_ALLOC_CONF should be: the user's (inherited), else expandable segments."""
    return os.environ.get(devices.ALLOCATOR_ENV, devices.EXPANDABLE_SEGMENTS)


# --- load-aware routing and back-pressure -------------------------------------------------------------


def test_eight_concurrent_turns_spread_over_both_engine_replicas(cluster):
    before = cluster.engines()
    try:
        streams = [cluster.open_long() for _ in range(ENGINES * STREAMS)]
        after = cluster.engines()
        assert len(after) == ENGINES
        assert sorted(s.replica for s in streams) == sorted([*after] * STREAMS)
        routed = {r: after[r]["routed"] - before.get(r, {}).get("routed", 0) for r in after}
        assert routed == {r: STREAMS for r in after}
        assert {r: after[r]["open"] for r in after} == {r: STREAMS for r in after}
        # each replica's own counters, as it took its 4th turn: 4 in flight there
        assert {r: after[r]["reported"]["open_streams"] for r in after} == {r: STREAMS for r in after}
        assert all(e["reported"]["accepted"] >= STREAMS for e in after.values())
        # each replica's process starts torch's CUDA allocator as model_server.py does
        assert {e["reported"]["allocator"] for e in after.values()} == {expected_allocator()}
    finally:
        cluster.close_all()


def test_every_replica_full_gets_503_with_retry_after_and_the_admission_body(cluster):
    try:
        for _ in range(ENGINES * STREAMS):
            cluster.open_long()
        statuses = asyncio.run(_first_refusal(cluster.url, 3 * MAX_QUEUE))
    finally:
        cluster.close_all()
    status, headers, body = statuses
    assert status == 503
    assert headers.get("retry-after") == "2"
    assert set(body) == {"error_code", "text"} and body["error_code"] == 1, body
    assert BUSY in body["text"] and body["text"].endswith("; retry later"), body
    health = httpx.get(cluster.url + "/health", timeout=30).json()
    assert health["engine"]["streams_busy"] >= 1
    assert all(e["reported"]["open_streams"] <= STREAMS for e in cluster.engines().values())


async def _first_refusal(url: str, count: int) -> tuple[int, dict, dict]:
    """Send ``count`` requests at once while every replica is full; the first refusal's status, headers
    and body (the requests that wait in the queue are cancelled)."""
    body = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 4, "seed": 1}
    async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT_S)) as client:

        async def one():
            response = await client.send(client.build_request("POST", url + "/generate_stream", json=body), stream=True)
            return response

        pending = {asyncio.ensure_future(one()) for _ in range(count)}
        try:
            deadline = time.monotonic() + WAIT_S
            while pending:
                done, pending = await asyncio.wait(pending, timeout=max(1.0, deadline - time.monotonic()),
                                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                assert done, "no request was refused while every replica was full"
                for task in done:
                    response = task.result()
                    raw = await response.aread()
                    if response.status_code != 200:
                        return response.status_code, dict(response.headers), json.loads(raw)
            raise AssertionError("every request was served while every replica was full")
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


# --- the same answers, the same wire format ---------------------------------------------------------


def test_a_seeded_stream_is_model_servers_byte_for_byte_on_either_replica(cluster, expected):
    replicas = sorted(cluster.every_engine())
    for target in replicas:
        other = next(r for r in replicas if r != target)
        try:
            cluster.hold_full(other)
            raw, served = cluster.served_by(SEEDED)
        finally:
            cluster.close_all()
        assert served == target
        assert raw == expected


def test_curl_and_the_original_web_demo_client_work_against_the_ingress(cluster, expected):
    import requests

    result = subprocess.run(["curl", "-sS", "-N", "--fail-with-body", "-X", "POST", "-d", json.dumps(SEEDED),
                             cluster.url + "/generate_stream"], capture_output=True, timeout=WAIT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    # the original web demo: requests.post(data=json.dumps(...)), iter_lines, json.loads(chunk)["token_id"]
    response = requests.post(cluster.url + "/generate_stream", data=json.dumps(SEEDED), stream=True, timeout=WAIT_S)
    token_ids = [json.loads(chunk)["token_id"] for chunk in response.iter_lines() if chunk]
    assert token_ids == [json.loads(line)["token_id"] for line in expected.splitlines()]


def test_bad_requests_get_the_token_servers_errors(cluster, direct):
    for body in ({"prompt": 5}, {"prompt": "x", "max_new_tokens": 0}, {"prompt": "x", "what": 1}):
        ray = httpx.post(cluster.url + "/generate_stream", json=body, timeout=60)
        own = httpx.post(direct.url + "/generate_stream", json=body, timeout=60)
        assert (ray.status_code, ray.content) == (own.status_code, own.content)
        assert ray.status_code == 422


# --- the OpenAI-compatible API and the web demo on top of the replicas ------------------------------


def test_the_openai_sdk_gets_spoken_answers_from_the_speech_replica(cluster):
    from openai import OpenAI

    speech_before = sum(r["routed"] for r in cluster.replicas()["speech"])
    client = OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
    assert [m.id for m in client.models.list()] == ["glm-4-voice-9b"]
    request = {"model": "glm-4-voice-9b", "messages": [{"role": "user", "content": "Say hello."}],
               "modalities": ["text", "audio"], "max_completion_tokens": 40, "seed": 7, "temperature": 0.8}  # fmt: skip
    whole = client.chat.completions.create(**request, audio={"voice": "alloy", "format": "wav"})
    chunks = list(client.chat.completions.create(**request, audio={"voice": "alloy", "format": "pcm16"}, stream=True))
    samples, rate = sf.read(io.BytesIO(base64.b64decode(whole.choices[0].message.audio.data)), dtype="int16")
    assert rate == 24_000 and len(samples) > 0 and whole.usage.completion_tokens > 0
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pcm = b"".join(base64.b64decode(d.audio.data) for d in deltas if d.audio is not None and d.audio.data)
    # the same seeded answer, whichever engine replica generated the tokens
    np.testing.assert_array_equal(np.frombuffer(pcm, dtype="<i2"), samples)
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    speech = cluster.replicas()["speech"]
    assert sum(r["routed"] for r in speech) == speech_before + 2
    assert {r["reported"]["allocator"] for r in speech if r["routed"]} == {expected_allocator()}


def test_a_realtime_session_runs_through_ray_serves_websocket_proxy(cluster):
    import openai

    async def scenario() -> list:
        client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", websocket_base_url=cluster.url.replace("http", "ws")
                                    + "/v1", api_key="unused", max_retries=0)  # fmt: skip
        events = []
        async with client.realtime.connect(model="glm-4-voice-9b") as connection:
            await connection.session.update(session={"type": "realtime", "max_output_tokens": 30,
                                                     "audio": {"input": {"turn_detection": None}}})  # fmt: skip
            await connection.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}
            )
            await connection.response.create()
            async with asyncio.timeout(WAIT_S):
                async for event in connection:
                    events.append(event)
                    if event.type in ("response.done", "error"):
                        break
        return events

    events = asyncio.run(scenario())
    types = [e.type for e in events]
    assert "error" not in types, events[-1]
    assert types[0] == "session.created" and types[-1] == "response.done", types
    assert events[-1].response.status in ("completed", "incomplete") and events[-1].response.usage.output_tokens > 0
    assert any(t == "response.output_audio.delta" for t in types)


def test_the_web_demo_takes_the_ingress_as_its_token_server(cluster, tiny_checkpoints):
    port = free_port()
    args = [str(ROOT / "web_demo.py"), "--host", "127.0.0.1", "--port", str(port), "--server-url", cluster.url,
            "--model-path", str(tiny_checkpoints.llm), "--tokenizer-path", str(tiny_checkpoints.speech_tokenizer),
            "--flow-path", str(tiny_checkpoints.decoder), "--device", "cpu"]  # fmt: skip
    before = sum(e["routed"] for e in cluster.engines().values())
    with ServerProcess(args, f"http://127.0.0.1:{port}/", timeout=START_S) as web:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as page:
            started = page.post("/gradio_api/call/respond", json={"data": ["text", None, "Hello", 0.2, 0.8, 30]})
            assert started.status_code == 200, started.text
            statuses = []
            with page.stream("GET", f"/gradio_api/call/respond/{started.json()['event_id']}") as events:
                for line in events.iter_lines():
                    assert not line.startswith("event: error"), line
                    if line.startswith("data:"):
                        data = json.loads(line.removeprefix("data:"))
                        statuses += [d for d in data if isinstance(d, str) and d.startswith("Turn 1")]
        assert statuses and "Turn 1 · done" in statuses[-1], (statuses, web.log())
    assert sum(e["routed"] for e in cluster.engines().values()) == before + 1


# --- failover ---------------------------------------------------------------------------------------


def test_a_killed_replica_ends_its_streams_with_an_error_and_is_replaced(cluster, expected):
    try:
        for _ in range(ENGINES * STREAMS):
            cluster.open_long()
        engines = cluster.engines()
        assert len(engines) == ENGINES  # every replica is full
        victim, survivor = sorted(engines)
        os.kill(engines[victim]["reported"]["pid"], signal.SIGKILL)
        # the victim's turns end with a clear error line; the others go on
        for stream in [s for s in cluster.open if s.replica == victim]:
            line = stream.next_line()
            assert line["error_code"] == 1 and LOST in line["text"] and victim in line["text"], line
        assert victim not in cluster.engines()  # the ingress saw it die
        assert cluster.engines()[survivor]["open"] == STREAMS
    finally:
        cluster.close_all()
    # after the first error, no turn fails: 8 at once, while the victim is down or coming back
    results = asyncio.run(_turns(cluster.url, ENGINES * STREAMS))
    assert results == [expected] * len(results)
    # Ray replaces the dead replica: with the survivor full, a turn waits for the newcomer and is served there
    try:
        cluster.hold_full(survivor)
        raw, served = cluster.served_by(SEEDED)
    finally:
        cluster.close_all()
    assert served not in engines and raw == expected
    assert sorted(cluster.engines()) == sorted([survivor, served])


async def _turns(url: str, count: int) -> list[bytes]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT_S)) as client:

        async def one() -> bytes:
            response = await client.post(url + "/generate_stream", json=SEEDED)
            assert response.status_code == 200, response.text
            return response.content

        return list(await asyncio.gather(*(one() for _ in range(count))))


def test_a_replica_whose_engine_dies_ends_and_is_replaced(cluster, expected):
    """As model_server.py exits when its engine dies, so does the replica: its stream ends with an error
    line, the next turns go to the other replica, and Ray starts a new one."""
    engines = cluster.every_engine()
    target, other = sorted(engines)
    kill = {"prompt_token_ids": [4, 5, 6], "max_new_tokens": 64, "seed": KILL_ENGINE_SEED}
    try:
        cluster.hold_full(other)
        with httpx.stream("POST", cluster.url + "/generate_stream", json=kill, timeout=WAIT_S) as response:
            assert response.status_code == 200
            lines = [json.loads(line) for line in response.iter_lines()]
    finally:
        cluster.close_all()
    assert cluster.kill_marker.exists()  # one engine died...
    # ... under this stream: it ends with an error line, or, when the replica died before this stream's first
    # token reached the ingress, another replica answered it whole
    assert "token_id" in lines[0] and all("token_id" in line for line in lines[:-1]), lines
    assert lines[-1]["error_code"] == 1 or "token_id" in lines[-1], lines
    assert asyncio.run(_turns(cluster.url, ENGINES * STREAMS)) == [expected] * (ENGINES * STREAMS)
    try:
        cluster.hold_full(other)
        raw, served = cluster.served_by(SEEDED)
    finally:
        cluster.close_all()
    assert served not in engines and raw == expected


# --- shutdown ---------------------------------------------------------------------------------------


def test_shutdown_stops_every_ray_process(cluster):
    assert len(session_processes(cluster.sid)) > ENGINES + 3  # Ray's own, the proxy, the replicas
    assert cluster.stop() == 0, cluster.log()
    deadline = time.monotonic() + 120
    while (left := session_processes(cluster.sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
