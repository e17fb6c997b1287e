"""Latency of the OpenAI-compatible API, next to the page path measured in the same run.

    python bench/openai_api.py                     # CPU: tiny random checkpoints, starts both servers
    python bench/openai_api.py --device cuda:0     # GPU: the same with the tiny checkpoints on the GPU
    python bench/openai_api.py --model-path LLM --tokenizer-path TOK --flow-path DEC --device cuda:0
    python bench/openai_api.py --server-url URL --web-url URL --model-path ... (servers already running)

What it measures (medians over ``--repeats`` turns, the spoken question ``bench/data/question_5s.wav``):

- ``page``: the page's path (:meth:`glm4voice.pipeline.VoiceChat.run_turn` in this process, the models
  loaded as ``web_demo.py`` loads them, the same token server): time to the first PCM from the turn's
  start with the whole recording;
- ``chat_completions``: ``POST /v1/chat/completions`` streamed (openai SDK, the question as input_audio
  wav): request sent -> first chunk with ``delta.audio.data``;
- ``realtime``: ``/v1/realtime`` with server VAD, the question and 1 s of silence sent faster than real
  time: the last ``speech_stopped`` received -> first ``response.output_audio.delta`` received (a pause
  inside the question may end a first turn early, whose answer the next words cancel at once);
- ``barge_in``: during an answer, a second question streamed at real-time pace (20 ms appends): the
  append holding its first speech sample sent -> ``response.done`` (cancelled) received; also when
  ``speech_started`` arrived, and where the VAD put the start (audio time, vs the known onset).

Times are taken when the client receives the raw message (before the SDK parses it). Each section's
difference to ``page`` is printed; the issue's bars are within 30 ms of the page's time to first audio
for both API paths, and barge-in within 150 ms (CPU) / 100 ms (H100).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from glm4voice.audio import load_audio

QUESTION = ROOT / "bench" / "data" / "question_5s.wav"
INTERRUPTION = "Wait, stop. Tell me about tea instead."
MODEL = "glm-4-voice-9b"
RATE = 24_000
SPEECH_FLOOR = 10 ** (-40 / 20)
READY_TIMEOUT_S = 600
WAIT_S = 300


def log(*parts) -> None:
    print(*parts, flush=True)


def median_ms(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(1000 * statistics.median(values), 1) if values else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    line = (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    try:
        import torch

        if torch.cuda.is_available():
            line += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return line


def pcm16_b64(samples: np.ndarray) -> str:
    return base64.b64encode(np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def speech_onset(samples: np.ndarray) -> int:
    return int(np.flatnonzero(np.abs(samples) > SPEECH_FLOOR)[0])


class Process:
    """A server child process, stopped with the bench."""

    def __init__(self, args: list[str], ready_url: str, log_path: Path):
        self.log_path = log_path
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep the caller's
        env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as out:
            self.process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{args[0]} exited:\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{args[0]} not ready after {READY_TIMEOUT_S} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="openai-bench-"))
        self.processes: list[Process] = []
        self.results: dict = {"machine": machine(), "command": "python bench/openai_api.py " + shlex.join(sys.argv[1:])}
        question = load_audio(QUESTION, None)
        self.question_wav = QUESTION.read_bytes()
        self.question_24k = load_audio(QUESTION, RATE).samples
        self.question_16k = load_audio(QUESTION).samples
        self.interruption_24k = self._interruption()
        log(f"machine: {self.results['machine']}")
        log(f"command: {self.results['command']}")
        log(f"question: {QUESTION.relative_to(ROOT)} ({question.duration:.2f} s)")

    def _interruption(self) -> np.ndarray:
        path = self.tmp / "interruption.wav"
        try:
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), INTERRUPTION], check=True, capture_output=True)
            return load_audio(path, RATE).samples
        except (OSError, subprocess.CalledProcessError):
            log("espeak-ng not found: the interruption is the question itself")
            return self.question_24k

    # --- servers -------------------------------------------------------------------------------------------

    def checkpoints(self) -> tuple[str, str, str]:
        a = self.args
        given = (a.model_path, a.tokenizer_path, a.flow_path)
        if all(given):
            return given
        if any(given):
            raise SystemExit(
                "give all three of --model-path, --tokenizer-path, --flow-path, or none (tiny checkpoints)"
            )
        from glm4voice.checkpoints import write_tiny_checkpoints

        tiny = write_tiny_checkpoints(self.tmp / "tiny", seed=0)
        log(f"tiny random checkpoints in {tiny.root}")
        return str(tiny.llm), str(tiny.speech_tokenizer), str(tiny.decoder)

    def start(self) -> None:
        a = self.args
        self.llm, self.tok, self.dec = self.checkpoints()
        if a.server_url is None:
            port = free_port()
            dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
            args = ["model_server.py", "--host", "127.0.0.1", "--port", str(port), "--model-path", self.llm,
                    "--device", a.device, "--dtype", dtype]  # fmt: skip
            self.processes.append(Process(args, f"http://127.0.0.1:{port}/health", self.tmp / "token-server.log"))
            a.server_url = f"http://127.0.0.1:{port}"
        if a.web_url is None:
            port = free_port()
            args = ["web_demo.py", "--host", "127.0.0.1", "--port", str(port), "--model-path", self.llm,
                    "--tokenizer-path", self.tok, "--flow-path", self.dec, "--server-url", a.server_url,
                    "--device", a.device]  # fmt: skip
            self.processes.append(Process(args, f"http://127.0.0.1:{port}/v1/models", self.tmp / "web.log"))
            a.web_url = f"http://127.0.0.1:{port}"
        log(f"token server {a.server_url}, web process {a.web_url} (logs in {self.tmp})")

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    # --- the page's path -----------------------------------------------------------------------------------

    async def page(self) -> dict:
        import torch

        from flow_inference import AudioDecoder
        from glm4voice.client import AsyncTokenClient
        from glm4voice.pipeline import GenerationOptions, UserSpeech, VoiceChat
        from glm4voice.text_tokenizer import GLMTokenizer
        from speech_tokenizer import SpeechTokenizer

        a = self.args
        dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
        decoder = AudioDecoder.from_pretrained(self.dec, device=a.device, dtype=dtype)
        if decoder.device.type == "cuda":
            decoder.warm_up((10, 20, 40, 80, 160), batch_sizes=decoder.graph_batch_sizes)
        speech_tokenizer = SpeechTokenizer.from_pretrained(self.tok, device=a.device)
        times = []
        async with AsyncTokenClient(a.server_url) as client:
            chat = VoiceChat(GLMTokenizer.from_pretrained(self.llm), speech_tokenizer, decoder, client)
            try:
                for n in range(a.warmup + a.repeats):
                    options = GenerationOptions(max_new_tokens=a.max_tokens, seed=n)
                    events = [e async for e in chat.run_turn(chat.new_session(), UserSpeech(QUESTION), options)]
                    if n >= a.warmup:
                        times.append(events[-1].timings.first_audio)
            finally:
                chat.close()
        return {"ttfa_ms": median_ms(times), "turns": len(times)}

    # --- chat completions ---------------------------------------------------------------------------------

    def chat_completions(self) -> dict:
        import openai

        a = self.args
        client = openai.OpenAI(base_url=a.web_url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        part = {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(self.question_wav).decode(), "format": "wav"},
        }
        times = []
        for n in range(a.warmup + a.repeats):
            sent = time.perf_counter()
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [part]}], modalities=["text", "audio"],
                audio={"voice": "alloy", "format": "pcm16"}, max_completion_tokens=a.max_tokens, seed=n, stream=True,
            )  # fmt: skip
            first = None
            for chunk in stream:
                if (
                    first is None
                    and chunk.choices
                    and chunk.choices[0].delta.audio
                    and chunk.choices[0].delta.audio.data
                ):
                    first = time.perf_counter() - sent
            if n >= a.warmup:
                times.append(first)
        return {"ttfa_ms": median_ms(times), "turns": len(times)}

    # --- realtime -----------------------------------------------------------------------------------------

    def _client(self):
        import openai

        url = self.args.web_url + "/v1"
        return openai.AsyncOpenAI(base_url=url, websocket_base_url=url.replace("http", "ws", 1), api_key="unused")

    @staticmethod
    async def _next(connection, *types: str) -> tuple[dict, float]:
        while True:
            raw = await connection.recv_bytes()
            received = time.perf_counter()
            event = json.loads(raw)
            if event["type"] in types:
                return event, received
            if event["type"] == "error":
                raise RuntimeError(f"error event: {event['error']}")

    async def realtime(self) -> dict:
        a = self.args
        silence = np.zeros(RATE, dtype=np.float32)
        audio = np.concatenate([self.question_24k, silence])
        times, segments = [], []
        for n in range(a.warmup + a.repeats):
            async with self._client().realtime.connect(model=MODEL) as connection:
                await connection.session.update(session={"type": "realtime", "max_output_tokens": a.max_tokens})
                for start in range(0, len(audio), RATE // 10):
                    await connection.input_audio_buffer.append(audio=pcm16_b64(audio[start : start + RATE // 10]))
                # the question has pauses the VAD may take for the end of the turn (the audio is sent faster
                # than real time, so the next words follow at once and cancel that answer): the clock
                # starts at the last speech_stopped before the answer that is heard
                stops = 0
                while True:
                    event, received = await self._next(
                        connection, "input_audio_buffer.speech_stopped", "response.output_audio.delta"
                    )
                    if event["type"] == "input_audio_buffer.speech_stopped":
                        stopped, stops = received, stops + 1
                    else:
                        first = received
                        break
                await connection.response.cancel()
                await self._next(connection, "response.done")
            if n >= a.warmup:
                times.append(first - stopped)
                segments.append(stops)
        return {"ttfa_from_speech_stopped_ms": median_ms(times), "turns": len(times), "speech_stops_per_turn": segments}

    async def barge_in(self) -> dict:
        a = self.args
        step = RATE // 50  # 20 ms appends at real-time pace
        onset = speech_onset(self.interruption_24k)
        lead_in = np.zeros(RATE // 5, dtype=np.float32)  # 200 ms of silence before the interruption
        interruption = np.concatenate([lead_in, self.interruption_24k, np.zeros(RATE, dtype=np.float32)])
        onset += len(lead_in)
        done_times, detect_times, vad_offsets = [], [], []
        for n in range(a.warmup + a.repeats):
            async with self._client().realtime.connect(model=MODEL) as connection:
                await connection.session.update(session={"type": "realtime", "max_output_tokens": 1800})
                audio = np.concatenate([self.question_24k, np.zeros(RATE, dtype=np.float32)])
                for start in range(0, len(audio), RATE // 10):
                    await connection.input_audio_buffer.append(audio=pcm16_b64(audio[start : start + RATE // 10]))
                await self._next(connection, "response.output_audio.delta")
                sent_before = len(audio)
                reader = asyncio.create_task(self._barge_in_events(connection))
                first_speech_sent = None
                began = time.perf_counter()
                for k, start in enumerate(range(0, len(interruption), step)):
                    due = began + k * step / RATE
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    await connection.input_audio_buffer.append(audio=pcm16_b64(interruption[start : start + step]))
                    if first_speech_sent is None and start + step > onset:
                        first_speech_sent = time.perf_counter()
                    if reader.done():
                        break
                started, started_at, done_at = await reader
                await connection.response.cancel()
            if n >= a.warmup:
                done_times.append(done_at - first_speech_sent)
                detect_times.append(started_at - first_speech_sent)
                start_ms = started["audio_start_ms"] + 300 - (sent_before + onset) * 1000 / RATE
                vad_offsets.append(start_ms / 1000)
        return {
            "first_speech_to_response_done_cancelled_ms": median_ms(done_times),
            "first_speech_to_speech_started_ms": median_ms(detect_times),
            "vad_start_minus_onset_audio_ms": median_ms(vad_offsets),
            "turns": len(done_times),
        }

    async def _barge_in_events(self, connection) -> tuple[dict, float, float]:
        started, started_at = await self._next(connection, "input_audio_buffer.speech_started")
        while True:
            event, received = await self._next(connection, "response.done")
            if event["response"]["status"] == "cancelled":
                return started, started_at, received

    # --- run ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.start()
            sections = [
                ("page", lambda: asyncio.run(self.page())),
                ("chat_completions", self.chat_completions),
                ("realtime", lambda: asyncio.run(self.realtime())),
                ("barge_in", lambda: asyncio.run(self.barge_in())),
            ]
            for name, measure in sections:
                if name in self.args.skip:
                    continue
                started = time.monotonic()
                self.results[name] = measure()
                log(f"{name}: {json.dumps(self.results[name])} ({time.monotonic() - started:.0f} s)")
            self.summary()
        finally:
            self.stop()
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.results, indent=2))
        return 0

    def summary(self) -> None:
        r = self.results
        page = r.get("page", {}).get("ttfa_ms")
        rows = [
            ("page: time to first audio", page),
            ("chat completions (streamed): request -> first delta.audio", r.get("chat_completions", {}).get("ttfa_ms")),
            ("realtime: speech_stopped -> first output_audio.delta", r.get("realtime", {}).get("ttfa_from_speech_stopped_ms")),
            ("barge-in: first speech frame -> response.done cancelled", r.get("barge_in", {}).get("first_speech_to_response_done_cancelled_ms")),
            ("barge-in: first speech frame -> speech_started", r.get("barge_in", {}).get("first_speech_to_speech_started_ms")),
        ]  # fmt: skip
        log("\nmedians (ms)")
        for label, value in rows:
            diff = ""
            if page is not None and value is not None and label.startswith(("chat", "realtime")):
                diff = f"   ({value - page:+.1f} vs page)"
            log(f"  {label:<62} {value if value is not None else '-':>8}{diff}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N, for the servers started and the page path")
    parser.add_argument("--model-path", help="glm-4-voice-9b folder (default: tiny random checkpoints)")
    parser.add_argument("--tokenizer-path", help="speech tokenizer folder")
    parser.add_argument("--flow-path", help="speech decoder folder")
    parser.add_argument("--server-url", help="a running model_server.py (default: start one)")
    parser.add_argument("--web-url", help="a running web_demo.py (default: start one)")
    parser.add_argument("--repeats", type=int, default=5, help="measured turns per section")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured turns first")
    parser.add_argument("--max-tokens", type=int, default=60, help="answer length of the TTFA turns")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip (page, chat_completions, ...)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    logging.basicConfig(level=logging.WARNING)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
