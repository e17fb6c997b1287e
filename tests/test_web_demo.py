"""web_demo.py without a browser: the per-turn audio streams and their route, the command line, and
the one-command launcher (``python -m glm4voice.launch``, what ``bash scripts/demo.sh`` runs)."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi import FastAPI

from glm4voice.audio import OUTPUT_SAMPLE_RATE
from glm4voice.defaults import ENGINE_FAILED_EXIT_CODE
from glm4voice.launch import (
    MODEL_SERVER,
    WEB_DEMO,
    choose_checkpoints,
    exit_reason,
    supervise,
    tiny_checkpoints_complete,
)
from glm4voice.web.streams import STREAM_PATH, AudioStreams, add_stream_route, decode_frames, encode_frame, stream_url

import hostile_clients
from support import ROOT, ServerProcess, free_port

WAIT_S = 300.0
"""Deadline for the launcher to bring both processes up on a loaded 2-core machine (not a speed check)."""


def test_frames_round_trip_as_int16():
    samples = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0], dtype=np.float32)
    (frame,) = decode_frames(encode_frame(samples))
    np.testing.assert_array_equal(frame, [0, 16384, -16384, 32767, -32767, 32767, -32767])
    frames = decode_frames(encode_frame(np.zeros(3)) + encode_frame(np.ones(2)))
    assert [len(f) for f in frames] == [3, 2]
    with pytest.raises(ValueError, match="truncated"):
        decode_frames(encode_frame(np.zeros(4))[:-1])


def test_a_reader_gets_every_frame_whenever_it_joins():
    async def scenario():
        streams = AudioStreams(OUTPUT_SAMPLE_RATE)
        stream = streams.open()
        early = asyncio.create_task(_read(stream))
        chunks = [np.full(n, n / 1000, dtype=np.float32) for n in (100, 7, 250)]
        stream.push(chunks[0])
        await asyncio.sleep(0)
        stream.push(np.zeros(0))  # empty chunks are not frames
        stream.push(chunks[1])
        stream.push(chunks[2])
        stream.close()
        late = await _read(stream)
        with pytest.raises(RuntimeError, match="closed"):
            stream.push(chunks[0])
        return chunks, await early, late, stream.samples

    chunks, early, late, samples = asyncio.run(scenario())
    assert early == late == [encode_frame(c) for c in chunks]
    assert samples == sum(len(c) for c in chunks)


async def _read(stream) -> list[bytes]:
    return [frame async for frame in stream.frames()]


def test_discard_ends_readers_and_the_registry_bounds_itself():
    async def scenario():
        streams = AudioStreams(OUTPUT_SAMPLE_RATE, max_streams=3)
        first = streams.open()
        reader = asyncio.create_task(_read(first))
        first.push(np.ones(10))
        await asyncio.sleep(0)
        streams.discard(first.id)
        frames = await asyncio.wait_for(reader, 10)
        assert streams.get(first.id) is None and len(frames) <= 1
        opened = []
        for _ in range(5):  # finished turns' streams (the registry's bounds: tests/glm4voice/web/test_streams.py)
            opened.append(streams.open())
            opened[-1].close()
        assert len(streams) == 3 and [s.id for s in opened[-3:]] == [streams.get(s.id).id for s in opened[-3:]]
        assert all(streams.get(s.id) is None for s in opened[:2])
        expiring = AudioStreams(OUTPUT_SAMPLE_RATE, ttl_s=0.0)
        old = expiring.open()
        old.close()
        expiring.open()
        assert expiring.get(old.id) is None and old.closed
        ids = {streams.open().id for _ in range(50)}
        assert len(ids) == 50 and all(len(i) >= 32 for i in ids)  # random, unguessable ids

    asyncio.run(scenario())


def test_the_stream_route_serves_a_turn_and_refuses_unknown_ids():
    async def scenario():
        app = FastAPI()
        streams = AudioStreams(OUTPUT_SAMPLE_RATE)
        add_stream_route(app, streams)
        stream = streams.open()
        stream.push(np.linspace(-1, 1, 500, dtype=np.float32))
        stream.push(np.zeros(20, dtype=np.float32))
        stream.close()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            ok = await client.get("/" + stream_url(stream))
            missing = await client.get(f"{STREAM_PATH}/not-a-stream")
        return ok, missing

    ok, missing = asyncio.run(scenario())
    assert ok.status_code == 200 and ok.headers["x-audio-sample-rate"] == str(OUTPUT_SAMPLE_RATE)
    assert ok.headers["cache-control"] == "no-store"
    assert [len(f) for f in decode_frames(ok.content)] == [500, 20]
    assert missing.status_code == 404 and "no such audio stream" in missing.json()["detail"]


def test_command_line_keeps_the_original_flags():
    import web_demo

    args = web_demo.build_parser().parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 8888)  # this machine only; --host 0.0.0.0 opts in
    assert args.model_path == "THUDM/glm-4-voice-9b"
    assert args.tokenizer_path == "THUDM/glm-4-voice-tokenizer"
    assert args.flow_path == "THUDM/glm-4-voice-decoder"
    assert args.server_url == "http://localhost:10000"
    assert args.device is None and args.random_weights_notice is False
    assert args.block_sizes == "10,20,40,80,160"
    from glm4voice.pipeline import MIN_TOKEN_RATE

    assert args.min_token_rate == MIN_TOKEN_RATE and args.cover_start is False
    assert web_demo.build_parser().parse_args(["--min-token-rate", "40"]).min_token_rate == 40.0
    for bad in ("0", "-3", "inf", "fast"):
        with pytest.raises(SystemExit):
            web_demo.build_parser().parse_args(["--min-token-rate", bad])


def test_max_concurrent_turns_sizes_the_decoder_graphs(tiny_checkpoints):
    """One block per turn in flight: the decoder keeps graphs only for batches up to the turn limit
    (a small card serving a few conversations); without the flag, every size. --min-token-rate reaches
    the turns' cuts, --cover-start and --no-pace-generation their pacing."""
    import web_demo
    from glm4voice.decoder.options import DEFAULT_GRAPH_BATCH_SIZES

    paths = ["--model-path", str(tiny_checkpoints.llm), "--tokenizer-path", str(tiny_checkpoints.speech_tokenizer),
             "--flow-path", str(tiny_checkpoints.decoder), "--device", "cpu"]  # fmt: skip
    from glm4voice.pipeline import MIN_TOKEN_RATE

    cases = ((["--max-concurrent-turns", "4", "--min-token-rate", "40", "--cover-start", "--no-pace-generation"],
              (1, 2, 4), 40.0, True, False),
             ([], DEFAULT_GRAPH_BATCH_SIZES, MIN_TOKEN_RATE, False, True))  # fmt: skip
    for extra, expected, rate, cover, pace in cases:
        chat, client = web_demo.load_chat(web_demo.build_parser().parse_args(paths + extra))
        try:
            assert chat.decoder.graph_batch_sizes == expected
            assert chat.config.min_token_rate == rate and chat.block_policy().min_token_rate == rate
            assert chat.block_pacing().cover_start is cover
            assert chat.block_pacing().pace_generation is pace and not chat.block_pacing(paced=False).pace_generation
        finally:
            chat.close()
            asyncio.run(client.aclose())


def test_launcher_needs_all_three_checkpoints_or_none(tmp_path):
    partial = argparse.Namespace(model_path="THUDM/glm-4-voice-9b", tokenizer_path=None, flow_path=None,
                                 tiny_dir=str(tmp_path), regenerate_tiny=False)  # fmt: skip
    with pytest.raises(SystemExit, match="all three"):
        choose_checkpoints(partial)
    given = argparse.Namespace(
        model_path="a", tokenizer_path="b", flow_path="c", tiny_dir=str(tmp_path), regenerate_tiny=False
    )
    chosen = choose_checkpoints(given)
    assert (chosen.llm, chosen.speech_tokenizer, chosen.decoder, chosen.random_weights) == ("a", "b", "c", False)
    assert not tiny_checkpoints_complete(tmp_path)


@pytest.mark.slow
def test_one_command_starts_server_and_page_prints_the_url_and_stops_both(tiny_checkpoints, tmp_path):
    tiny_dir = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoints.root, tiny_dir)  # complete: the launcher must reuse, not rewrite it
    assert tiny_checkpoints_complete(tiny_dir)
    stamp = (tiny_dir / "glm-4-voice-decoder" / "flow.pt").stat().st_mtime_ns
    port, server_port = free_port(), free_port()
    command = [sys.executable, "-m", "glm4voice.launch", "--port", str(port), "--server-port", str(server_port),
               "--tiny-dir", str(tiny_dir), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    log = tmp_path / "launch.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://localhost:{port}"
        deadline = time.monotonic() + WAIT_S
        while f"GLM-4-Voice demo: {url}" not in log.read_text(errors="replace"):
            assert launcher.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        console = log.read_text(errors="replace")
        assert "TINY RANDOM checkpoints" in console and "answers are noise" in console
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=30).text
        assert "Random weights" in config and "glm4voicePlayer" in config
        assert httpx.get(f"http://127.0.0.1:{server_port}/health", timeout=30).json()["status"] == "ready"
        assert (tiny_dir / "glm-4-voice-decoder" / "flow.pt").stat().st_mtime_ns == stamp
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            code = launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            raise
    assert code == 0, log.read_text(errors="replace")
    for p in (port, server_port):  # both children are gone with the launcher
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{p}/", timeout=5)


def test_the_launcher_says_which_process_ended_and_exits_non_zero(caplog):
    """Issue 19, item 7: a model server whose engine died exits with ENGINE_FAILED_EXIT_CODE; the
    launcher then stops the other process and exits with that code, saying what happened."""
    processes = {
        MODEL_SERVER: subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({ENGINE_FAILED_EXIT_CODE})"]),
        WEB_DEMO: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]),
    }
    try:
        with caplog.at_level(logging.ERROR, logger="glm4voice.launch"):
            code = supervise(processes)
    finally:
        processes[WEB_DEMO].kill()
        processes[WEB_DEMO].wait()
    assert code == ENGINE_FAILED_EXIT_CODE
    assert f"the model server exited with code {ENGINE_FAILED_EXIT_CODE}: its engine failed" in caplog.text
    assert "stopping the demo" in caplog.text
    assert exit_reason(WEB_DEMO, -signal.SIGKILL) == "the web demo was killed by SIGKILL"
    assert exit_reason(WEB_DEMO, 0) == "the web demo exited with code 0"


@pytest.mark.slow
def test_the_whole_demo_exits_non_zero_when_the_model_server_dies(tiny_checkpoints, tmp_path):
    """Item 7, end to end: the demo's model server dies; the launcher stops the web demo and exits
    non-zero with a message naming the model server."""
    port, server_port = free_port(), free_port()
    command = [sys.executable, "-m", "glm4voice.launch", "--port", str(port), "--server-port", str(server_port),
               "--tiny-dir", str(tiny_checkpoints.root), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "launch.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + WAIT_S
        while "GLM-4-Voice demo: http://localhost" not in log.read_text(errors="replace"):
            assert launcher.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        server_pid = next(
            int(pid) for pid in children if b"model_server.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        os.kill(server_pid, signal.SIGKILL)  # as a crash would end it
        code = launcher.wait(timeout=WAIT_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    console = log.read_text(errors="replace")
    assert code != 0, console
    assert "the model server was killed by SIGKILL; stopping the demo" in console
    with pytest.raises(httpx.ConnectError):  # the web demo was stopped with it
        httpx.get(f"http://127.0.0.1:{port}/", timeout=5)


# --- the web demo process under attack (issue 19, items 9 and 10) ------------------------------------

HEADER_TIMEOUT_S = 5
IDLE_CONNECTIONS = 1100
"""More than the web demo's open-file limit (1024)."""


class WebDemo:
    def __init__(self, process: ServerProcess, port: int):
        self.process, self.port, self.url = process, port, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def web_demo(tiny_checkpoints):
    """The real web_demo.py (its model server is not running: the page works without one) behind a
    proxy name, with short header timeouts, on a machine whose open-file limit is 1024."""
    port = free_port()
    args = [str(ROOT / "web_demo.py"), "--host", "127.0.0.1", "--port", str(port), "--server-url",
            f"http://127.0.0.1:{free_port()}", "--model-path", str(tiny_checkpoints.llm), "--tokenizer-path",
            str(tiny_checkpoints.speech_tokenizer), "--flow-path", str(tiny_checkpoints.decoder), "--device", "cpu",
            "--allowed-hosts", "voice.example", "--header-timeout", str(HEADER_TIMEOUT_S)]  # fmt: skip
    with ServerProcess(args, f"http://127.0.0.1:{port}/", timeout=WAIT_S, nofile=1024, probe_timeout=60) as process:
        yield WebDemo(process, port)


def wav_file() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    return buffer.getvalue()


@pytest.mark.slow
def test_the_page_refuses_other_hosts_and_cross_site_requests_and_serves_its_own(web_demo):
    """Item 10: by DNS rebinding or a cross-site form, a page on another site could drive the web
    demo (upload files, start turns). Now: other hosts get 400, cross-site requests 403; the page's
    own (same-origin) requests and links from elsewhere still work."""
    upload = {"files": ("question.wav", wav_file(), "audio/wav")}
    with httpx.Client(base_url=web_demo.url, timeout=WAIT_S) as http:
        refused = http.get("/", headers={"Host": "evil.example"})
        assert refused.status_code == 400 and "does not answer to the host 'evil.example'" in refused.text
        assert http.post("/gradio_api/upload", files=upload, headers={"Host": "evil.example"}).status_code == 400
        assert http.get("/", headers={"Host": "voice.example"}).status_code == 200  # --allowed-hosts
        link = http.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
        assert link.status_code == 200  # a link from another site still opens the page
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Origin": "http://evil.example", "Content-Type": "text/plain"}):  # fmt: skip
            response = http.post("/gradio_api/upload", files=upload, headers=headers)
            assert response.status_code == 403 and "cross-site request refused" in response.text, headers
            join = http.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0}, headers=headers)
            assert join.status_code == 403, headers
        assert http.get("/config", headers={"Origin": "http://evil.example"}).status_code == 403  # cross-origin read
        own = {"Origin": web_demo.url, "Sec-Fetch-Site": "same-origin"}
        uploaded = http.post("/gradio_api/upload", files=upload, headers=own)
        assert uploaded.status_code == 200 and len(uploaded.json()) == 1, uploaded.text
        assert http.get("/config", headers=own).status_code == 200
    assert "refused POST /gradio_api/upload" in web_demo.process.log()


@pytest.mark.slow
def test_idle_connections_beyond_the_open_file_limit_do_not_starve_the_page(web_demo):
    """Item 9: more idle connections than the process has file descriptors; the page still loads."""
    hostile_clients.raise_own_open_file_limit(IDLE_CONNECTIONS + 256)
    with hostile_clients.idle_connections(web_demo.port, IDLE_CONNECTIONS) as idle:
        page = httpx.get(web_demo.url + "/", timeout=WAIT_S)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert hostile_clients.closed_by_server(idle) > 0
    assert "Too many open files" not in web_demo.process.log()


@pytest.mark.slow
def test_slowloris_connections_to_the_page_are_closed_after_the_header_timeout(web_demo):
    results, statuses = asyncio.run(
        hostile_clients.slowloris_while_probing(web_demo.port, web_demo.url + "/config", 300, give_up_s=WAIT_S)
    )
    still_open = sum(result is None for result in results)
    assert still_open == 0, f"{still_open} of 300 slow connections were still open after {WAIT_S} s"
    assert all(result.startswith(b"HTTP/1.1 408 ") for result in results), {r[:40] for r in results}
    assert statuses and set(statuses) == {200}, statuses
