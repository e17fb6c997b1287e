"""Device and dtype names, resolved and checked in one place.

Command lines take their ``--device`` default and their dtype ``choices`` from here, and turn a
:class:`DeviceError` into a usage message. Torch is imported only inside the functions that need
it, so a command line can build its parser before it loads torch.

- Devices: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"auto"`` / None for :func:`default_device`
  (CUDA device 0 when this machine has a usable GPU, else the CPU).
- LLM dtypes: :data:`LLM_DTYPES` (the engine checks its configs against this tuple, so what
  ``model_server.py --dtype`` accepts is exactly what the engine implements).
- Decoder dtypes: the speech decoder's flow-estimator precisions (:data:`DECODER_DTYPES`), and
  ``"auto"`` (:func:`decoder_dtype`: bfloat16 on CUDA, where it meets real time, float32 on a CPU).
- Streams: :func:`high_priority_stream`, the CUDA stream the speech side (tokenizer, decoder) runs
  on, so that in a process that also runs the LLM engine its kernels go before the engine's.
- Memory: :func:`prefer_expandable_segments`, the CUDA allocator setting the servers start with.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AUTO = "auto"
DEVICE_TYPES = ("cpu", "cuda")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
INT8, FP8, INT4 = "int8", "fp8", "int4"
QUANTIZED_DTYPES = (INT8, FP8, INT4)
"""The LLM's quantized weight names (glm4voice.llm.quant: fused int8 weight-only, torchao fp8 and int4)."""
LLM_DTYPES = ("bfloat16", "float16", "float32", *QUANTIZED_DTYPES)
"""What the LLM engine builds (``glm4voice.llm.engine.ENGINE_DTYPES`` is this tuple)."""
DECODER_DTYPES = FLOAT_DTYPES
"""Precisions ``AudioDecoder(dtype=...)`` runs its flow estimator in (the rest stays float32)."""
DECODER_DTYPE_CHOICES = (AUTO, *DECODER_DTYPES)
"""``web_demo.py --decoder-dtype``."""
ALLOCATOR_ENV = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE_SEGMENTS = "expandable_segments:True"
HIGHEST_STREAM_PRIORITY = -(1 << 20)
"""A stream priority below every device's range: torch maps it to the highest one the device has
(lower numbers are higher priorities; an H100 offers 0 to -5)."""


class DeviceError(ValueError):
    """A device name this machine cannot use; the message says why and what to use instead."""


def default_device() -> str:
    """``"cuda:0"`` when torch sees a usable CUDA GPU, else ``"cpu"``."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None = AUTO) -> torch.device:
    """The torch device for ``name`` (None or ``"auto"``: :func:`default_device`), checked against
    this machine: :class:`DeviceError` for a malformed name, another device type, CUDA without a
    usable GPU, or a GPU index that does not exist."""
    import torch

    if name is None or name == AUTO:
        return torch.device(default_device())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"not a device name ({error}); use cuda, cuda:N or cpu") from error
    if device.type not in DEVICE_TYPES:
        raise DeviceError("use cuda, cuda:N or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("this machine has no usable CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"there are only {torch.cuda.device_count()} CUDA devices")
    return device


def device_name(device: str | torch.device) -> str:
    """What the device is, for people: the GPU's name, or the CPU's model name."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def llm_dtypes() -> tuple[str, ...]:
    """The weight dtypes the LLM engine implements (``--dtype`` choices of every command that loads it)."""
    return LLM_DTYPES


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` as a torch dtype (ValueError otherwise)."""
    import torch

    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def decoder_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The decoder's dtype for ``name`` (one of :data:`DECODER_DTYPE_CHOICES`) on ``device``:
    ``"auto"`` is bfloat16 on CUDA (meets real time) and float32 on a CPU (exact, and faster there)."""
    import torch

    if name == AUTO:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DECODER_DTYPES:
        raise ValueError(f"decoder dtype must be one of {', '.join(DECODER_DTYPE_CHOICES)}, got {name!r}")
    return torch_dtype(name)


def high_priority_stream(device: str | torch.device) -> torch.cuda.Stream:
    """A new CUDA stream on ``device`` with the highest priority the device offers. Where it and the
    LLM engine's (default-priority) streams both have kernels waiting, the GPU schedules its kernels
    first: the speech side of a one-process layout does not queue behind LLM steps. (Priorities act
    within one process, one CUDA context; separate processes time-slice the GPU whatever they set.)"""
    import torch

    return torch.cuda.Stream(torch.device(device), priority=HIGHEST_STREAM_PRIORITY)


def prefer_expandable_segments() -> None:
    """Let torch's CUDA caching allocator map memory in pages of growing segments
    (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) unless the user has set that variable. Call it
    before the process's first CUDA allocation. With whole segments, a free block shares its segment
    with live tensors and is never given back: a quantized load (16-bit staging copies and the
    quantizer's float32 temporaries between the weights it keeps) left the int4 demo's process holding
    about 0.9 GB more on an H100 than with expandable segments, whose free pages go back to the driver."""
    os.environ.setdefault(ALLOCATOR_ENV, EXPANDABLE_SEGMENTS)
