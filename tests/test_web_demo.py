"""web_demo.py without a browser: the per-turn audio streams and their route, the command line, and
the one-command launcher (``python -m glm4voice.launch``, what ``bash scripts/demo.sh`` runs)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from glm4voice.audio import OUTPUT_SAMPLE_RATE
from glm4voice.launch import choose_checkpoints, tiny_checkpoints_complete
from glm4voice.web.streams import STREAM_PATH, AudioStreams, add_stream_route, decode_frames, encode_frame, stream_url
from support import ROOT, free_port

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
