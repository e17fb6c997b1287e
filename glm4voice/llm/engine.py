"""Streaming generation engine for GLM-4-Voice-9B: continuous batching over a static KV cache.

Usage (inside an asyncio program)::

    engine = Engine.from_pretrained("THUDM/glm-4-voice-9b", EngineConfig(max_batch_size=32))
    await engine.start()                      # loads, allocates the cache, warms up, captures graphs
    stream = engine.submit(prompt_ids, SamplingParams(temperature=0.2, top_p=0.8, max_new_tokens=2000))
    async for token_id in stream:             # the stop token that ended the reply is yielded too
        ...
    stream.finish_reason                      # "stop" | "length" | "cancelled" | "error"
    await engine.stop()

Prefix caching (``EngineConfig.prefix_cache``, on by default): a finished stream's keys and values
stay in its cache slot until a new request needs the slot (least recently used first); a request
whose prompt starts with a cached sequence (prompt + reply) starts from there and prefills only
the rest, so a conversation's next turn costs its new tokens, not its whole history
(glm4voice.llm.prefix_cache; figures in EngineStats.prefix_*).

Concurrency model: one worker thread owns the model and the device. It blocks on a command queue
while there is nothing to do (no polling); otherwise each iteration it takes new commands,
admits waiting requests into free cache slots, runs up to ``prefill_chunk`` prompt tokens of
chunked prefill, then one batched decode step for every running stream (launched before the
previous step's tokens are read, so host work overlaps device work), and hands the new tokens to
the event loop with one ``call_soon_threadsafe`` per phase. The event loop never waits on the device.
A failure that belongs to requests ends only their streams, with :class:`GenerationError`: a
request whose sampling setup or prefill fails alone, the streams of a decode step that fails; the
worker goes on serving the others. The worker itself stops only on errors that leave the device
unusable (a CUDA error, or MAX_CONSECUTIVE_FAILURES failed steps in a row) or on a bug in its own
loop; then every stream ends with GenerationError, :attr:`Engine.dead` is true, :attr:`Engine.failure`
holds the error, and :meth:`Engine.wait_closed` / :meth:`Engine.add_failure_callback` tell the owner
(a server should exit non-zero so that a supervisor restarts it). Cancelling a stream frees its
slot before the next step.

Backpressure (``EngineConfig.max_unread_tokens``): a stream whose consumer has left that many tokens
unread is held: it keeps its slot but takes no decode steps (no device time) until the consumer has
read half of them. A slow HTTP client, or a voice pipeline whose decoder is far behind, then stops
generation for its own stream only; the others go on, and the worker sleeps if every stream is held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import operator
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from glm4voice.defaults import (
    LLM_DTYPE,
    MAX_SEQ_LEN,
    WIRE_MAX_NEW_TOKENS,
    WIRE_TEMPERATURE,
    WIRE_TOP_P,
    max_new_tokens_problem,
    seed_problem,
    temperature_problem,
    top_p_problem,
)
from glm4voice.devices import AUTO, LLM_DTYPES, default_device
from glm4voice.llm.checkpoint import DTYPES, LoadedModel, load_model
from glm4voice.llm.config import GLMConfig, context_limit
from glm4voice.llm.model import GLMModel
from glm4voice.llm.prefix_cache import PrefixCache
from glm4voice.llm.quant import QUANTIZED_DTYPES, check_supported, method_for
from glm4voice.llm.runner import (
    DEFAULT_GRAPH_BATCH_SIZES,
    DEFAULT_PREFILL_GRAPH_LENGTHS,
    DecodeRow,
    Launch,
    ModelRunner,
)
from glm4voice.memory import GB, MemoryOwners, memory_report, release_cached, summary_line, tensor_bytes

logger = logging.getLogger(__name__)

ENGINE_DTYPES = LLM_DTYPES
"""What ``--dtype`` accepts: float weights, or quantized ones (glm4voice.llm.quant: int8 weight-only
anywhere, fp8 on GPUs with float8 support, int4 weight-only on CUDA GPUs of compute capability 8.0+)."""
MAKE_WAY_LIMIT_S = 0.25
"""Longest pause of the worker for one :meth:`Engine.make_way` (a caller that hangs must not stop
generation)."""
SWITCH_INTERVAL_S = 0.0005
"""Python's thread switch interval while an engine runs (:func:`sys.setswitchinterval`; Python's
default is 5 ms, a larger setting is lowered to this, a smaller one kept). The worker releases the GIL
while it waits for a step on the device and must get it back to launch the next: with the default,
any Python thread of the process that holds it then (the event loop streaming tokens, the speech
side) could delay each step by up to 5 ms. On an H100 (fp8, one process with the speech side) the 23
tokens before a turn's first audio took 111-112 ms with 0.5 ms against 122-123 ms with 5 ms (two
runs each; bench/e2e.py's layouts section)."""
MAX_UNREAD_TOKENS = 64
"""Default :attr:`EngineConfig.max_unread_tokens`: about 3.4 s of a spoken answer (26 audio and 13 text
tokens per 2.08 s), a third of a second of generation for one stream on an H100; more than a consumer
that keeps up leaves unread, few enough that a consumer that waits on purpose (a paced voice turn,
``PipelineConfig.pace_generation``) soon stops its stream's generation."""
MAX_CONSECUTIVE_FAILURES = 16
"""Failed steps in a row (prefill or decode, no success between them) after which the device is
taken to be broken: the worker stops with an error instead of failing every request forever."""


# --- errors ------------------------------------------------------------------------------------------


class EngineError(RuntimeError):
    """Base of the engine's runtime errors."""


class EngineBusyError(EngineError):
    """The waiting queue is full; try again later (HTTP 503)."""


class EngineNotRunningError(EngineError):
    """submit() before start(), after stop(), or after the worker died."""


class EngineStoppedError(EngineError):
    """Raised from a stream that was still running when the engine stopped."""


class GenerationError(EngineError):
    """Raised from a stream whose generation failed; ``__cause__`` is the original error."""


class InvalidSamplingParams(ValueError):
    pass


class InvalidPromptError(ValueError):
    """The prompt is empty, too long for the cache, or holds ids outside the vocabulary."""


class PromptTooLongError(InvalidPromptError):
    pass


# --- parameters --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy; ``seed=None`` draws a random seed."""

    temperature: float = WIRE_TEMPERATURE
    top_p: float = WIRE_TOP_P
    max_new_tokens: int = WIRE_MAX_NEW_TOKENS
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    """Extra ids that end the reply, on top of the checkpoint's eos ids."""

    def __post_init__(self) -> None:
        for name, check in (("temperature", temperature_problem), ("top_p", top_p_problem),
                            ("max_new_tokens", max_new_tokens_problem), ("seed", seed_problem)):  # fmt: skip
            problem = check(getattr(self, name))  # bounds shared with the server and the page
            if problem is not None:
                raise InvalidSamplingParams(f"{name} {problem}")
        # plain floats from here on (an int temperature is fine; the device gets float32 of these)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        try:
            stop_ids = frozenset(operator.index(i) for i in self.stop_ids)
        except TypeError as error:
            raise InvalidSamplingParams(f"stop_ids must be integers, got {self.stop_ids!r}") from error
        if any(i < 0 for i in stop_ids):
            raise InvalidSamplingParams(f"stop_ids must be >= 0, got {sorted(stop_ids)}")
        object.__setattr__(self, "stop_ids", stop_ids)


@dataclass(frozen=True)
class EngineConfig:
    device: str = AUTO
    """"auto" (``glm4voice.devices.default_device()``: CUDA if present, else CPU), "cuda", "cuda:1", "cpu"."""
    dtype: str = LLM_DTYPE
    """bfloat16 | float16 | float32, or quantized weights (activations bfloat16 on CUDA, float32 on
    the CPU): int8 (weight-only, per channel), fp8 (float8 weights and activations, compute
    capability >= 8.9), int4 (weight-only, groups of 128; CUDA only). See glm4voice.llm.quant."""
    quant_method: str | None = None
    """How a quantized dtype is implemented (glm4voice.llm.quant.METHODS, e.g. "torchao" for int8,
    "weight_only" for fp8, "hqq" for int4); None: the dtype's default."""
    max_batch_size: int = 64
    """Concurrent streams (KV cache slots)."""
    max_seq_len: int = MAX_SEQ_LEN
    """Prompt + reply tokens per stream (capped by the checkpoint's seq_length)."""
    max_queue: int = 256
    """Requests waiting for a slot before submit() raises EngineBusyError."""
    prefill_chunk: int = 512
    """Prompt tokens processed between two decode steps (bounds the stall of running streams)."""
    cuda_graph_batch_sizes: tuple[int, ...] = DEFAULT_GRAPH_BATCH_SIZES
    prefill_graph_lengths: tuple[int, ...] = DEFAULT_PREFILL_GRAPH_LENGTHS
    """Prompt lengths (padded up to one of these, capped at ``prefill_chunk``) whose whole-prompt
    prefill is replayed as a CUDA graph: a short prompt's prefill is host-bound in eager mode
    (~40 ms for 150 tokens of the 9B model on an H100). Empty: always eager."""
    prefix_cache: bool = True
    """Keep a finished stream's keys and values in its slot until a new request needs the slot, and
    start a request whose prompt begins with a cached sequence (prompt + reply) from there: a
    conversation's next turn prefills only its new tokens (see glm4voice.llm.prefix_cache)."""
    eager: bool = False
    """No torch.compile and no CUDA graphs (the debugging fallback)."""
    compile: bool | None = None
    """torch.compile the per-token layer functions; None = on CUDA unless eager."""
    warmup: bool = True
    max_unread_tokens: int | None = MAX_UNREAD_TOKENS
    """A stream whose consumer leaves this many generated tokens unread takes no decode steps until it
    has read half of them (see the module docstring); None: generate regardless."""

    def __post_init__(self) -> None:
        if self.dtype not in ENGINE_DTYPES:
            raise ValueError(f"dtype must be one of {ENGINE_DTYPES}, got {self.dtype!r}")
        method_for(self.dtype, self.quant_method)  # ValueError for a method this dtype does not have
        for name in ("max_batch_size", "max_seq_len", "max_queue", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        unread = self.max_unread_tokens
        if unread is not None and (isinstance(unread, bool) or not isinstance(unread, int) or unread < 2):
            raise ValueError(f"max_unread_tokens must be an integer >= 2 or None, got {unread!r}")
        if any(not isinstance(b, int) or b < 1 for b in self.cuda_graph_batch_sizes):
            raise ValueError(f"cuda_graph_batch_sizes must be positive integers, got {self.cuda_graph_batch_sizes}")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.prefill_graph_lengths):
            raise ValueError(f"prefill_graph_lengths must be positive integers, got {self.prefill_graph_lengths}")

    def prefill_graph_sizes(self) -> tuple[int, ...]:
        """The prefill graph lengths in use: those below ``prefill_chunk``, and the chunk itself."""
        if not self.prefill_graph_lengths:
            return ()
        return tuple(sorted({n for n in self.prefill_graph_lengths if n < self.prefill_chunk} | {self.prefill_chunk}))

    def torch_device(self) -> torch.device:
        device = torch.device(default_device() if self.device == AUTO else self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def activation_dtype(self) -> torch.dtype:
        if self.dtype in QUANTIZED_DTYPES:
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def check_supported(self) -> None:
        """:class:`glm4voice.llm.quant.QuantizationUnsupported` (a ValueError) if the dtype cannot
        run on the device, with what can (fp8 without float8 support, int4 on the CPU)."""
        if self.dtype in QUANTIZED_DTYPES:
            check_supported(self.dtype, self.torch_device(), self.quant_method)

    def use_compile(self) -> bool:
        if self.eager:
            return False
        return self.torch_device().type == "cuda" if self.compile is None else self.compile

    def use_cuda_graphs(self) -> bool:
        return not self.eager and self.torch_device().type == "cuda"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class EngineStats:
    running: bool
    active_streams: int
    """Requests holding a cache slot (prefilling, decoding or held)."""
    queued: int
    """Requests waiting for a slot."""
    tokens_generated: int
    prompt_tokens: int
    """Prompt tokens run through the model (prefix-cache hits excluded: see prefix_tokens_reused)."""
    requests_finished: int
    requests_failed: int
    decode_steps: int
    prefill_chunks: int
    decode_seconds: float
    """Worker time spent in decode steps (device work and its launch)."""
    prefill_seconds: float
    prefix_hits: int = 0
    """Requests that started from keys and values already in the cache (a cached prefix)."""
    prefix_tokens_reused: int = 0
    """Prompt tokens not computed because the cache held them."""
    prefix_evictions: int = 0
    """Cached sequences dropped to make room for a request (least recently used first)."""
    held_streams: int = 0
    """Streams held because their consumers left ``max_unread_tokens`` unread (no decode steps)."""
    holds: int = 0
    """Times a stream was held so far."""


@dataclass
class _Counters:
    """The worker's running totals (read by :meth:`Engine.stats`)."""

    tokens: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    failed: int = 0
    decode_steps: int = 0
    prefill_chunks: int = 0
    decode_seconds: float = 0
    prefill_seconds: float = 0
    holds: int = 0
    prefix_hits: int = 0
    prefix_tokens_reused: int = 0
    prefix_evictions: int = 0


# --- streams -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _End:
    reason: FinishReason
    error: BaseException | None = None


class GenerationStream:
    """Async iterator of generated token ids for one request. ``cancel()`` ends it (and frees its
    cache slot before the next step); ``finish_reason`` is set once it has ended. Use as
    ``async with engine.submit(...) as stream:`` to cancel automatically on early exit."""

    def __init__(self, engine: Engine, request_id: int, prompt_len: int, params: SamplingParams) -> None:
        self._engine = engine
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.params = params
        self.finish_reason: FinishReason | None = None
        self.tokens_generated = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._closed = False
        self._unread = 0  # tokens in the queue (event loop side, like the queue)
        self._hold_asked = False  # the worker was asked to hold this stream and not yet to resume it

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> int:
        if self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if self._closed:  # cancelled while waiting
            raise StopAsyncIteration
        if isinstance(item, int):
            self._unread -= 1
            limit = self._engine.config.max_unread_tokens
            if self._hold_asked and limit is not None and self._unread <= limit // 2:
                self._hold_asked = False
                self._engine._command("resume", self.request_id)
            return item
        self._closed = True
        self.finish_reason = item.reason
        if item.error is not None:
            raise item.error
        raise StopAsyncIteration

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating (idempotent; no effect on a finished stream)."""
        if self.finish_reason is not None:
            return
        self.finish_reason = FinishReason.CANCELLED
        self._closed = True
        self._queue.put_nowait(_End(FinishReason.CANCELLED))
        self._engine._cancel(self.request_id)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def _push(self, token: int | None, end: _End | None) -> None:
        if self.finish_reason is FinishReason.CANCELLED:
            return
        if token is not None:
            self.tokens_generated += 1
            self._unread += 1
            self._queue.put_nowait(token)
        if end is not None:
            self._queue.put_nowait(end)
        elif not self._hold_asked and token is not None:
            limit = self._engine.config.max_unread_tokens
            if limit is not None and self._unread >= limit:
                self._hold_asked = True
                self._engine._command("hold", self.request_id)


@dataclass(eq=False)
class _Request:
    id: int
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    stream: GenerationStream
    slot: int = -1
    prefilled: int = 0
    generated: int = 0
    last_token: int = -1

    @property
    def position(self) -> int:
        """Position of ``last_token`` (where the next decode step writes its key/value)."""
        return len(self.prompt) + self.generated - 1


_Event = tuple[GenerationStream, "int | None", "_End | None"]


# --- engine ------------------------------------------------------------------------------------------


class Engine:
    """See the module docstring. Construct with :meth:`from_pretrained` (a folder or hub id) or
    :meth:`from_model` (an already loaded :class:`GLMModel`)."""

    def __init__(
        self,
        source: str | Path | LoadedModel,
        config: EngineConfig | None = None,
        *,
        stop_ids: Iterable[int] | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.config.check_supported()  # before anything is loaded: the error names what works instead
        self._source = source
        self._stop_override = None if stop_ids is None else frozenset(int(i) for i in stop_ids)
        self._loaded: LoadedModel | None = source if isinstance(source, LoadedModel) else None
        self._runner: ModelRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._running = False
        self._accepting = False  # the worker takes submissions; set and cleared under _lock
        self._fatal: BaseException | None = None
        self._closed: asyncio.Future | None = None
        self._failure_callbacks: list[Callable[[BaseException], object]] = []
        self._failures_in_a_row = 0
        self._next_id = 0
        self._lock = threading.Lock()
        self._queued = 0
        self._open: set[int] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        # make_way(): callers inside it, how many have asked, how many the worker has paused for
        self._way_clear = threading.Event()
        self._way_clear.set()
        self._way_holders = 0
        self._way_asked = 0
        self._way_honoured = 0
        self._way_pauses = 0
        self._way_starting = 0  # the largest starting_tokens of the callers inside (under _lock)
        self._way_wake = threading.Event()  # a pausing worker's wake-up: the way is clear, or a request came
        self._way_until: float | None = None  # worker: end of the current pause (None: not pausing)
        # worker-side state
        self._waiting: collections.deque[_Request] = collections.deque()
        self._prefilling: list[_Request] = []
        self._decoding: list[_Request] = []
        self._held: list[_Request] = []  # decoding, but their consumers are behind (backpressure)
        self._prefix: PrefixCache | None = None
        self._inflight: tuple[list[_Request], Launch] | None = None
        self._counters = _Counters()

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, config: EngineConfig | None = None, **kwargs) -> Engine:
        return cls(path_or_id, config, **kwargs)

    @classmethod
    def from_model(cls, model: GLMModel, config: EngineConfig | None = None, *, stop_ids: Iterable[int] = ()) -> Engine:
        loaded = LoadedModel(model, model.config, frozenset(int(i) for i in stop_ids), Path("."))
        return cls(loaded, config, stop_ids=stop_ids)

    # --- properties ---------------------------------------------------------------------------------
    @property
    def model_config(self) -> GLMConfig:
        return self._require_loaded().config

    @property
    def stop_ids(self) -> frozenset[int]:
        loaded = self._require_loaded()
        return self._stop_override if self._stop_override is not None else loaded.stop_ids

    @property
    def max_seq_len(self) -> int:
        """Positions per stream (prompt + reply): ``config.max_seq_len``, capped by config.json's
        ``seq_length`` if it states one (:func:`glm4voice.llm.config.context_limit`; logged at start)."""
        return context_limit(self._require_loaded().config, self.config.max_seq_len)[0]

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def running(self) -> bool:
        return self._running and self._fatal is None

    @property
    def failure(self) -> BaseException | None:
        """Why the worker died (or why start() failed); None while it runs and after a clean stop()."""
        return self._fatal

    @property
    def dead(self) -> bool:
        """The worker ended on an error (not by stop()): every later submit() raises
        EngineNotRunningError. The owning process should exit non-zero (see :meth:`wait_closed`)."""
        return self._fatal is not None

    async def wait_closed(self) -> BaseException | None:
        """Until the worker thread has ended: None after :meth:`stop`, the error if it died.
        A server runs this as a task and exits non-zero when it returns an error."""
        if self._closed is None:
            raise EngineNotRunningError("the engine has not been started")
        return await asyncio.shield(self._closed)

    def add_failure_callback(self, callback: Callable[[BaseException], object]) -> None:
        """Call ``callback(error)`` on the event loop if the worker dies (at once if it already has).
        Not called after a clean :meth:`stop`."""
        if self._fatal is not None and self._closed is not None and self._closed.done():
            callback(self._fatal)
        else:
            self._failure_callbacks.append(callback)

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise EngineNotRunningError("the engine has not been started")
        return self._runner

    def memory_owners(self) -> MemoryOwners:
        """What the running engine holds on its device (see :mod:`glm4voice.memory`): the weights, the
        KV cache, the per-slot state and rotary tables, and its CUDA graphs' pool; its steps run on
        the device's default stream."""
        runner = self.runner
        return MemoryOwners(
            parts={
                "llm weights": tensor_bytes(runner.model),
                "llm kv cache": runner.cache.nbytes(),
                "llm slot state": tensor_bytes(runner.rope, runner.first_logits),
            },
            pools={"llm graphs": runner.graph_pool},
        )

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise EngineNotRunningError("the model is loaded by start(); call it first")
        return self._loaded

    @property
    def _prefix_cache(self) -> PrefixCache:
        """The worker's prefix cache (made by start(), before the worker serves)."""
        if self._prefix is None:
            raise EngineNotRunningError("the engine has not been started")
        return self._prefix

    @property
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop that called start() (streams' events are handed to it)."""
        if self._loop is None:
            raise EngineNotRunningError("the engine has not been started")
        return self._loop

    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(
            running=self.running,
            active_streams=len(self._prefilling) + len(self._decoding) + len(self._held),
            queued=self._queued,
            tokens_generated=c.tokens,
            prompt_tokens=c.prompt_tokens,
            requests_finished=c.finished,
            requests_failed=c.failed,
            decode_steps=c.decode_steps,
            prefill_chunks=c.prefill_chunks,
            decode_seconds=c.decode_seconds,
            prefill_seconds=c.prefill_seconds,
            prefix_hits=c.prefix_hits,
            prefix_tokens_reused=c.prefix_tokens_reused,
            prefix_evictions=c.prefix_evictions,
            held_streams=len(self._held),
            holds=c.holds,
        )

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (if given a path), allocate the KV cache, warm up; returns when ready. Lowers
        the process's thread switch interval to :data:`SWITCH_INTERVAL_S`."""
        if self._thread is not None:
            raise EngineError("start() was already called")
        self._loop = asyncio.get_running_loop()
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:  # process-wide: it outlives the engine
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        ready: asyncio.Future = self._loop.create_future()
        self._closed = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._worker_main, args=(ready,), name="glm4voice-llm-engine", daemon=True
        )
        self._thread.start()
        await ready
        self._running = True

    async def stop(self) -> None:
        """End every stream (EngineStoppedError) and the worker thread."""
        self._running = False
        if self._thread is None:
            return
        self._commands.put(("stop", None))
        await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def wait_idle(self) -> None:
        """Until no request is queued or running (every stream ended and its slot freed)."""
        await self._idle.wait()

    @contextlib.contextmanager
    def make_way(self, starting_tokens: int = 0) -> Iterator[None]:
        """While the body runs, the worker launches no new prefill or decode step (one already on the
        device finishes): for GPU work of this process that a listener waits for, such as a turn's first
        audio block, whose decode takes about half as long again beside the LLM's steps. Each call
        pauses the worker once, for at most :data:`MAKE_WAY_LIMIT_S`; the worker then goes on even if
        the body has not finished, so that callers slow generation down but cannot stop it. Any thread.

        ``starting_tokens``: requests that have generated fewer tokens than this (and prompts waiting or
        being prefilled) are not paused: the worker steps them alone, in smaller batches, while the others
        wait. Other listeners' first audio then is not held up behind the body (their own first tokens
        keep coming); with several callers inside, the largest value counts."""
        if starting_tokens < 0:
            raise ValueError(f"starting_tokens must be >= 0, got {starting_tokens}")
        with self._lock:
            self._way_holders += 1
            self._way_asked += 1
            self._way_starting = max(self._way_starting, starting_tokens)
            self._way_clear.clear()
        try:
            yield
        finally:
            with self._lock:
                self._way_holders -= 1
                if self._way_holders == 0:
                    self._way_starting = 0
                    self._way_clear.set()
                    self._way_wake.set()

    @property
    def make_way_calls(self) -> int:
        """:meth:`make_way` calls so far (the worker pauses only for those that find it busy)."""
        return self._way_asked

    @property
    def make_way_pauses(self) -> int:
        """Times the worker has paused for :meth:`make_way` callers (callers that overlap may share one)."""
        return self._way_pauses

    # --- requests -----------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> GenerationStream:
        """Queue a request; raises at once for bad input, a full queue, or a stopped engine."""
        if not self.running:
            raise EngineNotRunningError(
                "the engine is not running" + (f" (the worker failed: {self._fatal!r})" if self._fatal else "")
            )
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = self._validate_prompt(prompt_ids)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        # The check and the put share the lock the worker takes before it drains its queue when it
        # ends, so a request is either refused here or ended by that drain: never left unanswered.
        with self._lock:
            if not self._accepting:
                raise EngineNotRunningError(
                    "the engine is not running" + (f" (the worker failed: {self._fatal!r})" if self._fatal else "")
                )
            if self._queued >= self.config.max_queue:
                raise EngineBusyError(
                    f"{self._queued} requests are already waiting (max_queue={self.config.max_queue})"
                )
            self._queued += 1
            request_id = self._next_id
            self._next_id += 1
            stream = GenerationStream(self, request_id, len(prompt), params)
            request = _Request(request_id, prompt, params, seed, self.stop_ids | params.stop_ids, stream)
            self._open.add(request_id)
            self._idle.clear()
            self._commands.put(("submit", request))
            if self._way_starting:  # a worker pausing for make_way steps it (see _give_way)
                self._way_wake.set()
        return stream

    def _validate_prompt(self, prompt_ids: Sequence[int]) -> tuple[int, ...]:
        if isinstance(prompt_ids, (str, bytes)):
            raise InvalidPromptError("prompt_ids must be a sequence of token ids, not text")
        try:
            prompt = tuple(operator.index(i) for i in prompt_ids)
        except TypeError as error:
            raise InvalidPromptError(f"prompt_ids must be integers: {error}") from error
        if not prompt:
            raise InvalidPromptError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt)} tokens; at most {self.max_seq_len - 1} fit (max_seq_len={self.max_seq_len})"
            )
        vocab = self.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise InvalidPromptError(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return prompt

    def drop_prefix_cache(self) -> None:
        """Forget every cached sequence (slots of running requests are kept); applied before the
        worker's next step."""
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("drop_cache", None))

    def _cancel(self, request_id: int) -> None:
        self._command("cancel", request_id)

    def _command(self, kind: str, request_id: int) -> None:
        """A stream's command to the worker ("cancel", "hold", "resume"; any thread; none once it is gone)."""
        if self._thread is not None and self._thread.is_alive():
            self._commands.put((kind, request_id))

    # --- event-loop side of the worker's output -----------------------------------------------------
    def _post(self, events: list[_Event]) -> None:
        if not events:
            return
        try:
            self._event_loop.call_soon_threadsafe(self._dispatch, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            logger.warning("event loop closed; dropping %d stream events", len(events))

    def _dispatch(self, events: list[_Event]) -> None:
        for stream, token, end in events:
            stream._push(token, end)
            if end is not None:
                self._open.discard(stream.request_id)
        if not self._open:
            self._idle.set()

    # --- worker thread ------------------------------------------------------------------------------
    def _worker_main(self, ready: asyncio.Future) -> None:
        try:
            with torch.inference_mode():
                self._prepare()
        except BaseException as error:
            logger.exception("engine start failed")
            self._fatal = error
            self._event_loop.call_soon_threadsafe(_resolve, ready, error)
            self._signal_closed(error)
            return
        with self._lock:
            self._accepting = True
        self._event_loop.call_soon_threadsafe(_resolve, ready, None)
        reason: BaseException = EngineStoppedError("the engine was stopped")
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException as error:  # the device is broken, or a bug in the loop: fail loudly
            logger.critical("engine worker died: %s: %s", type(error).__name__, error, exc_info=error)
            self._fatal = error
            reason = error
        finally:
            self._running = False
            with self._lock:  # no submit() gets past its check after this: _end_all sees every request
                self._accepting = False
            self._end_all(reason)
            self._signal_closed(self._fatal)

    def _signal_closed(self, error: BaseException | None) -> None:
        try:
            self._event_loop.call_soon_threadsafe(self._on_closed, error)
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass

    def _on_closed(self, error: BaseException | None) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(error)
        if error is None:
            return
        for callback in self._failure_callbacks:
            try:
                callback(error)
            except Exception:
                logger.exception("engine failure callback %r raised", callback)
        self._failure_callbacks.clear()

    def _prepare(self) -> None:
        config = self.config
        device = config.torch_device()
        if self._loaded is None:
            assert not isinstance(self._source, LoadedModel)  # __init__ keeps a loaded model as _loaded
            self._loaded = load_model(
                self._source, device=device, dtype=config.activation_dtype(),
                quantize=config.dtype if config.dtype in QUANTIZED_DTYPES else None, method=config.quant_method,
            )  # fmt: skip
        elif self._loaded.model.device != device:
            raise EngineError(f"the model is on {self._loaded.model.device}, the engine is configured for {device}")
        limit, why = context_limit(self._loaded.config, config.max_seq_len)
        (logger.warning if limit < config.max_seq_len else logger.info)(
            "context: %d positions per stream: %s", limit, why
        )
        self._runner = ModelRunner(
            self._loaded.model,
            config.max_batch_size,
            self.max_seq_len,
            cuda_graphs=config.use_cuda_graphs(),
            compile=config.use_compile(),
            graph_batch_sizes=config.cuda_graph_batch_sizes,
            prefill_graph_lengths=config.prefill_graph_sizes(),
            continued_prefill_graphs=config.prefix_cache,
        )
        self._prefix = PrefixCache(config.max_batch_size, self.max_seq_len, enabled=config.prefix_cache)
        if config.warmup:
            self._runner.warm_up()
            release_cached(device, "engine warm-up")
        logger.info("engine ready on %s: %d slots x %d tokens, KV cache %.2f GB, stop ids %s", device,
                    config.max_batch_size, self.max_seq_len, self._runner.cache.nbytes() / GB,
                    sorted(self.stop_ids))  # fmt: skip
        logger.info("engine %s", summary_line(memory_report(device, self.memory_owners())))

    def _serve(self) -> None:
        while True:
            busy = bool(self._waiting or self._prefilling or self._decoding or self._inflight)
            if not self._take_commands(block=not busy):
                return
            starting_only = self._give_way()
            self._admit()
            if self._prefilling:
                events: list[_Event] = []
                try:
                    self._prefill(events)
                finally:  # first tokens go out before the decode step (and even if the worker stops)
                    self._post(events)
            if self._decoding or self._inflight:
                events = []
                try:
                    self._decode(events, starting_only)
                finally:
                    self._post(events)

    def _give_way(self) -> bool:
        """Pause (at most MAKE_WAY_LIMIT_S) for a :meth:`make_way` caller not yet paused for. True: the
        pause goes on, but starting requests may step meanwhile (their ``starting_tokens``)."""
        if self._way_asked != self._way_honoured:  # every step: no lock when nobody asked (a stale read waits a step)
            with self._lock:
                if self._way_asked != self._way_honoured and not self._way_clear.is_set():
                    self._way_until = time.perf_counter() + MAKE_WAY_LIMIT_S
                    self._way_pauses += 1
                self._way_honoured = self._way_asked  # callers that already left need no pause
        if self._way_until is None:
            return False
        left = self._way_until - time.perf_counter()
        if left > 0 and not self._way_clear.is_set():
            if self._starting(self._way_starting):
                return True
            self._way_wake.clear()  # make_way's exit and submit() set it after their change: seen below
            if not self._way_clear.is_set() and not (self._way_starting and not self._commands.empty()):
                self._way_wake.wait(left)
            if self._way_starting and not self._way_clear.is_set() and time.perf_counter() < self._way_until:
                return True  # a request came: the loop takes it, then steps it alone
        self._way_until = None
        return False

    def _starting(self, tokens: int) -> bool:
        """Whether any request may step during a pause for callers' ``starting_tokens``: prompts being
        prefilled or waiting with a slot free, or decoding requests that have generated fewer than
        ``tokens``."""
        if tokens <= 0:
            return False
        if self._prefilling or (self._waiting and self._prefix_cache.has_free_slot()):
            return True
        return any(r.generated < tokens for r in self._decoding)

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if ``block``); False once asked to stop."""
        while True:
            try:
                kind, payload = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "submit":
                self._waiting.append(payload)
            elif kind == "cancel":
                self._cancel_request(payload)
            elif kind == "hold":
                if self._move(payload, self._decoding, self._held):
                    self._counters.holds += 1
            elif kind == "resume":
                self._move(payload, self._held, self._decoding)
            elif kind == "drop_cache":
                self._prefix_cache.drop_cached()

    def _cancel_request(self, request_id: int) -> None:
        for request in self._waiting:
            if request.id == request_id:
                self._waiting.remove(request)
                self._dequeued()
                self._post([(request.stream, None, _End(FinishReason.CANCELLED))])
                return
        for group in (self._prefilling, self._decoding, self._held):
            for request in group:
                if request.id == request_id:
                    group.remove(request)
                    self._release(request, keep=True)
                    self._post([(request.stream, None, _End(FinishReason.CANCELLED))])
                    return

    def _move(self, request_id: int, source: list[_Request], target: list[_Request]) -> bool:
        """Hold or resume a decoding stream; False if it is not in ``source`` (it ended or was cancelled
        meanwhile)."""
        for request in source:
            if request.id == request_id:
                source.remove(request)
                target.append(request)
                return True
        return False

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _admit(self) -> None:
        events: list[_Event] = []
        try:
            while self._waiting and self._prefix_cache.has_free_slot():
                self._place(self._waiting.popleft(), events)
        finally:
            self._post(events)  # first tokens of repeated prompts (no prefill needed)

    def _place(self, request: _Request, events: list[_Event]) -> None:
        self._dequeued()
        placement = self._prefix_cache.place(request.prompt)
        request.slot, request.prefilled = placement.slot, placement.reuse
        params = request.params
        try:
            if placement.copy_from is not None:
                self.runner.copy_prefix(placement.copy_from, placement.slot, placement.reuse, placement.repeat)
            self.runner.set_sampling(request.slot, float(params.temperature), float(params.top_p), request.seed)
            token = self.runner.sample_first(request.slot, len(request.prompt)) if placement.repeat else None
        except Exception as error:
            logger.exception("setting up request %d failed", request.id)
            self._fail(request, error)
            self._step_failed(error)
            return
        if placement.reuse:
            self._counters.prefix_hits += 1
            self._counters.prefix_tokens_reused += placement.reuse
        self._counters.prefix_evictions += placement.evicted
        if token is None:
            self._prefilling.append(request)
        elif self._accept(request, token, events):
            self._decoding.append(request)

    def _step_failed(self, error: BaseException) -> None:
        """Bookkeeping of a failed step: re-raise (ending the worker) if the device is unusable."""
        self._failures_in_a_row += 1
        if _device_is_broken(error):
            raise EngineError(f"the device failed: {type(error).__name__}: {error}") from error
        if self._failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            raise EngineError(
                f"{self._failures_in_a_row} steps failed in a row; last: {type(error).__name__}: {error}"
            ) from error

    def _release(self, request: _Request, keep: bool) -> None:
        """Free the request's slot; ``keep``: its keys and values stay cached for later requests."""
        if request.slot >= 0:
            self._prefix_cache.release(request.slot, keep)
            request.slot = -1

    def _prefill(self, events: list[_Event]) -> None:
        """Up to ``prefill_chunk`` prompt tokens, oldest request first."""
        budget = self.config.prefill_chunk
        while budget > 0 and self._prefilling:
            request = self._prefilling[0]
            start = request.prefilled
            chunk = request.prompt[start : start + budget]
            last = start + len(chunk) == len(request.prompt)
            started = time.perf_counter()
            try:
                token = self.runner.prefill(request.slot, chunk, start, sample=last)
            except Exception as error:
                logger.exception("prefill of request %d failed", request.id)
                self._prefilling.pop(0)
                self._fail(request, error)
                self._step_failed(error)
                continue
            self._failures_in_a_row = 0
            self._counters.prefill_chunks += 1
            self._counters.prefill_seconds += time.perf_counter() - started
            self._counters.prompt_tokens += len(chunk)
            self._prefix_cache.written(request.slot, start, chunk)
            request.prefilled += len(chunk)
            budget -= len(chunk)
            if last:
                self._prefilling.pop(0)
                self._prefix_cache.prompt_done(request.slot, len(request.prompt))
                assert token is not None  # the last chunk samples (sample=last)
                if self._accept(request, token, events):
                    self._decoding.append(request)

    def _decode(self, events: list[_Event], starting_only: bool = False) -> None:
        """Collect the step in flight and keep one step in flight. While the running requests
        stay the same, the next step is launched on the device before the previous one is
        collected, so the host's bookkeeping overlaps the device's work; a request that ended
        in the previous step costs its row one wasted step. Any change (a request joins, ends or
        is cancelled) collects first and launches from the host's state. ``starting_only``: during a
        :meth:`make_way` pause, only the requests that have generated fewer than its
        ``starting_tokens`` step."""
        started = time.perf_counter()
        inflight, self._inflight = self._inflight, None
        starting = [r for r in self._decoding if r.generated < self._way_starting] if starting_only else None
        try:
            if inflight is not None:
                batch, launch = inflight
                stepping = self._decoding if starting is None else starting
                if stepping and batch == stepping:
                    self._inflight = (batch, self.runner.launch(launch.rows, after=launch))
                    self._counters.decode_steps += 1
                self._take_tokens(batch, self.runner.collect(launch), events)
            if starting is None:
                batch = list(self._decoding)
            else:  # those that did not end in the step just collected
                batch = [r for r in starting if r.slot >= 0]
            if self._inflight is None and batch:
                rows = [DecodeRow(r.slot, r.last_token, r.position) for r in batch]
                self._inflight = (batch, self.runner.launch(rows))
                self._counters.decode_steps += 1
        except Exception as error:
            failed = list(self._decoding)
            self._inflight = None
            self._decoding.clear()
            for request in failed:
                self._fail(request, error)
            self._step_failed(error)
            logger.exception("decode step failed for %d streams", len(failed))
        else:
            self._failures_in_a_row = 0
        self._counters.decode_seconds += time.perf_counter() - started

    def _take_tokens(self, batch: list[_Request], tokens: list[int], events: list[_Event]) -> None:
        ended = set()
        for request, token in zip(batch, tokens):
            if request.slot < 0:  # ended (or was cancelled) after this step was launched
                continue
            if not self._accept(request, token, events):
                ended.add(request)
        if ended:  # a request held after this step was launched ends from the held list
            self._decoding = [r for r in self._decoding if r not in ended]
            self._held = [r for r in self._held if r not in ended]

    def _accept(self, request: _Request, token: int, events: list[_Event]) -> bool:
        """Record a new token; True if the request goes on."""
        request.generated += 1
        request.last_token = token
        self._prefix_cache.drawn(request.slot, request.position, token)
        self._counters.tokens += 1
        reason = None
        if token in request.stop_ids:
            reason = FinishReason.STOP
        elif (
            request.generated >= request.params.max_new_tokens
            or len(request.prompt) + request.generated >= self.max_seq_len
        ):
            reason = FinishReason.LENGTH
        if reason is None:
            events.append((request.stream, token, None))
            return True
        self._release(request, keep=True)
        self._counters.finished += 1
        events.append((request.stream, token, _End(reason)))
        return False

    def _fail(self, request: _Request, error: BaseException) -> None:
        """End ``request``'s stream with GenerationError (posted at once: the worker may stop next)."""
        self._release(request, keep=False)
        self._counters.failed += 1
        failure = GenerationError(f"generation failed: {type(error).__name__}: {error}")
        failure.__cause__ = error
        self._post([(request.stream, None, _End(FinishReason.ERROR, failure))])

    def _end_all(self, reason: BaseException) -> None:
        events: list[_Event] = []
        while True:  # requests submitted but not yet taken from the command queue
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._waiting.append(payload)
        for request in [*self._waiting, *self._prefilling, *self._decoding, *self._held]:
            if request in self._waiting:
                self._dequeued()
            self._release(request, keep=False)
            error: EngineError
            if isinstance(reason, EngineStoppedError):
                error = EngineStoppedError(str(reason))
            else:
                error = GenerationError(f"the engine worker failed: {type(reason).__name__}: {reason}")
                error.__cause__ = reason
            events.append((request.stream, None, _End(FinishReason.ERROR, error)))
        self._waiting.clear()
        self._prefilling.clear()
        self._decoding.clear()
        self._held.clear()
        self._inflight = None
        self._post(events)


def _device_is_broken(error: BaseException) -> bool:
    """A CUDA error (e.g. a device-side assert) leaves the context unusable for every request."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = str(error)
    return "CUDA error" in text or "device-side assert" in text


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


__all__ = [
    "Engine",
    "EngineBusyError",
    "EngineConfig",
    "EngineError",
    "EngineNotRunningError",
    "EngineStats",
    "EngineStoppedError",
    "FinishReason",
    "GenerationError",
    "GenerationStream",
    "InvalidPromptError",
    "InvalidSamplingParams",
    "PromptTooLongError",
    "SamplingParams",
]
