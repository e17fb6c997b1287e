"""Helpers for system tests: free loopback ports and real server processes."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

UNTIL_S = 120.0
"""How long :func:`until` waits before it fails: only a broken product waits this long."""


async def until(condition, what: str = "condition not met in time", timeout: float = UNTIL_S) -> None:
    """Wait (on the running event loop, which keeps serving) until ``condition()`` is true; fail with
    ``what`` if it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """Start a command (a real server) and wait until ``ready_url`` answers 200.

    Use as a context manager; the process is stopped (SIGTERM, then SIGKILL) on exit and its
    output is kept in ``self.log_path`` for failure messages.

    Each process gets a Gradio folder of its own (``GRADIO_TEMP_DIR``, ``self.gradio_temp_dir``,
    removed when it stops): Gradio's default ``/tmp/gradio`` is shared by every process of the
    machine, and a page that stops deletes the files it cached there, including the same files
    (same content, same path) that a page of a parallel test run is still using.

    ``nofile``: the process's open-file limit (soft and hard), as on a machine with ``ulimit -n`` that
    low. ``probe_timeout``: the least time one readiness request is given (each may take until the
    overall deadline: a page renders slowly on a loaded machine).
    """

    def __init__(
        self,
        args: list[str],
        ready_url: str,
        timeout: float = 120.0,
        env: dict | None = None,
        nofile: int | None = None,
        probe_timeout: float = 2.0,
    ):
        self.args = [sys.executable, *args] if args and args[0].endswith(".py") else args
        self.ready_url = ready_url
        self.timeout = timeout
        self.nofile = nofile
        self.probe_timeout = probe_timeout
        self.gradio_temp_dir = Path(tempfile.mkdtemp(prefix="gradio-"))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                    "GRADIO_TEMP_DIR": str(self.gradio_temp_dir), **(env or {})}  # fmt: skip
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.gradio_temp_dir.mkdir(exist_ok=True)
        limit = (
            None if self.nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile,) * 2))
        )
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=limit)  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:  # a loaded machine may take seconds to render a page: wait for the answer
                timeout = max(self.probe_timeout, deadline - time.monotonic())
                if httpx.get(self.ready_url, timeout=timeout).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready at {self.ready_url} after {self.timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        shutil.rmtree(self.gradio_temp_dir, ignore_errors=True)

    def wait_exit(self, timeout: float) -> int:
        """The exit code of a process that stops by itself (TimeoutError if it does not)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the server did not exit within {timeout} s:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]
