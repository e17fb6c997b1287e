"""What the GPU's users did during a Poisson rate of bench/e2e.py: every decoder call, every answer's
last decode (``finish``) and, in the one-process layout, every prefill chunk of the engine, as
``[start, end, size]`` in seconds on the rate's clock (the event loop's, ``time.monotonic``), and
when the event loop itself woke up late. Each slow turn's figures then list what overlapped its slow
block (``bench/e2e_load.what_overlapped``): a call of later blocks it waited for, finishes run
before it, a prefill sharing the GPU with its decode, or the loop too busy to start the next call.

The recorders wrap the instances' methods for the rate and take the wrappers off afterwards; the
product code is untouched."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

LOOP_PROBE_S = 0.005
"""How often :func:`loop_lags` wakes up on the event loop."""
LOOP_LAG_S = 0.02
"""A wake-up this much later than asked is recorded (:func:`loop_lags`)."""


@contextlib.contextmanager
def timed_calls(owner: Any, method: str, t0: float, size: Callable[[tuple, dict], int]) -> Iterator[list[list[float]]]:
    """While the body runs, each call of ``owner.method`` (any thread) appends ``[start, end, size]``
    (seconds after ``t0`` on ``time.monotonic``, ``size(args, kwargs)``) to the list yielded."""
    if method in vars(owner):
        raise RuntimeError(f"{type(owner).__name__}.{method} is already wrapped")
    original = getattr(owner, method)
    calls: list[list[float]] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        amount = size(args, kwargs)  # before the call, which may consume it
        start = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:  # list.append is atomic: the decoder's and the engine's threads both append
            calls.append([round(start - t0, 4), round(time.monotonic() - t0, 4), amount])

    setattr(owner, method, timed)
    try:
        yield calls
    finally:
        delattr(owner, method)


@contextlib.contextmanager
def gpu_timeline(decoder: Any, runner: Any | None, t0: float) -> Iterator[dict[str, list[list[float]]]]:
    """``decoder_calls`` (``feed_many``: blocks in the call), ``finishes`` (``finish``: an answer's
    last tokens and held-back tail, decoded alone; size: the tokens pending)
    and, given the engine's runner, ``prefills`` (``prefill``: prompt tokens in the chunk), recorded
    while the body runs. A prefill's end is the host's: a chunk that samples no token may still be on
    the GPU after it."""
    with contextlib.ExitStack() as stack:
        timeline = {
            "decoder_calls": stack.enter_context(timed_calls(decoder, "feed_many", t0, _jobs)),
            "finishes": stack.enter_context(timed_calls(decoder, "finish", t0, _pending)),
        }
        if runner is not None:
            timeline["prefills"] = stack.enter_context(timed_calls(runner, "prefill", t0, _chunk))
        yield timeline


def _jobs(args: tuple, kwargs: dict) -> int:
    """Blocks in a ``feed_many(jobs, ...)`` call."""
    return len(args[0] if args else kwargs["jobs"])


def _pending(args: tuple, kwargs: dict) -> int:
    """Tokens a ``finish(stream)`` call decodes (the stream's pending ones)."""
    stream = args[0] if args else kwargs["stream"]
    return len(getattr(getattr(stream, "state", stream), "pending", ()))


def _chunk(args: tuple, kwargs: dict) -> int:
    """Prompt tokens in a ``prefill(slot, ids, start, ...)`` call."""
    return len(args[1] if len(args) > 1 else kwargs["ids"])


async def loop_lags(t0: float, until: asyncio.Event, lags: list[list[float]]) -> None:
    """Until ``until`` is set, sleep :data:`LOOP_PROBE_S` at a time and append ``[asked, woke, ms late]``
    (seconds after ``t0`` on the loop's clock) for each wake-up at least :data:`LOOP_LAG_S` late: the
    times the event loop, which hands the decoder its next call and the listeners their audio, was
    busy elsewhere."""
    loop = asyncio.get_running_loop()
    while not until.is_set():
        asked = loop.time()
        await asyncio.sleep(LOOP_PROBE_S)
        late = loop.time() - asked - LOOP_PROBE_S
        if late >= LOOP_LAG_S:
            lags.append([round(asked - t0, 4), round(loop.time() - t0, 4), round(late * 1000)])
