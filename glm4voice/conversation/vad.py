"""Voice activity detection with silero-vad: where speech starts and stops, in audio time.

The model is the TorchScript file that ships inside the silero-vad wheel, loaded offline with
``torch.jit.load`` (no hub, no torchaudio). It is located through the package's installed files, so
``silero_vad`` itself is never imported (its import sets torch's thread count for the whole process).
One :class:`SileroVAD` is shared by every session: its model call is stateless (the recurrent state and
the 64-sample context are passed in and out), and calls run on one worker thread. Each session keeps
its own :class:`VoiceActivityDetector` (plain data: recurrent state, context, position, hysteresis).

Frames are 512 samples at 16 kHz (32 ms). Positions are sample counts of the session's 16 kHz input
stream, so every boundary is in audio time, whatever the wall clock or the machine's load.

Hysteresis (as silero's own streaming iterator): speech starts at the first frame whose probability is
at least ``threshold``; it stops once the probability has stayed below ``threshold - 0.15`` for
``silence_duration_ms`` (a frame at or above ``threshold`` in between starts the count again).
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.metadata
import logging
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from glm4voice.audio import INPUT_SAMPLE_RATE

logger = logging.getLogger(__name__)
T = TypeVar("T")

VAD_SAMPLE_RATE = INPUT_SAMPLE_RATE
"""silero-vad's 16 kHz model; the speech tokenizer's rate too, so one stream serves both."""
FRAME_SAMPLES = 512
"""Samples per model call at 16 kHz (32 ms)."""
FRAME_MS = 1000 * FRAME_SAMPLES // VAD_SAMPLE_RATE
CONTEXT_SAMPLES = 64
"""Samples of the previous frame the 16 kHz model sees in front of each frame."""
STATE_SHAPE = (2, 1, 128)
"""The model's recurrent state for one stream."""
NEGATIVE_GAP = 0.15
"""Speech continues until the probability falls below ``threshold - NEGATIVE_GAP``."""
WARM_UP_FRAMES = 24
"""Frames run at load: TorchScript's profiling executor optimises the graph during the first calls."""
DISTRIBUTION = "silero-vad"
MODEL_FILE = "silero_vad/data/silero_vad.jit"
"""The TorchScript model inside the silero-vad wheel (pinned in requirements.txt)."""

DEFAULT_THRESHOLD = 0.5
DEFAULT_PREFIX_PADDING_MS = 300
DEFAULT_SILENCE_DURATION_MS = 500
"""OpenAI's server_vad defaults."""


def ms_to_samples(ms: float) -> int:
    return int(round(ms * VAD_SAMPLE_RATE / 1000))


def samples_to_ms(samples: int) -> int:
    """Whole milliseconds of audio before sample ``samples`` (rounded down)."""
    return samples * 1000 // VAD_SAMPLE_RATE


@dataclass(frozen=True)
class TurnDetection:
    """Server-side turn detection (OpenAI's ``server_vad``)."""

    threshold: float = DEFAULT_THRESHOLD
    prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS
    """Audio kept before the detected start of speech (part of the user's turn)."""
    silence_duration_ms: int = DEFAULT_SILENCE_DURATION_MS
    """Silence that ends the user's turn."""
    create_response: bool = True
    """Answer automatically when the user's turn ends."""
    interrupt_response: bool = True
    """Speech that starts while an answer is generated or streamed cancels it (barge-in)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.threshold < 1.0:
            problems.append(f"threshold must be between 0 and 1 (got {self.threshold})")
        if not 0 <= self.prefix_padding_ms <= 10_000:
            problems.append(f"prefix_padding_ms must be between 0 and 10000 (got {self.prefix_padding_ms})")
        if not FRAME_MS <= self.silence_duration_ms <= 10_000:
            problems.append(
                f"silence_duration_ms must be between {FRAME_MS} and 10000 (got {self.silence_duration_ms})"
            )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class SpeechStart:
    sample: int
    """First sample of the first speech frame."""


@dataclass(frozen=True)
class SpeechStop:
    sample: int
    """First sample of the silence that ended the speech."""
    decided: int
    """Where ``silence_duration_ms`` of that silence was complete (the end of the frame that decided)."""


SpeechBoundary = SpeechStart | SpeechStop


class SpeechSegmenter:
    """Frame probabilities -> speech boundaries (the hysteresis above); no model, plain state."""

    def __init__(self, config: TurnDetection):
        self.config = config
        self.position = 0
        """Samples consumed (the end of the last frame)."""
        self.in_speech = False
        self.silence_start: int | None = None
        self._silence_samples = ms_to_samples(config.silence_duration_ms)

    def feed(self, probability: float) -> SpeechBoundary | None:
        start, self.position = self.position, self.position + FRAME_SAMPLES
        threshold = self.config.threshold
        if not self.in_speech:
            if probability >= threshold:
                self.in_speech, self.silence_start = True, None
                return SpeechStart(start)
            return None
        if probability >= threshold:
            self.silence_start = None
        elif probability < threshold - NEGATIVE_GAP:
            if self.silence_start is None:
                self.silence_start = start
            if self.position - self.silence_start >= self._silence_samples:
                end = self.silence_start
                self.in_speech, self.silence_start = False, None
                return SpeechStop(end, self.position)
        return None

    def force_stop(self) -> SpeechStop | None:
        """End the current speech here (e.g. the turn reached its length limit)."""
        if not self.in_speech:
            return None
        end = self.silence_start if self.silence_start is not None else self.position
        self.in_speech, self.silence_start = False, None
        return SpeechStop(end, self.position)


class VadState:
    """One stream's model state: the recurrent state and the context in front of the next frame."""

    def __init__(self) -> None:
        import torch

        self.recurrent = torch.zeros(STATE_SHAPE)
        self.context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)


def _one_intra_op_thread() -> None:
    """Worker initializer: torch runs this thread's ops on one OpenMP thread, the rest of the process
    keeps its setting. The model's ops are tiny; split over threads that compete with the decoder (or,
    on a small machine, with other processes), each op waits for a thread that is not running, and a
    frame costs many times its compute (docs/perf/vad.md). ``torch.set_num_threads`` would change the
    whole process, so this calls ``omp_set_num_threads`` of the OpenMP runtime torch loaded, which
    sets the calling thread's value only."""
    import torch

    torch.zeros(1).add_(1)  # torch initialises this thread's OpenMP setting on its first op
    library = _loaded_library("libgomp")
    if library is None:
        logger.info("no OpenMP runtime found in the process: the VAD thread keeps torch's thread count")
        return
    ctypes.CDLL(library).omp_set_num_threads(1)


def _loaded_library(name: str) -> str | None:
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                if Path(path).name.startswith(name + "."):
                    return path
    except OSError:
        return None
    return None


def _new_worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4voice-vad", initializer=_one_intra_op_thread)


def _load_module(path: Path) -> Any:
    """The 16 kHz model of the TorchScript file (its stateless part: state in, state out)."""
    import torch

    with warnings.catch_warnings():  # the wheel ships TorchScript; torch 2.13 calls the loader deprecated
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()
    if not hasattr(module, "_model"):
        raise RuntimeError(f"unexpected silero-vad model layout in {path} (no 16 kHz submodule)")
    return module._model


class SileroVAD:
    """The shared model and the worker thread its calls run on (one per app)."""

    def __init__(self, module: Any, worker: ThreadPoolExecutor | None = None):
        self._module = module
        self._worker = worker or _new_worker()

    @staticmethod
    def model_path() -> Path:
        try:
            path = Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file(MODEL_FILE)))
        except importlib.metadata.PackageNotFoundError as error:
            raise RuntimeError(
                f"the {DISTRIBUTION} package is not installed (pip install -r requirements.txt)"
            ) from error
        if not path.is_file():
            raise RuntimeError(f"the {DISTRIBUTION} package has no model file at {path}")
        return path

    @classmethod
    async def load(cls) -> SileroVAD:
        """Load the bundled model (offline) and warm it up, on its worker thread."""
        path = cls.model_path()
        worker = _new_worker()
        module = await asyncio.get_running_loop().run_in_executor(worker, _load_module, path)
        vad = cls(module, worker)
        noise = (0.1 * np.random.default_rng(0).standard_normal(WARM_UP_FRAMES * FRAME_SAMPLES)).astype(np.float32)
        await vad.run(vad.probabilities, VadState(), noise)
        logger.info("silero-vad loaded from %s", path)
        return vad

    def probabilities(self, state: VadState, samples: np.ndarray) -> np.ndarray:
        """Speech probability of each whole frame of ``samples`` (a multiple of FRAME_SAMPLES, 16 kHz),
        advancing ``state``. Runs on the calling thread (see :meth:`run`)."""
        import torch

        frames = np.asarray(samples, dtype=np.float32).reshape(-1, FRAME_SAMPLES)  # (n, 512)
        out = np.empty(len(frames), dtype=np.float32)
        with torch.inference_mode():
            for k, frame in enumerate(frames):
                x = torch.from_numpy(np.concatenate([state.context, frame]))[None]  # (1, 64 + 512)
                probability, state.recurrent = self._module(x, state.recurrent)  # (1, 1), (2, 1, 128)
                out[k] = float(probability)
                state.context = frame[-CONTEXT_SAMPLES:].copy()
        return out

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the VAD worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


class VoiceActivityDetector:
    """One session's detector: feed 16 kHz samples, get speech boundaries (positions in the stream)."""

    def __init__(self, model: SileroVAD, config: TurnDetection):
        self.model = model
        self.config = config
        self.segmenter = SpeechSegmenter(config)
        self._state = VadState()
        self._pending = np.zeros(0, dtype=np.float32)

    @property
    def position(self) -> int:
        """Samples analysed so far (whole frames)."""
        return self.segmenter.position

    def feed(self, samples: np.ndarray) -> list[SpeechBoundary]:
        """Boundaries found in the whole frames now available (a partial frame waits for the rest).
        Blocking (model calls): run it through :meth:`SileroVAD.run`."""
        data = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32).reshape(-1)])
        whole = len(data) - len(data) % FRAME_SAMPLES
        self._pending = data[whole:]
        if not whole:
            return []
        found = []
        for probability in self.model.probabilities(self._state, data[:whole]):
            boundary = self.segmenter.feed(float(probability))
            if boundary is not None:
                found.append(boundary)
        return found

    def force_stop(self) -> SpeechStop | None:
        return self.segmenter.force_stop()
