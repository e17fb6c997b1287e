"""The harness every benchmark in bench/ shares: what machine ran it, sections under a time budget,
timing that waits for the GPU, and results written as JSON.

    run = BenchRun(out="result.json", budget_s=540)
    run.record("machine", machine_info(device, config="published"))
    run.section("first_block", measure_first_block, need_s=30)   # skipped if less time is left
    seconds = timed(lambda: model(x), device, iters=10, warmup=3)

Torch is imported only inside the functions that need it (bench/server.py is a plain HTTP client).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any


def log(*parts: Any) -> None:
    """Progress on stdout, flushed at once (benchmarks run for minutes, often under a pipe)."""
    print(*parts, flush=True)


# --- the machine ----------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine()
            )
    except OSError:
        return platform.processor() or platform.machine()


def command_line() -> str:
    """How this benchmark was started (the interpreter's name, then the arguments)."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def machine_info(device: Any = None, **extra: Any) -> dict[str, Any]:
    """Date, command, Python, OS, CPU; with a ``device``, torch's and transformers' versions, torch's
    threads and the GPU (name, memory, CUDA version); then ``extra`` (the benchmark's own settings)."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if device is not None:
        import torch

        device = torch.device(device)
        info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        try:
            import transformers

            info["transformers"] = transformers.__version__
        except ImportError:
            pass
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1e9, 1), "cuda": torch.version.cuda}
    return info | extra


def machine_line(info: dict[str, Any]) -> str:
    """:func:`machine_info` as one line for a text report."""
    parts = [info["system"], f"{info['cpu']} ({info['cpu_count']} cores)"]
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']} ({info['gpu_memory_gb']} GB, CUDA {info['cuda']})")
    versions = [f"Python {info['python']}"] + [f"{k} {info[k]}" for k in ("torch", "transformers") if k in info]
    return ", ".join(parts + versions)


# --- timing ---------------------------------------------------------------------------------------------


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: Any) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds, the device's queued work included on both ends."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started


def timed(fn: Callable[[], Any], device: Any, iters: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_call(fn, device)[1] for _ in range(iters)]


def median(values: Iterable[float | None], digits: int = 4) -> float | None:
    """The median of the values that are not None, rounded (None if there are none)."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), digits) if present else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- results --------------------------------------------------------------------------------------------


class BenchRun:
    """The results of one benchmark run, by section, in order. Written to ``out`` (JSON) after every
    section, so a run that is cut short keeps what it measured. ``budget_s``: the run's time budget;
    a section that needs more than what is left is skipped (and says so in the results)."""

    def __init__(self, out: str | os.PathLike | None = None, budget_s: float | None = None):
        self.out = Path(out) if out else None
        self.budget_s = budget_s
        self.started = time.monotonic()
        self.results: dict[str, Any] = {}

    def left_s(self) -> float:
        """Seconds left of the budget (infinite without one)."""
        if self.budget_s is None:
            return float("inf")
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        if self.out is not None:
            self.out.write_text(json.dumps(self.results, indent=2, default=str))

    def record(self, name: str, value: Any) -> None:
        """A section's result, measured by the caller."""
        self.results[name] = value
        log(f"[{name}] {json.dumps(value, default=str)}")
        self.save()

    def section(self, name: str, fn: Callable[[], dict], need_s: float = 0.0) -> dict:
        """Run ``fn`` (a dict of figures) unless less than ``need_s`` of the budget is left. A failing
        section records its error and the run goes on: one broken section must not lose the rest."""
        skipped = self._skipped(name, need_s)
        if skipped is not None:
            return skipped
        started = time.monotonic()
        try:
            result = fn()
        except Exception as error:
            result = _failed(error)
        return self._finished(name, result, started)

    async def section_async(self, name: str, fn: Callable[[], Awaitable[dict]], need_s: float = 0.0) -> dict:
        """:meth:`section` for a coroutine function."""
        skipped = self._skipped(name, need_s)
        if skipped is not None:
            return skipped
        started = time.monotonic()
        try:
            result = await fn()
        except Exception as error:
            result = _failed(error)
        return self._finished(name, result, started)

    def _skipped(self, name: str, need_s: float) -> dict | None:
        """The recorded skip of a section that needs more than the budget left, else None."""
        left = self.left_s()
        if left >= need_s:
            log(f"[{name}] ...")
            return None
        result = {"skipped": f"{left:.0f} s left, needs ~{need_s:.0f} s"}
        self.record(name, result)
        return result

    def _finished(self, name: str, result: dict, started: float) -> dict:
        result = {**result, "section_s": round(time.monotonic() - started, 1)}
        self.record(name, result)
        return result


def _failed(error: Exception) -> dict:
    """A failed section's result (its traceback goes to the log)."""
    log(traceback.format_exc())
    return {"error": f"{type(error).__name__}: {error}"}
