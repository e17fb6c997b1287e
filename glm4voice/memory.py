"""Where a process's GPU memory goes, by part: for the startup log and the benchmarks.

Each component names what it holds (:class:`MemoryOwners`): the tensors it keeps for its whole life
(weights, the KV cache), the private memory pool of its CUDA graphs, and the CUDA stream it runs on.
:func:`memory_report` puts the owners of one process together with what torch's caching allocator
says about the device:

- ``parts_gb``: the bytes of each part's tensors (counted from the tensors themselves, so this works
  on a CPU too);
- ``allocated_gb`` / ``reserved_gb`` (and their peaks): memory in live tensors, and memory the
  allocator holds from the driver, which is what ``nvidia-smi`` shows for the process minus its CUDA
  context;
- ``reserved_by_pool_gb``: the reserved memory of each component's graph pool (intermediate tensors
  of its captured graphs) and of the default pool;
- ``default_pool_by_stream_gb``: the default pool's reserved memory by the stream that allocated it.
  The allocator reuses a freed block only for the stream it was allocated on: memory cached for a
  stream that is no longer used (a warm-up's side stream) stays reserved until
  :func:`release_cached` gives it back.

Torch is imported inside the functions (the launcher builds its parser before loading torch).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

GB = 1e9
"""Decimal gigabytes, as nvidia-smi's MiB are converted for the benchmarks' GB figures."""
DEFAULT_POOL = "default"
OTHER_POOLS = "other graph pools"
DEFAULT_STREAM = "default stream"
OTHER_STREAMS = "other streams"


@dataclass(frozen=True)
class MemoryOwners:
    """What one component holds on its device, by name."""

    parts: dict[str, int] = field(default_factory=dict)
    """Bytes of the tensors each part keeps (see :func:`tensor_bytes`)."""
    pools: dict[str, Any] = field(default_factory=dict)
    """CUDA graph pool handles (``torch.cuda.graph_pool_handle()``) by name."""
    streams: dict[str, Any] = field(default_factory=dict)
    """CUDA streams the component allocates on, by name."""

    def __add__(self, other: MemoryOwners) -> MemoryOwners:
        return MemoryOwners(
            {**self.parts, **other.parts}, {**self.pools, **other.pools}, {**self.streams, **other.streams}
        )


def tensor_bytes(*holders: Any) -> int:
    """Bytes of the distinct storages behind ``holders``: modules (their parameters and buffers),
    tensors, or iterables of either. A storage seen twice (a tied weight, a view) counts once."""
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: dict[tuple[str, int], int] = {}

    def add(tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):  # a torchao quantized weight: its inner tensors
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                if getattr(tensor, name) is not None:
                    add(getattr(tensor, name))
        elif tensor.device.type == "meta":  # no storage to tell views apart
            seen[("meta", id(tensor))] = tensor.numel() * tensor.element_size()
        else:
            storage = tensor.untyped_storage()
            seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()

    def visit(holder: Any) -> None:
        if holder is None:
            return
        if isinstance(holder, torch.nn.Module):
            for tensor in (*holder.parameters(), *holder.buffers()):
                add(tensor)
        elif isinstance(holder, torch.Tensor):
            add(holder)
        elif isinstance(holder, Mapping):
            for value in holder.values():
                visit(value)
        elif isinstance(holder, Iterable) and not isinstance(holder, (str, bytes)):
            for item in holder:
                visit(item)
        else:
            raise TypeError(f"cannot count the memory of a {type(holder).__name__}")

    for holder in holders:
        visit(holder)
    return sum(seen.values())


def memory_report(device: str | torch.device, owners: MemoryOwners) -> dict[str, Any]:
    """The figures described in the module docstring (GB, rounded to MB); on a CPU only the parts."""
    import torch

    device = torch.device(device)
    report: dict[str, Any] = {
        "device": str(device),
        "parts_gb": {name: _gb(size) for name, size in owners.parts.items()},
        "parts_total_gb": _gb(sum(owners.parts.values())),
    }
    if device.type != "cuda":
        return report
    stats = torch.cuda.memory_stats(device)
    allocated, reserved = stats.get("allocated_bytes.all.current", 0), stats.get("reserved_bytes.all.current", 0)
    report |= {
        "allocated_gb": _gb(allocated),
        "reserved_gb": _gb(reserved),
        "peak_allocated_gb": _gb(stats.get("allocated_bytes.all.peak", 0)),
        "peak_reserved_gb": _gb(stats.get("reserved_bytes.all.peak", 0)),
        "cached_free_gb": _gb(reserved - allocated),
        "allocated_outside_parts_gb": _gb(allocated - sum(owners.parts.values())),
    }
    by_pool, by_stream = split_segments(torch.cuda.memory_snapshot(), device, owners)
    report["reserved_by_pool_gb"] = {name: _gb(size) for name, size in by_pool.items()}
    report["default_pool_by_stream_gb"] = {name: _gb(size) for name, size in by_stream.items()}
    free, total = torch.cuda.mem_get_info(device)
    report["device_used_gb"] = _gb(total - free)  # every process on the device, CUDA contexts included
    return report


def split_segments(
    segments: Iterable[Mapping[str, Any]], device: torch.device, owners: MemoryOwners
) -> tuple[dict[str, int], dict[str, int]]:
    """Reserved bytes of ``device``'s allocator segments (``torch.cuda.memory_snapshot()``) by pool
    name, and those of the default pool by stream name."""
    pool_names = {tuple(handle): name for name, handle in owners.pools.items() if handle is not None}
    stream_names = {stream.cuda_stream: name for name, stream in owners.streams.items() if stream is not None}
    index = device.index if device.index is not None else 0
    by_pool: dict[str, int] = defaultdict(int)
    by_stream: dict[str, int] = defaultdict(int)
    for segment in segments:
        if segment.get("device", index) != index:
            continue
        size = int(segment["total_size"])
        pool = tuple(segment.get("segment_pool_id", (0, 0)))
        if pool in pool_names:
            by_pool[pool_names[pool]] += size
        elif any(pool):
            by_pool[OTHER_POOLS] += size
        else:
            by_pool[DEFAULT_POOL] += size
            stream = int(segment.get("stream", 0))
            by_stream[stream_names.get(stream, DEFAULT_STREAM if stream == 0 else OTHER_STREAMS)] += size
    return dict(by_pool), dict(by_stream)


def release_cached(device: str | torch.device, why: str) -> int:
    """Give the allocator's unused cached memory on ``device`` back to the driver (after a warm-up: its
    side streams' blocks are never reused) and log how much; returns the bytes released (0 on a CPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 0
    before = torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    released = before - torch.cuda.memory_reserved(device)
    logger.info("%s: released %.2f GB of cached GPU memory", why, released / GB)
    return released


def summary_line(report: Mapping[str, Any]) -> str:
    """One log line of a :func:`memory_report`."""
    parts = ", ".join(f"{name} {size:.2f}" for name, size in report["parts_gb"].items())
    line = f"memory on {report['device']} (GB): {parts}"
    if "reserved_gb" in report:
        pools = ", ".join(f"{name} {size:.2f}" for name, size in report["reserved_by_pool_gb"].items())
        line += (
            f"; allocated {report['allocated_gb']:.2f}, reserved {report['reserved_gb']:.2f} ({pools}),"
            f" cached free {report['cached_free_gb']:.2f}"
        )
    return line


def _gb(size: float) -> float:
    return round(size / GB, 3)
