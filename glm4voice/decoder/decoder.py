"""AudioDecoder: speech tokens -> 22.05 kHz speech, offline and streaming, many streams at once.

    decoder = AudioDecoder.from_pretrained("THUDM/glm-4-voice-decoder", device="cuda")
    stream = decoder.stream(seed=0)
    for block in blocks_of_codes:           # 0-based audio codes, any block sizes
        play(stream.feed(block))            # float32 mono PCM at OUTPUT_SAMPLE_RATE (maybe empty)
    play(stream.finish())
    pcm = decoder.decode(all_codes, seed=0) # offline

Each block runs the flow on (prompt tokens + new tokens) with the prompt's mel as condition, like the
original; the seams between blocks are handled as :mod:`glm4voice.decoder.synthesis` describes.
Differences from the original, all deliberate:

- the prompt is a bounded window of the latest ``prompt_window`` tokens (default 100 = 8 s; the original
  used every earlier token, so the cost per block grew with the answer); ``prompt_window=None`` restores
  that, and then the result equals the original's (with PR #86's prompt bookkeeping: the vocoder's cache
  frame is not counted twice in the prompt mel);
- the ODE's starting noise is a function of (seed, absolute mel frame) (:class:`NoiseTimeline`), so
  streamed and offline decodes see the same noise; the original reseeded the global RNG with 42;
- the seam cross-fade of the vocoder's first frame (``seam_crossfade``, on by default; the original had
  it written but commented out, and its seams show a measurable jump);
- models run in eval mode (the original left dropout on); the tail is always decoded by ``finish()``
  (the original dropped it when generation ended without ``<|user|>``); bad input raises DecoderError.

The original's own block call, ``token2wav(token, uuid, prompt_token, prompt_feat, embedding, finalize)``,
works too (per-uuid state inside, released at ``finalize``), as do ``offline_inference`` and
``stream_inference``.

Many streams at once: :meth:`AudioDecoder.feed_many` decodes the next block of several streams together.
Blocks of the same shape (same token and prompt lengths, same carried state) run as one batch through
the flow encoder, the ODE and the vocoder (a launch-bound block costs about as much for many streams as
for one). Later blocks of different lengths (streams that started at different times) share the flow
as one padded, masked batch and the vocoder in groups of equal length (``mixed_batches``, on by
default); first blocks are batched by shape, for their whole-block graphs. Each row keeps its own noise,
prompt and vocoder randomness, so a stream's audio does not depend on its batch-mates (up to float
rounding of batch-size-dependent kernels).

State and threads: each stream's state is plain data (:class:`StreamState`); the decoder owns it and
every path that decodes (``feed``, ``feed_many``, ``finish``, ``decode``, ``token2wav``). One decoder may
serve many streams from many threads: model work runs under one lock (the CUDA graphs have static
buffers) on the decoder's own CUDA stream (so other components of the process, such as the speech
tokenizer, can run beside it). A stream belongs to one caller at a time; a second concurrent call on
the same stream raises RuntimeError. Speed figures: docs/perf/decoder.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch

from cosyvoice.flow.cuda_graph import GraphedEulerSolver
from cosyvoice.flow.noise import NoiseSource, NoiseTimeline, OriginalNoise, mix_seed
from glm4voice.audio import NUM_MEL_BINS, OUTPUT_SAMPLE_RATE, SPEAKER_EMBEDDING_DIM
from glm4voice.decoder.blocks import (
    Block,
    BlockGeometry,
    caller_block,
    commit_block,
    length_batches,
    put_back_block,
    take_block,
)
from glm4voice.decoder.codes import DecoderError, resolve_seed, validate_codes
from glm4voice.decoder.graphs import FirstBlockGraphs, LaterBlockGraphs
from glm4voice.decoder.loading import decoder_files, load_modules
from glm4voice.decoder.options import (
    DEFAULT_GRAPH_BATCH_SIZES,
    DEFAULT_PROMPT_WINDOW,
    FIRST_BLOCK_GRAPH_TOKENS,
    HIFT_SEED_STREAM,
    MEL_CACHE_FRAMES,
    MIXED_BATCH_LENGTH_RATIO,
    N_TIMESTEPS,
    TOKEN_OVERLAP,
    DecoderOptions,
)
from glm4voice.decoder.original import DEFAULT_TOKEN2WAV_SEED, UuidStates
from glm4voice.decoder.state import StreamState, VocoderCarry
from glm4voice.decoder.stats import DecodeStats
from glm4voice.decoder.stream import DecoderStream
from glm4voice.decoder.synthesis import BlockSynthesizer
from glm4voice.devices import default_device, high_priority_stream
from glm4voice.hub import PUBLISHED_DECODER
from glm4voice.memory import MemoryOwners, release_cached, tensor_bytes

logger = logging.getLogger(__name__)

_DEFAULT = object()
_EMPTY = np.zeros(0, dtype=np.float32)
_MIXED = ("any later block",)
"""The batch key of blocks that may share a mixed batch (:meth:`AudioDecoder._batch_key`)."""

Job = tuple["DecoderStream | StreamState", Sequence[int]]


class AudioDecoder:
    """The speech decoder of GLM-4-Voice: flow (tokens -> mel) + HiFT (mel -> speech)."""

    def __init__(
        self,
        config_path: str | os.PathLike,
        flow_ckpt_path: str | os.PathLike,
        hift_ckpt_path: str | os.PathLike,
        device: str | torch.device = "cuda",
        *,
        dtype: torch.dtype = torch.float32,
        prompt_window: int | None = DEFAULT_PROMPT_WINDOW,
        cuda_graphs: bool | None = None,
        min_block_tokens: int | None = None,
        seam_crossfade: bool = True,
        compile_first_blocks: bool | str = False,
        graph_batch_sizes: Sequence[int] = DEFAULT_GRAPH_BATCH_SIZES,
        graph_first_blocks: bool | None = None,
        mixed_batches: bool = True,
        graph_later_blocks: bool = False,
    ):
        """``dtype``: float32 (exact) or bfloat16/float16 (the flow's estimator in that dtype: faster on
        a GPU, mel within about 1% rms of float32; docs/perf/decoder.md has the figures).
        ``cuda_graphs``: replay the ODE as CUDA graphs (default: on for CUDA devices).
        ``min_block_tokens``: a stream decodes once this many tokens are pending (default: the flow
        encoder's block size, 10).
        ``seam_crossfade``: cross-fade the two vocodings of the frame at each block seam (the one the
        last block held back and the one the new block starts with); off, the audio equals the
        original's, whose vocoder restarts at each seam without left context.
        ``graph_batch_sizes``: batch sizes with CUDA graphs; :meth:`feed_many` decodes at most the largest
        as one batch, a smaller batch runs in the next size up.
        ``graph_first_blocks``: replay whole first blocks (no prompt yet: the block that sets the time to
        first audio) as CUDA graphs of the flow and of the vocoder (default: with ``cuda_graphs``).
        ``compile_first_blocks`` (CUDA): ``torch.compile`` the estimator and the vocoder inside the
        first-block graphs (True, or a compile mode such as ``"max-autotune-no-cudagraphs"``): fewer,
        fused kernels, at the price of minutes of compiling at warm-up.
        ``mixed_batches``: :meth:`feed_many` batches the flow of blocks of different lengths together
        (padded and masked; streams that started at different times rarely have blocks of one shape);
        off, only blocks of the same shape share a batch.
        ``graph_later_blocks`` (CUDA graphs): replay the encoder and the vocoder of every later block (those
        with a prompt and a carried state) as CUDA graphs: the encoder's per padded length, the vocoder's
        per exact length; :meth:`warm_up` captures the schedule's, others are captured at their second use. Their
        eager kernels cost host time that grows many times over while other Python threads of the process
        (the event loop, the LLM engine's worker) want the interpreter's lock. Off by default: on an H100
        with 64 conversations at once it cut that host time but not the decoder's busy time, and as many
        listeners ran dry (docs/perf/decoder.md)."""
        self.options = DecoderOptions(
            dtype, prompt_window, cuda_graphs, min_block_tokens, seam_crossfade, compile_first_blocks,
            tuple(graph_batch_sizes), graph_first_blocks, mixed_batches, graph_later_blocks,
        )  # fmt: skip
        self._device = torch.device(device)
        use_graphs = self.options.use_graphs(self._device)
        first_block_graphs = self.options.use_first_block_graphs(self._device)
        self.flow, self.hift = load_modules(config_path, flow_ckpt_path, hift_ckpt_path, self._device)
        self._num_codes = int(self.flow.vocab_size)
        self._geometry = BlockGeometry(
            block_size=int(getattr(self.flow.encoder, "block_size", None) or TOKEN_OVERLAP * 2),
            input_frame_rate=float(self.flow.input_frame_rate),
        )
        self._samples_per_frame = int(self.hift.upsample_scale)
        self._mel_overlap_len = int(
            TOKEN_OVERLAP / self.flow.input_frame_rate * OUTPUT_SAMPLE_RATE / self._samples_per_frame
        )
        self._prompt_window = self.options.check_window(prompt_window, self.block_size)
        if dtype != torch.float32:  # the estimator alone; encoder, ODE state and vocoder stay float32
            self.flow.decoder.estimator.to(dtype)
        pool = self._graph_pool = torch.cuda.graph_pool_handle() if use_graphs else None  # one for all its graphs
        # with first-block graphs, the ODE graphs serve the longer blocks only (no compiling there)
        compile_exact = False if first_block_graphs else self.options.compile_mode or False
        self._solver = GraphedEulerSolver(
            self.flow.decoder, compile_exact=compile_exact, batch_sizes=self.options.graph_batch_sizes, pool=pool
        )
        first_blocks = None
        if first_block_graphs:
            first_blocks = FirstBlockGraphs(
                self.flow, self.hift, N_TIMESTEPS, self.options.graph_batch_sizes, self.mel_frames(FIRST_BLOCK_GRAPH_TOKENS), pool,
                self.options.compile_mode,
            )  # fmt: skip
        later_blocks = None
        if self.options.use_later_block_graphs(self._device):
            later_blocks = LaterBlockGraphs(self.flow, self.hift, self.options.graph_batch_sizes, pool)
        self.stats = DecodeStats()
        """What :meth:`feed_many`'s batches have cost so far (read it from the decoder's thread, or between runs)."""
        self._synth = BlockSynthesizer(
            self.flow,
            self.hift,
            self._solver if use_graphs else self._solver.eager,
            self._device,
            self._mel_overlap_len,
            seam_crossfade,
            first_blocks,
            self.stats,
            later_blocks,
        )
        self._lock = threading.RLock()
        """Serialises model work (the CUDA graphs have static buffers)."""
        self._claims = threading.Lock()
        """Guards the ``busy`` flags of the states and the uuid table of :meth:`token2wav`."""
        self._uuids = UuidStates()
        self._graph_batches = self.options.graph_batch_sizes if use_graphs else ()
        # the highest-priority stream: in one process with the LLM engine, a listener's block goes first
        self._cuda_stream = high_priority_stream(self._device) if self._device.type == "cuda" else None
        if self._cuda_stream is not None:  # weights and constants are ready before the decoder's stream reads them
            torch.cuda.synchronize(self._device)

    @classmethod
    def from_pretrained(
        cls,
        folder_or_hub_id: str | os.PathLike = PUBLISHED_DECODER,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        **options,
    ) -> AudioDecoder:
        """Load a ``glm-4-voice-decoder`` folder (local path or hub id) as published."""
        if device is None:
            device = default_device()
        return cls(*decoder_files(folder_or_hub_id), device, dtype=dtype, **options)

    # ---- facts -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def cuda_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream every decode runs on (the device's highest priority; None on a CPU)."""
        return self._cuda_stream

    def memory_owners(self) -> MemoryOwners:
        """What the decoder holds on its device (see :mod:`glm4voice.memory`): the flow's and vocoder's
        weights, its CUDA graphs' pool and the stream it decodes on."""
        return MemoryOwners(
            parts={"decoder weights": tensor_bytes(self.flow, self.hift)},
            pools={"decoder graphs": self._graph_pool},
            streams={"decoder": self._cuda_stream},
        )

    @property
    def dtype(self) -> torch.dtype:
        """The estimator's dtype."""
        return self.options.dtype

    @property
    def sample_rate(self) -> int:
        return OUTPUT_SAMPLE_RATE

    @property
    def num_codes(self) -> int:
        """Audio codes the flow knows (0 ... num_codes - 1)."""
        return self._num_codes

    @property
    def block_size(self) -> int:
        """The flow encoder's attention block in tokens (prompt windows start on its multiples)."""
        return self._geometry.block_size

    @property
    def min_block_tokens(self) -> int:
        """Pending tokens a stream needs before it decodes a block (smaller blocks only at ``finish``)."""
        return int(self.options.min_block_tokens or self.block_size)

    @property
    def prompt_window(self) -> int | None:
        """Prompt tokens a new stream keeps (None: all of them)."""
        return self._prompt_window

    @property
    def seam_crossfade(self) -> bool:
        return self.options.seam_crossfade

    @property
    def mel_overlap_len(self) -> int:
        """Mel frames held back at the end of a block and cross-faded with the next (34)."""
        return self._mel_overlap_len

    @property
    def source_cache_len(self) -> int:
        """Vocoder source samples carried across blocks (one mel frame: 256)."""
        return MEL_CACHE_FRAMES * self._samples_per_frame

    @property
    def hold_back_s(self) -> float:
        """Audio a stream holds back until its next block (or ``finish``), in seconds: the mel overlap
        (34 frames) and the vocoder's carried frame, 35 x 256 samples."""
        return (self._mel_overlap_len + MEL_CACHE_FRAMES) * self._samples_per_frame / OUTPUT_SAMPLE_RATE

    @property
    def max_batch(self) -> int:
        """Most blocks decoded as one batch by :meth:`feed_many` (graphs are captured per batch size)."""
        return self.options.graph_batch_sizes[-1]

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes with CUDA graphs (a batch runs in the next size up): what :meth:`warm_up` takes."""
        return self.options.graph_batch_sizes

    @property
    def captured_graphs(self) -> dict[str, list[tuple]]:
        """The CUDA graphs captured so far: the ODE's ``(batch, frames, time points, padded)``, the
        first-block and later-block stages' ``(batch, input shapes...)``."""
        first, later = self._synth.first_blocks, self._synth.later_blocks
        return {
            "ode": self._solver.captured_shapes,
            "first_block_flow": first.flow_graphs.captured_shapes if first else [],
            "first_block_vocoder": first.vocoder_graphs.captured_shapes if first else [],
            "later_encoder": later.encoder_graphs.captured_shapes if later else [],
            "later_vocoder": later.vocoder_graphs.captured_shapes if later else [],
        }

    @property
    def solver(self) -> GraphedEulerSolver:
        """The ODE solver with its CUDA graphs (``captured_shapes`` lists them)."""
        return self._solver

    @property
    def synthesizer(self) -> BlockSynthesizer:
        """The model work on blocks (flow, vocoder); call it only through the decoder's methods, which
        hold the lock (benchmarks wrap its ``flow_mel`` and ``vocode`` to time them)."""
        return self._synth

    def mel_frames(self, tokens: int) -> int:
        """Mel frames the flow makes for ``tokens`` tokens (the original's float32 arithmetic)."""
        return self._geometry.mel_frames(tokens)

    # ---- streams -----------------------------------------------------------------------------------
    def new_state(
        self, seed: int | None = None, prompt_window=_DEFAULT, noise: NoiseSource | None = None
    ) -> StreamState:
        """The state of a new streamed answer (see :meth:`stream`)."""
        seed = resolve_seed(seed)
        window = (
            self._prompt_window
            if prompt_window is _DEFAULT
            else self.options.check_window(prompt_window, self.block_size)
        )
        return StreamState(
            seed=seed,
            prompt_window=window,
            noise=noise if noise is not None else NoiseTimeline(seed),
            carry=VocoderCarry(self._generator(seed)),
            mel=torch.zeros(1, NUM_MEL_BINS, 0, device=self._device),
        )

    def stream(
        self, seed: int | None = None, prompt_window=_DEFAULT, noise: NoiseSource | None = None
    ) -> DecoderStream:
        """A new streaming decode. ``seed`` fixes the result (None: a fresh random seed);
        ``prompt_window``: prompt tokens kept (None: all, like the original; default: the decoder's);
        ``noise``: where the flow's starting noise comes from (default: :class:`NoiseTimeline` of the seed)."""
        return DecoderStream(self, self.new_state(seed, prompt_window, noise))

    def feed(self, stream: DecoderStream | StreamState, codes: Sequence[int]) -> np.ndarray:
        """Add ``codes`` to the stream; decode its pending codes once ``min_block_tokens`` are pending
        (else return an empty array)."""
        result = self.feed_many([(stream, codes)], max_batch=1)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def feed_many(
        self,
        jobs: Sequence[Job],
        on_result: Callable[[int, np.ndarray | Exception], None] | None = None,
        max_batch: int | None = None,
        pause: Callable[[], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> list[np.ndarray | Exception]:
        """:meth:`feed` for each ``(stream, codes)`` job (each stream at most once), with the blocks that
        have the same shape decoded as one batch of at most ``max_batch`` (default ``self.max_batch``).
        Returns each job's PCM, or the exception its stream raised (bad codes, a finished stream, a failed
        decode); ``on_result(index, result)`` is called as soon as a job is done (first the groups whose
        streams have played the least audio: they are the most urgent).

        ``pause()`` is called, on this thread, where this call can stand aside for more urgent blocks:
        between its batches, and inside a batch of later blocks between the ODE's steps and before the
        vocoder (with the decoder's lock held: it may call :meth:`feed_many` for *other* streams, without
        a ``pause`` of its own). Those calls run on the device between this call's work, and the time
        spent in ``pause`` is not counted as this call's in :attr:`stats`.

        ``stop()`` is called, on this thread, between batches: when it returns true the call ends there,
        and the jobs of the batches left get :class:`NotDecoded` (``on_result`` is not called for them):
        their streams are as before the call, so the same jobs given again decode exactly as they would
        have."""
        results: list = [None] * len(jobs)
        aside = _Pause(pause) if pause is not None else None
        limit = max(1, int(max_batch or self.max_batch))
        claimed: dict[int, StreamState] = {}

        def done(index: int, result) -> None:
            results[index] = result
            state = claimed.pop(index, None)
            if state is not None:  # free the stream before its caller hears of the result
                self._unclaim(state)
            if on_result is not None:
                on_result(index, result)

        prepared = []
        try:
            for index, (job, codes) in enumerate(jobs):
                try:
                    block, state = self._take_job(job, codes)
                except Exception as error:  # noqa: BLE001 - this job only: bad codes, busy or finished stream
                    done(index, error)
                    continue
                claimed[index] = state
                if block is None:  # fewer than min_block_tokens pending: nothing to decode yet
                    done(index, _EMPTY.copy())
                else:
                    prepared.append((index, state, block))
            groups: dict[tuple, list] = {}
            for item in prepared:
                groups.setdefault(self._batch_key(item[2]), []).append(item)
            batches = [
                batch
                for members in groups.values()
                for batch in length_batches(members, lambda item: item[2].feat_len, limit, MIXED_BATCH_LENGTH_RATIO)
            ]
            batches.sort(key=lambda batch: min(state.samples_emitted for _, state, _ in batch))
            for position, batch in enumerate(batches):
                if position and stop is not None and stop():
                    for index, state, block in (item for left in batches[position:] for item in left):
                        put_back_block(state, block, added=len(jobs[index][1]))
                        results[index] = NotDecoded("the call stopped before this block's batch")
                        self._unclaim(claimed.pop(index))
                    break
                if position and aside is not None:
                    aside()
                with self._device_context():
                    outputs = self._decode_batch([(state, block) for _, state, block in batch], aside)
                for (index, _, _), out in zip(batch, outputs):
                    done(index, out)
        finally:
            for state in claimed.values():  # only after an unexpected error above
                self._unclaim(state)
        return results

    def _take_job(self, stream: DecoderStream | StreamState, codes: Sequence[int]) -> tuple[Block | None, StreamState]:
        """Claim the stream, add the codes, take its next block (None: fewer than ``min_block_tokens``
        pending; the stream stays claimed either way). Raises for bad codes, a busy or finished stream."""
        state = _state_of(stream)
        codes = validate_codes(codes, self._num_codes)
        self._claim(state)
        try:
            return self._add_codes(state, codes), state
        except BaseException:
            self._unclaim(state)
            raise

    def _decode_batch(
        self, batch: Sequence[tuple[StreamState, Block]], aside: _Pause | None = None
    ) -> list[np.ndarray | Exception]:
        """One batch through the flow and the vocoder (call within the device context): each stream's
        PCM, or the error that ended every stream of the batch. ``aside``: where the batch may stand aside
        (:meth:`feed_many`'s ``pause``)."""
        started = time.perf_counter()
        aside_before = aside.seconds if aside is not None else 0.0
        try:
            outputs = self._synth.run([block for _, block in batch], pause=aside)
            pcms: list[np.ndarray | Exception] = []
            with self.stats.phase("to_host"):
                for (state, block), out in zip(batch, outputs):
                    commit_block(state, self._geometry, block, out)
                    pcms.append(self._emit(state, out.speech))
        except Exception as error:  # every stream of the batch fails (its pending tokens are gone)
            if not isinstance(error, DecoderError):
                logger.exception("decoding a batch of %d blocks failed", len(batch))
            for state, _ in batch:
                self._end(state)
            return [error] * len(batch)
        rows = next((b for b in self._graph_batches if b >= len(batch)), len(batch))
        tokens = sum(block.new_tokens.numel() for _, block in batch)
        elsewhere = aside.seconds - aside_before if aside is not None else 0.0  # other calls, counted by themselves
        self.stats.add(len(batch), rows, tokens, time.perf_counter() - started - elsewhere)
        return pcms

    def _batch_key(self, block: Block) -> tuple[object, ...]:
        """Blocks with equal keys may share a batch: any later blocks (of any lengths) with mixed
        batches, else only blocks of the same shape; first blocks always by shape (their whole-block
        graphs have exact shapes)."""
        if self.options.mixed_batches and not block.starts_stream:
            return _MIXED
        return block.shape_key()

    def finish(self, stream: DecoderStream | StreamState) -> np.ndarray:
        """Decode what is pending and the held-back tail; the stream cannot be fed afterwards."""
        state = _state_of(stream)
        self._claim(state)
        try:
            if state.finished:
                raise DecoderError("this stream is already finished")
            state.finished = True
            try:
                if state.pending:
                    block = take_block(state, self._geometry, finalize=True)
                    with self._device_context():
                        result = self._synth.run([block])[0]
                        commit_block(state, self._geometry, block, result)
                        return self._emit(state, result.speech)
                if state.carry.mel_overlap is not None:
                    with self._device_context():
                        return self._emit(state, self._synth.flush(state.carry))
                return _EMPTY.copy()
            finally:
                state.drop_tensors()
        finally:
            self._unclaim(state)

    def release(self, stream: DecoderStream | StreamState | Hashable) -> None:
        """Drop a stream's tensors (``finish`` does this too), or the state that :meth:`token2wav`
        keeps for a uuid whose answer will not be finalized."""
        if isinstance(stream, (DecoderStream, StreamState)):
            self._end(_state_of(stream))
            return
        with self._claims:
            state = self._uuids.pop(stream)
        if state is not None:
            self._end(state)

    # ---- offline -----------------------------------------------------------------------------------
    def decode(self, codes: Sequence[int], seed: int | None = None) -> np.ndarray:
        """Offline decode of a whole answer (one block): float32 PCM at ``sample_rate``."""
        codes = validate_codes(codes, self._num_codes)
        if not codes:
            raise DecoderError("no audio codes to decode")
        state = self.new_state(seed)
        state.pending.extend(codes)
        return self.finish(state)

    # ---- the original's methods ------------------------------------------------------------------
    def token2wav(
        self,
        token: torch.Tensor,
        uuid: Hashable | StreamState,
        prompt_token: torch.Tensor | None = None,
        prompt_feat: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        finalize: bool = False,
        *,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's block call. ``token`` (1, n) codes of this block; ``uuid`` names the answer (its
        mel overlap and vocoder cache are kept inside until ``finalize``; a :class:`StreamState` from
        :meth:`new_state` may stand in for it); ``prompt_token`` (1, p) and ``prompt_feat`` (1, P, 80): the
        earlier tokens and mel that the caller keeps; ``embedding`` (1, 192) speaker embedding (default
        zeros). Returns ``(speech (1, samples), mel (1, 80, frames))`` on the decoder's device, like the
        original: ``mel`` starts with the vocoder's carried frame on every block but the first, so a
        caller that appends the returned mels to its prompt (as the original's web demo does) counts
        that frame twice (:mod:`glm4voice.decoder.original` says what that changes). The flow's noise is the original's
        draw (seed 42, prompt and new frames) unless ``noise`` (1, 80, p + n frames) is given; ``seed``
        seeds a new uuid's vocoder (default 42; the output is deterministic like the original's)."""
        token = self._code_tensor(token, "token")
        if token.shape[1] == 0:
            raise DecoderError("token2wav needs at least one token")
        prompt_token = self._code_tensor(prompt_token, "prompt_token")
        frames = self.mel_frames(prompt_token.shape[1] + token.shape[1])
        prompt_feat = self._prompt_feat(prompt_feat, frames)
        if embedding is not None:
            embedding = torch.as_tensor(embedding)
            if tuple(embedding.shape) != (1, SPEAKER_EMBEDDING_DIM) or not embedding.is_floating_point():
                raise DecoderError(
                    f"embedding must be a float tensor of shape (1, {SPEAKER_EMBEDDING_DIM}), got {tuple(embedding.shape)}"
                )
            embedding = embedding.to(self._device, torch.float32)
        if noise is not None and tuple(noise.shape) != (1, NUM_MEL_BINS, frames):
            raise DecoderError(f"noise must have shape (1, {NUM_MEL_BINS}, {frames}), got {tuple(noise.shape)}")
        keyed = not isinstance(uuid, StreamState)
        if keyed and not isinstance(uuid, Hashable):
            raise TypeError(f"uuid must be hashable (a string, say), got {type(uuid).__name__}")
        with self._claims:
            state = (
                uuid if isinstance(uuid, StreamState) else self._uuids.open(uuid, lambda: self._token2wav_state(seed))
            )
            self._mark_busy(state)
        try:
            if state.finished:
                raise DecoderError("this state is finished; start a new one with decoder.new_state()")
            block = caller_block(state, self._geometry, token, prompt_token, prompt_feat, finalize, noise)
            carried = state.carry.cache_mel
            with self._device_context():
                result = self._synth.run([block], embedding)[0]
                mel = result.mel if carried is None else torch.cat([carried, result.mel], dim=2)
            state.tokens_decoded += token.shape[1]
            state.frames_final += result.mel.shape[2]
            state.samples_emitted += result.speech.shape[1]
            return result.speech, mel
        finally:
            with self._claims:
                state.busy = False
                if keyed and finalize:  # the answer is over: its state goes (the carry was cleared)
                    self._uuids.discard(uuid, state)

    @property
    def token2wav_open(self) -> int:
        """uuids of :meth:`token2wav` with state kept (answers not finalized yet)."""
        return len(self._uuids)

    def offline_inference(self, token: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The original's one-shot decode: (1, n) codes -> (1, samples) float32 CPU tensor."""
        return torch.from_numpy(self.decode(torch.as_tensor(token).reshape(-1).tolist(), seed=seed)).unsqueeze(0)

    def stream_inference(self, token: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The original's streaming self-test: blocks of ``block_size`` tokens -> (1, samples) CPU tensor."""
        codes = validate_codes(torch.as_tensor(token).reshape(-1), self._num_codes)
        if not codes:
            raise DecoderError("no audio codes to decode")
        stream = self.stream(seed)
        pieces = [stream.feed(codes[i : i + self.block_size]) for i in range(0, len(codes), self.block_size)]
        pieces.append(stream.finish())
        return torch.from_numpy(np.concatenate(pieces)).unsqueeze(0)

    # ---- warm-up -----------------------------------------------------------------------------------
    def warm_up(
        self,
        block_sizes: Sequence[int],
        batch_sizes: Sequence[int] | None = None,
        first_block_sizes: Sequence[int] | None = None,
    ) -> float:
        """Capture, before the first listener, the CUDA graphs that streams following ``block_sizes``
        (early flushes included) need, for each of ``batch_sizes`` (default: every graphed size) blocks
        decoded together by :meth:`feed_many`: the flow and vocoder graphs of first blocks of
        ``first_block_sizes`` tokens (default: ``block_sizes[0]``; e.g. add the pipeline's first audio
        run; sizes past ``FIRST_BLOCK_GRAPH_TOKENS`` have no such graphs), the ODE graph of every padded
        length up to the prompt window plus the largest block; then decode throwaway answers (the
        encoder's and vocoder's kernels), one stream alone and, with later-block graphs, as many streams
        together as each of their batch sizes (the graphs of the schedule's block lengths). Without
        it a graph is captured at its first use, while every stream waits. Returns seconds."""
        started = time.perf_counter()
        batch_sizes = tuple(self.graph_batch_sizes if batch_sizes is None else batch_sizes)
        first_sizes = tuple(block_sizes[:1] if first_block_sizes is None else first_block_sizes)
        first_blocks = self._synth.first_blocks
        before = sum(len(shapes) for shapes in self.captured_graphs.values())
        if self._synth.solve is self._solver and self._device.type == "cuda":
            graphed_first = (
                []
                if first_blocks is None
                else [n for n in first_sizes if self.mel_frames(n) <= first_blocks.max_frames]
            )
            frames = [self.mel_frames(n) for n in first_sizes if n not in graphed_first]
            if self._prompt_window is not None:
                bucket = self._solver.bucket_frames
                longest = self.mel_frames(self._prompt_window + self.block_size + max(block_sizes))
                frames += list(range(bucket, longest + bucket, bucket))
            channels = self.flow.output_size
            with self._device_context():
                self._solver.prepare(batch_sizes, frames, N_TIMESTEPS + 1, channels, channels, channels, self._device)
        if first_blocks is not None:
            for size in first_sizes:
                if self.mel_frames(size) > first_blocks.max_frames:
                    continue
                first = [(7 * k) % self._num_codes for k in range(size)]
                for batch in batch_sizes:
                    streams = [self.stream(seed=row) for row in range(min(batch, self.max_batch))]
                    for result in self.feed_many([(stream, first) for stream in streams]):
                        if isinstance(result, Exception):
                            raise result
                    for stream in streams:
                        stream.close()
        later = self._synth.later_blocks
        answers = [1] if later is None else sorted({1, *(b for b in batch_sizes if b in later.batch_sizes)})
        with later.capturing_at_first_use() if later is not None else contextlib.nullcontext():
            for batch in answers:  # throwaway answers, ``batch`` streams together (the later blocks' graphs)
                self._throwaway_answer(batch, block_sizes)
        release_cached(self._device, "decoder warm-up")
        seconds = time.perf_counter() - started
        captured = sum(len(shapes) for shapes in self.captured_graphs.values()) - before
        logger.info("decoder warm-up: %d CUDA graphs for batches %s in %.1f s", captured, list(batch_sizes), seconds)
        return seconds

    # ---- internals ---------------------------------------------------------------------------------
    def _throwaway_answer(self, batch: int, block_sizes: Sequence[int]) -> None:
        """``batch`` streams decoded together through ``block_sizes`` (the last twice), then finished."""
        streams = [self.stream(seed=row) for row in range(batch)]
        try:
            offset = 0
            for size in list(block_sizes) + [block_sizes[-1]]:
                codes = [(offset + 7 * k) % self._num_codes for k in range(size)]
                for result in self.feed_many([(stream, codes) for stream in streams]):
                    if isinstance(result, Exception):
                        raise result
                offset += size
            for stream in streams:
                stream.finish()
        finally:
            for stream in streams:
                stream.close()

    def _add_codes(self, state: StreamState, codes: list[int]):
        """Append codes to a claimed stream; its next block once ``min_block_tokens`` are pending."""
        if state.finished:
            raise DecoderError("this stream is finished; start a new one with decoder.stream()")
        state.pending.extend(codes)
        if len(state.pending) < self.min_block_tokens:
            return None
        return take_block(state, self._geometry, finalize=False)

    def _claim(self, state: StreamState) -> None:
        with self._claims:
            self._mark_busy(state)

    @staticmethod
    def _mark_busy(state: StreamState) -> None:
        """Call with ``_claims`` held."""
        if state.busy:
            raise RuntimeError(
                "DecoderStream is used from two threads at once (or twice in one feed_many call); "
                "give each caller its own stream"
            )
        state.busy = True

    def _unclaim(self, state: StreamState) -> None:
        with self._claims:
            state.busy = False

    def _end(self, state: StreamState) -> None:
        state.finished = True
        state.drop_tensors()

    def _emit(self, state: StreamState, speech: torch.Tensor) -> np.ndarray:
        """A block's audio on the host (call within the device context)."""
        pcm = speech[0].float().cpu().numpy()
        self._count_emitted(state, pcm.shape[0])
        return pcm

    @staticmethod
    def _count_emitted(state: StreamState, samples: int) -> None:
        if samples and state.first_audio_at is None:
            state.first_audio_at = time.perf_counter()
        state.samples_emitted += samples

    def _pcm_to_host(self, state: StreamState, speech: torch.Tensor) -> torch.Tensor:
        """:meth:`_emit` without waiting: the audio's copy to the host is queued on the device (read it
        after the device has passed that point)."""
        pcm = speech[0].float().to("cpu", non_blocking=True)  # into pinned memory, from a CUDA device
        self._count_emitted(state, pcm.shape[0])
        return pcm

    def _token2wav_state(self, seed: int | None) -> StreamState:
        return self.new_state(
            DEFAULT_TOKEN2WAV_SEED if seed is None else seed, prompt_window=None, noise=OriginalNoise()
        )

    def _code_tensor(self, codes, name: str) -> torch.Tensor:
        """(1, n) int64 codes on the device (None: no codes)."""
        if codes is None:
            return torch.zeros(1, 0, dtype=torch.long, device=self._device)
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[0] != 1:
            raise DecoderError(f"{name} must have shape (1, n), got {tuple(codes.shape)}")
        validate_codes(codes[0], self._num_codes)
        return codes.to(self._device, torch.long)

    def _prompt_feat(self, feat, frames: int) -> torch.Tensor:
        """(1, P, 80) float32 prompt mel on the device, P <= ``frames`` (None: no prompt)."""
        if feat is None:
            return torch.zeros(1, 0, NUM_MEL_BINS, device=self._device)
        feat = torch.as_tensor(feat)
        if feat.dim() != 3 or feat.shape[0] != 1 or feat.shape[2] != NUM_MEL_BINS or not feat.is_floating_point():
            raise DecoderError(
                f"prompt_feat must be a float tensor of shape (1, frames, {NUM_MEL_BINS}), got {tuple(feat.shape)}"
            )
        if feat.shape[1] > frames:
            raise DecoderError(
                f"prompt_feat has {feat.shape[1]} frames, more than the {frames} of its tokens and the new ones"
            )
        return feat.to(self._device, torch.float32)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self._device).manual_seed(mix_seed(seed, HIFT_SEED_STREAM))

    @contextlib.contextmanager
    def _device_context(self) -> Iterator[None]:
        """The lock, inference mode and (on CUDA) the decoder's own stream, which first waits for the
        work queued on the caller's stream (inputs the caller prepared there)."""
        with self._lock, torch.inference_mode():
            if self._cuda_stream is None:
                yield
                return
            self._cuda_stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(self._cuda_stream):
                yield


class NotDecoded(Exception):
    """:meth:`AudioDecoder.feed_many`'s result for a job its ``stop`` left undecoded (its stream is as
    before the call: give the job again)."""


class _Pause:
    """:meth:`AudioDecoder.feed_many`'s ``pause``, timed: ``seconds`` spent in it so far."""

    def __init__(self, pause: Callable[[], None]):
        self.pause = pause
        self.seconds = 0.0

    def __call__(self) -> None:
        started = time.perf_counter()
        try:
            self.pause()
        finally:
            self.seconds += time.perf_counter() - started


def _state_of(stream: DecoderStream | StreamState) -> StreamState:
    if isinstance(stream, DecoderStream):
        return stream.state
    if isinstance(stream, StreamState):
        return stream
    raise TypeError(f"expected a DecoderStream or StreamState, got {type(stream).__name__}")
