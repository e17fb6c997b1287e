"""The token side of bench/e2e.py in either layout, behind one interface:

- :class:`ChildTokenServer` (``two-process``): ``bench/e2e_server.py`` in a child process, reached
  over HTTP by :class:`glm4voice.client.AsyncTokenClient` (as ``model_server.py`` + ``web_demo.py``);
- :class:`InProcessTokens` (``one-process``): the same backend (engine + forced answers) in the
  benchmark's own process, reached by :class:`glm4voice.client.InProcessTokenClient`
  (as ``web_demo.py --in-process-engine``): one CUDA context, the speech side on its high-priority stream;
- :class:`ExternalTokenServer` (``--token-server-url``): a token server someone else started with forced
  answers, e.g. Ray Serve's ingress (``bench/ray_e2e.py --serve-only``), reached over HTTP.

Both: ``await start()``, ``client(max_connections)``, ``await set_prefill_graphs(on)``,
``await engine_stats()``, ``memory_owners()`` (what the token side holds in this process), ``await stop()``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import free_port, log
from glm4voice.client import AsyncTokenClient, InProcessTokenClient, TokenServerError
from glm4voice.memory import MemoryOwners

ROOT = Path(__file__).resolve().parent.parent
TWO_PROCESS = "two-process"
ONE_PROCESS = "one-process"
LAYOUTS = (TWO_PROCESS, ONE_PROCESS)
SERVER_READY_TIMEOUT_S = 420
HEALTH_POLL_S = 0.5


def server_args(args: argparse.Namespace, tokenizer_dir: Path, port: int, max_streams: int) -> argparse.Namespace:
    """bench/e2e_server.py's arguments for this benchmark run."""
    return argparse.Namespace(
        host="127.0.0.1", port=port, tokenizer_dir=str(tokenizer_dir), config=args.config, device=args.llm_device,
        dtype=args.llm_dtype, quant_method=args.llm_quant_method, max_streams=max_streams, max_seq_len=args.max_seq_len, eager=False,
        reference=args.reference,
    )  # fmt: skip


class ChildTokenServer:
    layout = TWO_PROCESS

    def __init__(self, args: argparse.Namespace, tokenizer_dir: Path, log_path: Path, max_streams: int):
        self.options = server_args(args, tokenizer_dir, free_port(), max_streams)
        self.url = f"http://127.0.0.1:{self.options.port}"
        self.reference_url = self.url + "/reference"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start the child process (it loads and warms up on its own meanwhile: call early)."""
        if self.process is not None:
            return
        o = self.options
        command = [
            sys.executable, str(ROOT / "bench" / "e2e_server.py"), "--port", str(o.port), "--tokenizer-dir",
            o.tokenizer_dir, "--config", o.config, "--device", o.device, "--dtype", o.dtype, "--max-streams",
            str(o.max_streams), "--max-seq-len", str(o.max_seq_len),
        ] + ([] if o.reference else ["--no-reference"]) + (["--quant-method", o.quant_method] if o.quant_method else [])  # fmt: skip
        log(f"starting the token server: {' '.join(command)} (log: {self.log_path})")
        self._log = open(self.log_path, "w")  # noqa: SIM115 (open while the child process runs; closed in stop)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    async def start(self) -> dict:
        """Launch (unless done) and wait until the server is ready: its ``/health``."""
        self.launch()
        started = time.perf_counter()
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        async with AsyncTokenClient(self.url) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the token server exited with {self.process.returncode}; see {self.log_path}")
                try:
                    health = await client.health()
                    break
                except TokenServerError:
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(HEALTH_POLL_S)
        log(f"token server ready after {time.perf_counter() - started:.1f} s")
        return health

    def client(self, max_connections: int = 256) -> AsyncTokenClient:
        return AsyncTokenClient(self.url, max_connections=max_connections)

    async def set_prefill_graphs(self, on: bool) -> list[int]:
        async with httpx.AsyncClient(base_url=self.url) as control:
            answer = await control.post("/bench/prefill_graphs", json={"on": on})
            return answer.json().get("lengths", []) if answer.status_code == 200 else []

    async def engine_stats(self) -> dict:
        async with AsyncTokenClient(self.url) as client:
            return (await client.health())["engine"]

    def memory_owners(self) -> MemoryOwners:
        """Nothing in this process (the server's own log has its memory report)."""
        return MemoryOwners()

    async def stop(self) -> None:
        """Stop the child (and free its GPU memory); idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._log.close()


class InProcessTokens:
    layout = ONE_PROCESS
    reference_url = None

    def __init__(self, args: argparse.Namespace, tokenizer_dir: Path, max_streams: int):
        self.options = server_args(args, tokenizer_dir, free_port(), max_streams)
        self.server = None
        self._running = None

    async def start(self) -> dict:
        from bench.e2e_server import build_backend
        from glm4voice.server.inprocess import InProcessTokenServer

        started = time.perf_counter()
        log(f"building the engine in this process ({self.options.config}, {self.options.device}, {self.options.dtype})")
        self.backend, settings, tokenizer, _ = await asyncio.to_thread(build_backend, self.options)
        self.server = InProcessTokenServer(self.backend, settings, tokenizer)
        self._running = self.server.running()
        await self._running.__aenter__()  # load, warm-up, CUDA graphs (the event loop stays free meanwhile)
        log(f"in-process engine ready after {time.perf_counter() - started:.1f} s")
        return await self.client().health()

    def client(self, max_connections: int = 256):
        return InProcessTokenClient(self.server)

    async def set_prefill_graphs(self, on: bool) -> list[int]:
        return self.backend.set_prefill_graphs(on)

    async def engine_stats(self) -> dict:
        engine = self.backend.engine  # with the engine's pauses for first blocks (Engine.make_way)
        return self.backend.stats() | {
            "make_way_calls": engine.make_way_calls,
            "make_way_pauses": engine.make_way_pauses,
        }

    def memory_owners(self) -> MemoryOwners:
        """The engine's tensors, pool and stream: it runs in this process."""
        return self.backend.engine.memory_owners()

    async def stop(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            await running.__aexit__(None, None, None)


class ExternalTokenServer:
    """A running token server (not ours to start or stop), reached over HTTP."""

    layout = TWO_PROCESS
    reference_url = None

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def launch(self) -> None:
        """Nothing: it runs already."""

    async def start(self) -> dict:
        async with AsyncTokenClient(self.url) as client:
            return await client.health()

    def client(self, max_connections: int = 256) -> AsyncTokenClient:
        return AsyncTokenClient(self.url, max_connections=max_connections)

    async def set_prefill_graphs(self, on: bool) -> list[int]:
        return []  # not ours to switch

    async def engine_stats(self) -> dict:
        async with AsyncTokenClient(self.url) as client:
            return (await client.health())["engine"]

    def memory_owners(self) -> MemoryOwners:
        """Nothing in this process (the server's own log has its memory report)."""
        return MemoryOwners()

    async def stop(self) -> None:
        """Nothing: it belongs to whoever started it."""
