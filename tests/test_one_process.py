"""The one-process layout (``web_demo.py --in-process-engine``, ``python -m glm4voice.launch --layout
one-process``) and the launcher's device flags: the engine and the speech side in one process, the page
and the OpenAI-compatible API answering through the in-process client; clear usage errors for devices
this machine does not have; a dead engine makes the process exit with ENGINE_FAILED_EXIT_CODE."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

import web_demo
from glm4voice import launch
from glm4voice.defaults import ENGINE_FAILED_EXIT_CODE
from glm4voice.devices import DeviceError

from support import ROOT, ServerProcess, free_port

WAIT_S = 300.0
"""Deadline for a process to come up on a loaded 2-core machine (not a speed check)."""


def _device_args(**given) -> argparse.Namespace:
    return argparse.Namespace(**({"device": None, "llm_device": None, "decoder_device": None} | given))


def test_the_launcher_places_the_llm_and_the_speech_side(monkeypatch):
    assert launch.choose_devices(_device_args(device="cpu")) == launch.Devices(llm="cpu", decoder="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    split = launch.choose_devices(_device_args(llm_device="cuda:0", decoder_device="cuda:1"))
    assert split == launch.Devices(llm="cuda:0", decoder="cuda:1")
    assert launch.choose_devices(_device_args(device="cuda:1", llm_device="cuda:0")).decoder == "cuda:1"
    with pytest.raises(DeviceError, match="--decoder-device cuda:2: there are only 2 CUDA devices"):
        launch.choose_devices(_device_args(llm_device="cuda:0", decoder_device="cuda:2"))
    with pytest.raises(DeviceError, match="--llm-device npu:0: "):
        launch.choose_devices(_device_args(llm_device="npu:0"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--llm-device", "tpu:0"], "--llm-device tpu:0: "),
        (["--decoder-device", "cuda:7", "--device", "cpu"], "--decoder-device cuda:7: "),
        (["--layout", "three-process"], "invalid choice"),
    ],
)
def test_the_launcher_refuses_unknown_devices_and_layouts_before_starting_anything(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: started.append(a))
    with pytest.raises(SystemExit) as exited:
        launch.main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err and not started


def test_the_one_process_command_refuses_a_bad_llm_device(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exited:
        web_demo.main(["--device", "cpu", "--in-process-engine", "--llm-device", "cuda:1"])
    assert exited.value.code == 2
    assert "--llm-device cuda:1: there are only 1 CUDA devices" in capsys.readouterr().err
    args = web_demo.build_parser().parse_args(["--device", "cpu", "--in-process-engine"])
    assert web_demo.llm_device(args) == "cpu" and args.max_concurrent_streams >= 1  # the engine's flags too
    assert not web_demo.build_parser().parse_args([]).in_process_engine  # the two-process layout by default


def _command(checkpoints, port: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "web_demo.py"), "--in-process-engine", "--host", "127.0.0.1",
            "--port", str(port), "--model-path", str(checkpoints.llm), "--tokenizer-path",
            str(checkpoints.speech_tokenizer), "--flow-path", str(checkpoints.decoder), "--device", "cpu",
            "--dtype", "float32", *extra]  # fmt: skip


@pytest.mark.slow
def test_one_process_serves_the_page_and_the_api_through_the_in_process_engine(tiny_checkpoints):
    port = free_port()
    command = _command(tiny_checkpoints, port, "--max-concurrent-streams", "2", "--max-seq-len", "1024")
    with ServerProcess(command, f"http://127.0.0.1:{port}/", timeout=WAIT_S) as process:
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=60).status_code == 200
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)

        def ask(seed: int):
            return client.chat.completions.create(
                model="glm-4-voice-9b", messages=[{"role": "user", "content": "Hello there"}],
                modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"},
                max_completion_tokens=60, seed=seed,
            )  # fmt: skip

        with ThreadPoolExecutor(2) as pool:  # two at once: both engine slots
            answers = list(pool.map(ask, [1, 2]))
        for answer in answers:
            assert answer.usage.completion_tokens > 0
            assert answer.choices[0].finish_reason in ("stop", "length")
        log = process.log()
        assert "one process: LLM engine on cpu" in log and "in-process://engine" in log
        assert "engine ready on cpu" in log


class _DyingBackend:
    """A token backend whose engine dies right after it started (as a worker whose device failed)."""

    is_token_backend = True

    def __init__(self, folder):
        import json

        self.checkpoint_folder = folder
        self.vocab_size = json.loads((folder / "config.json").read_text())["padded_vocab_size"]
        self.callbacks = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def stats(self) -> dict:
        return {"running": 0.0}

    def add_failure_callback(self, callback) -> None:
        self.callbacks.append(callback)
        asyncio.get_running_loop().call_soon(callback, RuntimeError("the device failed (test)"))

    def submit(self, prompt_ids, request):
        raise AssertionError("not reached")


@pytest.mark.slow
def test_a_dead_engine_ends_the_one_process_demo_with_the_restart_code(tiny_checkpoints, monkeypatch, caplog):
    from glm4voice.server import engine_backend

    monkeypatch.setattr(engine_backend, "build_engine", lambda settings: _DyingBackend(tiny_checkpoints.llm))
    argv = _command(tiny_checkpoints, free_port())[2:]
    assert web_demo.main(argv) == ENGINE_FAILED_EXIT_CODE
    assert "the engine failed (RuntimeError: the device failed (test))" in caplog.text


@pytest.mark.slow
def test_the_launcher_runs_the_one_process_layout_and_stops_it(tiny_checkpoints, tmp_path):
    port, server_port = free_port(), free_port()
    command = [sys.executable, "-m", "glm4voice.launch", "--layout", "one-process", "--port", str(port),
               "--server-port", str(server_port), "--tiny-dir", str(tiny_checkpoints.root),
               "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    log = tmp_path / "launch.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + WAIT_S
        while f"GLM-4-Voice demo: http://localhost:{port}" not in log.read_text(errors="replace"):
            assert launcher.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=60).status_code == 200
        with pytest.raises(httpx.ConnectError):  # no token server port in this layout
            httpx.get(f"http://127.0.0.1:{server_port}/health", timeout=5)
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        assert len(children) == 1 and b"--in-process-engine" in Path(f"/proc/{children[0]}/cmdline").read_bytes()
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            code = launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            raise
    console = log.read_text(errors="replace")
    assert code == 0, console
    assert "starting the one-process demo" in console and "--llm-device cpu" in console
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
