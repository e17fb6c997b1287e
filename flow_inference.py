"""Speech tokens -> 22.05 kHz speech with the published ``glm-4-voice-decoder`` folder, offline and streaming.

    decoder = AudioDecoder.from_pretrained("THUDM/glm-4-voice-decoder", device="cuda")
    stream = decoder.stream(seed=0)
    for block in blocks_of_codes:           # 0-based audio codes, any block sizes
        play(stream.feed(block))            # float32 mono PCM at OUTPUT_SAMPLE_RATE (maybe empty)
    play(stream.finish())
    pcm = decoder.decode(all_codes, seed=0) # offline

Each block runs the flow on (prompt tokens + new tokens) with the prompt's mel as condition, like the
original; the last 34 mel frames (5 tokens) of a block are held back and cross-faded (Hamming) with the
next block's version of them, and the vocoder carries one mel frame and its 256 source samples across
blocks. Differences from the original, all deliberate:

- the prompt is a bounded window of the latest ``prompt_window`` tokens (default 100 = 8 s; the original
  used every earlier token, so the cost per block grew with the answer); ``prompt_window=None`` restores
  that, and then the result equals the original's (with PR #86's prompt bookkeeping: the vocoder's cache
  frame is not counted twice in the prompt mel);
- the ODE's starting noise is a function of (seed, absolute mel frame) (:class:`NoiseTimeline`), so
  streamed and offline decodes see the same noise; the original reseeded the global RNG with 42;
- at each seam the vocoder's first frame (which it computes without left context) is cross-faded over
  256 samples with the previous block's version of that frame (``seam_crossfade``, on by default; the
  original had this cross-fade written but commented out, and its seams show a measurable jump);
- models run in eval mode (the original left dropout on); the tail is always decoded by ``finish()``
  (the original dropped it when generation ended without ``<|user|>``); bad input raises ValueError.

Speed (H100, published size, docs/perf/decoder.md): ``dtype=torch.bfloat16`` runs the flow's estimator
in bf16 (mel within ~1% rms of float32): a 60 s answer streams at RTF 0.012 with time per block flat,
the first 10-token block takes ~45 ms. On CUDA the ODE is replayed as CUDA graphs.

Many streams at once: :meth:`AudioDecoder.feed_many` decodes the next block of several streams together:
blocks of the same shape (same token and prompt lengths, same carried state: streams that follow the
same block schedule mostly are) run as one batch through the flow encoder, the ODE and the vocoder, so
a launch-bound block costs about as much for 16 streams as for one. Each row keeps its own noise,
prompt and vocoder randomness, so a stream's audio does not depend on its batch-mates (up to float
rounding of batch-size-dependent kernels).

Thread safety: one :class:`AudioDecoder` may serve many streams from many threads: all model work runs
under one lock (the CUDA graphs have static buffers), on the decoder's own CUDA stream (so the work of
other components of the process, such as the speech tokenizer, can run beside it). A
:class:`DecoderStream` itself belongs to one caller at a time; concurrent calls on the same stream
raise RuntimeError.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cosyvoice.config import load_decoder_config
from cosyvoice.flow.cuda_graph import GraphedEulerSolver
from cosyvoice.flow.flow_matching import original_noise
from cosyvoice.flow.noise import NoiseSource, NoiseTimeline, mix_seed
from glm4voice.audio import MEL_HOP_LENGTH, NUM_MEL_BINS, OUTPUT_SAMPLE_RATE, SPEAKER_EMBEDDING_DIM
from glm4voice.devices import default_device
from glm4voice.hub import PUBLISHED_DECODER, resolve_checkpoint

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"

TOKEN_OVERLAP = 5
"""Tokens' worth of mel held back at the end of a block and cross-faded with the next block."""
MEL_CACHE_FRAMES = 1
"""Mel frames (and their source samples) the vocoder carries across blocks."""
DEFAULT_PROMPT_WINDOW = 100
"""Prompt tokens (8 s of speech) kept as the flow's context for the next block."""
N_TIMESTEPS = 10
HIFT_SEED_STREAM = 1
_DEFAULT = object()


class DecoderError(ValueError):
    """Input the decoder cannot decode (empty, out-of-range codes, a finished stream...)."""


def validate_codes(codes: Sequence[int] | np.ndarray | torch.Tensor, num_codes: int) -> list[int]:
    """0-based audio codes as a list of ints, or DecoderError."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    if isinstance(codes, np.ndarray):
        if codes.ndim == 2 and codes.shape[0] == 1:
            codes = codes[0]
        if codes.ndim != 1:
            raise DecoderError(f"audio codes must be one sequence, got an array of shape {codes.shape}")
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            raise DecoderError(f"audio codes must be integers, got dtype {codes.dtype}")
        values = codes.tolist()
    else:
        if isinstance(codes, (str, bytes)):
            raise DecoderError("audio codes must be a sequence of integers, not a string")
        values = list(codes)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DecoderError(f"audio codes must be integers, got {value!r} ({type(value).__name__})")
    values = [int(v) for v in values]
    bad = [v for v in values if not 0 <= v < num_codes]
    if bad:
        raise DecoderError(
            f"audio code {bad[0]} is out of range: codes are 0 ... {num_codes - 1} "
            f"(subtract the id of <|audio_0|> from LLM token ids)"
        )
    return values


def _hamming_fade(length: int, device) -> torch.Tensor:
    """The original's mel cross-fade window (symmetric Hamming of twice the overlap, float64)."""
    return torch.from_numpy(np.hamming(2 * length)).to(device)


def _raised_cosine_fade_in(length: int, device) -> torch.Tensor:
    """sin² ramp over ``length`` samples; with 1 - ramp as fade-out the gains sum to 1."""
    phase = (torch.arange(length, dtype=torch.float64) + 0.5) / length * (np.pi / 2)
    return torch.sin(phase).pow(2).float().to(device)


@dataclass
class VocoderCarry:
    """What one stream carries from block to block (the original's per-uuid dict entries)."""

    generator: torch.Generator
    """Randomness of the vocoder's source (sine phases, noise)."""
    mel_overlap: torch.Tensor | None = None
    """(1, 80, 34): the last block's mel frames that the next block regenerates and cross-fades."""
    cache_mel: torch.Tensor | None = None
    """(1, 80, 1): the last vocoded frame, whose audio was held back."""
    cache_source: torch.Tensor | None = None
    """(1, 1, 256): the source samples of that frame."""
    cache_speech: torch.Tensor | None = None
    """(1, 256): the held-back audio of that frame, as the last block vocoded it."""

    def clear(self) -> None:
        self.mel_overlap = self.cache_mel = self.cache_source = self.cache_speech = None


@dataclass
class _Block:
    """The inputs of one stream's block: flow over ``tokens`` (the first ``prompt_tokens`` are the prompt,
    whose mel is ``prompt_mel`` (1, 80, P)) into ``feat_len`` frames from ``noise``."""

    tokens: torch.Tensor
    prompt_tokens: int
    prompt_mel: torch.Tensor
    feat_len: int
    noise: torch.Tensor
    carry: "VocoderCarry"
    finalize: bool

    def shape_key(self) -> tuple:
        """Blocks with equal keys can run as one batch with no padding."""
        c = self.carry
        return (self.tokens.shape[1], self.prompt_tokens, self.prompt_mel.shape[2], self.feat_len, self.finalize,
                c.mel_overlap is None, c.cache_mel is None, c.cache_source is None, c.cache_speech is None)  # fmt: skip


@dataclass
class BlockResult:
    speech: torch.Tensor
    """(1, samples) float32 on the decoder's device."""
    mel: torch.Tensor
    """(1, 80, frames) final mel frames of this block (what later blocks take as prompt)."""


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
        compile_first_blocks: bool = False,
    ):
        """``dtype``: float32 (exact) or bfloat16/float16 (the flow's estimator in that dtype: ~2x faster
        on a GPU; mel within ~1% rms of float32, see docs/perf/decoder.md).
        ``cuda_graphs``: replay the ODE as CUDA graphs (default: on for CUDA devices).
        ``min_block_tokens``: a stream decodes once this many tokens are pending (default: the flow
        encoder's block size, 10).
        ``seam_crossfade``: cross-fade the two vocodings of the frame at each block seam (the one the
        last block held back and the one the new block starts with); off, the audio equals the
        original's, whose vocoder restarts at each seam without left context.
        ``compile_first_blocks`` (experimental, CUDA): ``torch.compile`` the estimator for the exact-length
        graphs of short blocks (the first 10-token block: 41 ms instead of 45 ms with bf16 on an H100),
        at the price of about a minute of compiling at first use."""
        self.device = torch.device(device)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.dtype = dtype
        with torch.device("meta"):
            config = load_decoder_config(config_path)
        self.flow = config["flow"]
        self.hift = config["hift"]
        _load_strict(self.flow, flow_ckpt_path, "flow")
        _load_strict(self.hift, hift_ckpt_path, "hift")
        self.flow.to(self.device).eval()
        self.hift.to(self.device).eval()
        self.sample_rate = OUTPUT_SAMPLE_RATE
        self.num_codes = int(self.flow.vocab_size)
        self.block_size = int(getattr(self.flow.encoder, "block_size", None) or TOKEN_OVERLAP * 2)
        self.samples_per_frame = int(self.hift.upsample_scale)
        if self.samples_per_frame != MEL_HOP_LENGTH or self.flow.output_size != NUM_MEL_BINS:
            raise ValueError("the decoder config does not produce 80-bin mel at a hop of 256 samples")
        self.mel_overlap_len = int(TOKEN_OVERLAP / self.flow.input_frame_rate * OUTPUT_SAMPLE_RATE / MEL_HOP_LENGTH)
        self.source_cache_len = MEL_CACHE_FRAMES * self.samples_per_frame
        self.min_block_tokens = int(min_block_tokens or self.block_size)
        self.prompt_window = self._check_window(prompt_window)
        self._fade = _hamming_fade(self.mel_overlap_len, self.device)
        self.seam_crossfade = seam_crossfade
        self._seam_fade_in = _raised_cosine_fade_in(self.source_cache_len, self.device)
        self._embedding = torch.zeros(1, SPEAKER_EMBEDDING_DIM, device=self.device)
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        if dtype != torch.float32:  # the estimator alone; encoder, ODE state and vocoder stay float32
            self.flow.decoder.estimator.to(dtype)
        self._solver = GraphedEulerSolver(self.flow.decoder, compile_exact=compile_first_blocks)
        self._solve = self._solver if use_graphs else self._solver.eager
        self._lock = threading.RLock()
        self._cuda_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self._cuda_stream is not None:
            torch.cuda.synchronize(self.device)  # weights and constants are ready before the decoder's stream reads them

    @classmethod
    def from_pretrained(
        cls,
        folder_or_hub_id: str | os.PathLike = PUBLISHED_DECODER,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        **options,
    ) -> AudioDecoder:
        """Load a ``glm-4-voice-decoder`` folder (local path or hub id) as published."""
        folder = resolve_checkpoint(folder_or_hub_id, allow_patterns=[CONFIG_FILE, FLOW_FILE, HIFT_FILE])
        if device is None:
            device = default_device()
        return cls(folder / CONFIG_FILE, folder / FLOW_FILE, folder / HIFT_FILE, device, dtype=dtype, **options)

    # ---- public API ------------------------------------------------------------------------------
    def stream(self, seed: int | None = None, prompt_window=_DEFAULT, noise: NoiseSource | None = None) -> DecoderStream:
        """A new streaming decode. ``seed`` fixes the result (None: a fresh random seed);
        ``prompt_window``: prompt tokens kept (None: all, like the original; default: the decoder's)."""
        window = self.prompt_window if prompt_window is _DEFAULT else self._check_window(prompt_window)
        return DecoderStream(self, _seed(seed), window, noise)

    def decode(self, codes: Sequence[int], seed: int | None = None) -> np.ndarray:
        """Offline decode of a whole answer: float32 PCM at ``sample_rate``."""
        codes = validate_codes(codes, self.num_codes)
        if not codes:
            raise DecoderError("no audio codes to decode")
        seed = _seed(seed)
        with self._device_context():
            tokens = torch.tensor([codes], dtype=torch.long, device=self.device)
            frames = self.flow.mel_frames(len(codes))
            noise = NoiseTimeline(seed).take(0, frames)
            carry = VocoderCarry(self._generator(seed))
            result = self._decode_block(tokens, 0, self._empty_mel(), frames, noise, carry, finalize=True)
            return result.speech[0].float().cpu().numpy()

    def feed_many(
        self,
        jobs: Sequence[tuple["DecoderStream", Sequence[int]]],
        on_result: Callable[[int, "np.ndarray | Exception"], None] | None = None,
        max_batch: int | None = None,
    ) -> list["np.ndarray | Exception"]:
        """``stream.feed(codes)`` for each ``(stream, codes)`` job (each stream at most once), with the
        blocks that have the same shape decoded as one batch of at most ``max_batch`` (default
        ``self.max_batch``). Returns each job's PCM, or the exception its stream raised (bad codes, a
        finished stream, a failed decode); ``on_result(index, result)`` is called as soon as a job is done
        (first the groups whose streams have played the least audio: they are the most urgent)."""
        results: list = [None] * len(jobs)
        limit = max(1, int(max_batch or self.max_batch))
        claimed: dict[int, DecoderStream] = {}

        def done(index: int, result) -> None:
            results[index] = result
            stream = claimed.pop(index, None)
            if stream is not None:  # free the stream before its caller hears of the result
                stream._busy.release()
            if on_result is not None:
                on_result(index, result)

        prepared: list[tuple[int, DecoderStream, _Block]] = []
        try:
            for index, (stream, codes) in enumerate(jobs):
                try:
                    block = stream._claim_and_prepare(codes)
                except Exception as error:  # this job only: bad codes, finished or busy stream
                    done(index, error)
                    continue
                claimed[index] = stream
                if block is None:  # fewer than min_block_tokens pending: nothing to decode yet
                    done(index, _EMPTY.copy())
                else:
                    prepared.append((index, stream, block))
            groups: dict[tuple, list[tuple[int, DecoderStream, _Block]]] = {}
            for item in prepared:
                groups.setdefault(item[2].shape_key(), []).append(item)
            batches = [members[i : i + limit] for members in groups.values() for i in range(0, len(members), limit)]
            batches.sort(key=lambda batch: min(stream.samples_emitted for _, stream, _ in batch))
            for batch in batches:
                try:
                    with self._device_context():
                        outputs = self._decode_blocks([block for _, _, block in batch])
                        pcms = [stream._commit(block, out) for (_, stream, block), out in zip(batch, outputs)]
                except Exception as error:  # every stream of the batch fails (its pending tokens are gone)
                    if not isinstance(error, DecoderError):
                        logger.exception("decoding a batch of %d blocks failed", len(batch))
                    for index, stream, _ in batch:
                        stream.close()
                        done(index, error)
                    continue
                for (index, _, _), pcm in zip(batch, pcms):
                    done(index, pcm)
        finally:
            for stream in claimed.values():  # only after an unexpected error above
                stream._busy.release()
        return results

    def mel_frames(self, tokens: int) -> int:
        """Mel frames the flow makes for ``tokens`` tokens (the original's float32 arithmetic)."""
        return self.flow.mel_frames(tokens)

    # ---- the original's methods -----------------------------------------------------------------
    def new_state(self, seed: int | None = None) -> VocoderCarry:
        """Per-stream state for :meth:`token2wav` (the original kept it in dicts keyed by a uuid)."""
        return VocoderCarry(self._generator(_seed(seed)))

    def token2wav(
        self,
        token: torch.Tensor,
        state: VocoderCarry,
        prompt_token: torch.Tensor | None = None,
        prompt_feat: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        finalize: bool = False,
        *,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's block call: ``token`` (1, n) codes, prompt tokens (1, p) and prompt mel
        (1, P, 80) managed by the caller, ``state`` from :meth:`new_state` in place of the uuid.
        Returns (speech (1, samples), mel (1, 80, frames)); unlike the original, the mel excludes the
        vocoder's cache frame, so callers can append it to their prompt mel as is (PR #86)."""
        if not isinstance(state, VocoderCarry):
            raise TypeError("token2wav takes the per-stream state from AudioDecoder.new_state() in place of a uuid")
        token = token.to(self.device).long()
        if token.dim() != 2 or token.shape[0] != 1 or token.shape[1] == 0:
            raise DecoderError(f"token must have shape (1, n>0), got {tuple(token.shape)}")
        validate_codes(token[0], self.num_codes)
        prompt_token = torch.zeros(1, 0, dtype=torch.long) if prompt_token is None else prompt_token
        prompt_feat = torch.zeros(1, 0, NUM_MEL_BINS) if prompt_feat is None else prompt_feat
        if prompt_token.shape[1]:
            validate_codes(prompt_token[0], self.num_codes)
        tokens = torch.cat([prompt_token.to(self.device).long(), token], dim=1)
        feat_len = self.flow.mel_frames(tokens.shape[1])
        if noise is None:  # the original's draw: seed 42, over prompt and new frames
            noise = original_noise((1, NUM_MEL_BINS, feat_len))
        embedding = self._embedding if embedding is None else embedding.to(self.device)
        with self._device_context():
            result = self._decode_block(
                tokens, prompt_token.shape[1], prompt_feat.to(self.device).transpose(1, 2), feat_len, noise, state, finalize, embedding
            )
        return result.speech, result.mel

    def offline_inference(self, token: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The original's one-shot decode: (1, n) codes -> (1, samples) float32 CPU tensor."""
        return torch.from_numpy(self.decode(torch.as_tensor(token).reshape(-1), seed=seed)).unsqueeze(0)

    def stream_inference(self, token: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The original's streaming self-test: blocks of ``block_size`` tokens -> (1, samples) CPU tensor."""
        codes = validate_codes(torch.as_tensor(token).reshape(-1), self.num_codes)
        if not codes:
            raise DecoderError("no audio codes to decode")
        stream = self.stream(seed)
        pieces = [stream.feed(codes[i : i + self.block_size]) for i in range(0, len(codes), self.block_size)]
        pieces.append(stream.finish())
        return torch.from_numpy(np.concatenate(pieces)).unsqueeze(0)

    # ---- internals -------------------------------------------------------------------------------
    def _check_window(self, window: int | None) -> int | None:
        if window is None:
            return None
        if isinstance(window, bool) or not isinstance(window, int) or window < self.block_size:
            raise ValueError(f"prompt_window must be None or an integer >= {self.block_size} tokens, got {window!r}")
        return window

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(mix_seed(seed, HIFT_SEED_STREAM))

    def _empty_mel(self) -> torch.Tensor:
        return torch.zeros(1, NUM_MEL_BINS, 0, device=self.device)

    @contextlib.contextmanager
    def _device_context(self):
        """The lock, inference mode and (on CUDA) the decoder's own stream, which first waits for the
        work queued on the caller's stream (inputs the caller prepared there)."""
        with self._lock, torch.inference_mode():
            if self._cuda_stream is None:
                yield
                return
            self._cuda_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._cuda_stream):
                yield

    def warm_up(self, block_sizes: Sequence[int], batch_sizes: Sequence[int] = (1,)) -> float:
        """Capture, before the first listener, the ODE graphs of every block that streams following
        ``block_sizes`` (early flushes included) can make, for each batch size of :meth:`feed_many`:
        the exact-length first block and every padded length up to the prompt window plus the largest
        block; then decode one throwaway answer (the encoder's and vocoder's kernels). Without it a
        graph is captured at its first use (~0.5 s during which every stream waits). Returns seconds."""
        started = time.perf_counter()
        captured = 0
        if self._solve is self._solver and self.device.type == "cuda":
            frames = [self.mel_frames(block_sizes[0])]
            if self.prompt_window is not None:
                bucket = self._solver.bucket_frames
                longest = self.mel_frames(self.prompt_window + self.block_size + max(block_sizes))
                frames += list(range(bucket, longest + bucket, bucket))
            channels = self.flow.output_size
            with self._device_context():
                captured = self._solver.prepare(batch_sizes, frames, N_TIMESTEPS + 1, channels, channels, channels, self.device)
        stream = self.stream(seed=0)
        try:
            offset = 0
            for size in list(block_sizes) + [block_sizes[-1]]:
                stream.feed([(offset + 7 * k) % self.num_codes for k in range(size)])
                offset += size
            stream.finish()
        finally:
            stream.close()
        seconds = time.perf_counter() - started
        logger.info("decoder warm-up: %d ODE graphs for batches %s in %.1f s", captured, list(batch_sizes), seconds)
        return seconds

    @property
    def hold_back_s(self) -> float:
        """Audio a stream holds back until its next block (the mel overlap it cross-fades), in seconds."""
        return self.mel_overlap_len * self.samples_per_frame / self.sample_rate

    @property
    def max_batch(self) -> int:
        """Most blocks decoded as one batch by :meth:`feed_many` (the ODE's graphs are captured per batch size)."""
        return self._solver.max_batch

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes with ODE graphs (a batch runs in the next size up): what :meth:`warm_up` takes."""
        return self._solver.batch_sizes

    def _decode_block(
        self,
        tokens: torch.Tensor,
        prompt_tokens: int,
        prompt_mel: torch.Tensor,
        feat_len: int,
        noise: torch.Tensor,
        carry: VocoderCarry,
        finalize: bool,
        embedding: torch.Tensor | None = None,
    ) -> BlockResult:
        """One block (see :class:`_Block`), with the cross-fade, vocoder and carry bookkeeping."""
        block = _Block(tokens, prompt_tokens, prompt_mel, feat_len, noise, carry, finalize)
        return self._decode_blocks([block], embedding)[0]

    def _decode_blocks(self, blocks: Sequence[_Block], embedding: torch.Tensor | None = None) -> list[BlockResult]:
        """Blocks of the same :meth:`_Block.shape_key` (one per stream) as one batch. Call within
        :meth:`_device_context`."""
        overlap = self.mel_overlap_len
        first = blocks[0]
        batch = len(blocks)
        prompt_tokens, finalize, carries = first.prompt_tokens, first.finalize, [b.carry for b in blocks]
        tokens = torch.cat([b.tokens for b in blocks]).to(self.device)
        embedding = (self._embedding if embedding is None else embedding).expand(batch, -1)
        prompt_mel = torch.cat([b.prompt_mel for b in blocks])
        lengths = torch.full((batch,), tokens.shape[1] - prompt_tokens, dtype=torch.int32, device=self.device)
        mel = self.flow.inference(
            token=tokens[:, prompt_tokens:],
            token_len=lengths,
            prompt_token=tokens[:, :prompt_tokens],
            prompt_token_len=torch.full((batch,), prompt_tokens, dtype=torch.int32, device=self.device),
            prompt_feat=prompt_mel.transpose(1, 2),
            prompt_feat_len=torch.full((batch,), prompt_mel.shape[2], dtype=torch.int32, device=self.device),
            embedding=embedding,
            feat_len=first.feat_len,
            n_timesteps=N_TIMESTEPS,
            noise=torch.cat([b.noise.to(self.device) for b in blocks]),
            solve=self._solve,
        ).float()
        if first.carry.mel_overlap is not None:
            previous = torch.cat([c.mel_overlap for c in carries])
            faded = mel[:, :, :overlap] * self._fade[:overlap] + previous * self._fade[overlap:]
            mel = torch.cat([faded.to(mel.dtype), mel[:, :, overlap:]], dim=2)
        vocoder_mel = mel if first.carry.cache_mel is None else torch.cat([torch.cat([c.cache_mel for c in carries]), mel], dim=2)
        cache_source = None if first.carry.cache_source is None else torch.cat([c.cache_source for c in carries])
        generators = [c.generator for c in carries]
        generator = generators[0] if batch == 1 else generators
        if finalize:
            speech, _ = self.hift.inference(vocoder_mel, cache_source, generator)
            speech = self._join_seam(speech, carries)
            for c in carries:
                c.clear()
            return [BlockResult(speech[i : i + 1], mel[i : i + 1]) for i in range(batch)]
        if vocoder_mel.shape[2] <= overlap:
            raise DecoderError(f"a streamed block needs more than {overlap} mel frames; decode more tokens at once")
        held_back = vocoder_mel[:, :, -overlap:]
        vocoder_mel = vocoder_mel[:, :, :-overlap]
        speech, source = self.hift.inference(vocoder_mel, cache_source, generator)
        speech = self._join_seam(speech, carries)
        n = self.source_cache_len
        for i, c in enumerate(carries):
            c.mel_overlap = held_back[i : i + 1]
            c.cache_mel = vocoder_mel[i : i + 1, :, -MEL_CACHE_FRAMES:]
            c.cache_source = source[i : i + 1, :, -n:]
            c.cache_speech = speech[i : i + 1, -n:]
        return [BlockResult(speech[i : i + 1, :-n], mel[i : i + 1, :, :-overlap]) for i in range(batch)]

    def _join_seam(self, speech: torch.Tensor, carries: Sequence[VocoderCarry]) -> torch.Tensor:
        """Cross-fade the start of each row's audio (the carried frame) with the last block's version of it."""
        if not self.seam_crossfade or carries[0].cache_speech is None:
            return speech
        n = self.source_cache_len
        fade_in = self._seam_fade_in
        previous = torch.cat([c.cache_speech for c in carries])
        head = speech[:, :n] * fade_in + previous * (1 - fade_in)
        return torch.cat([head, speech[:, n:]], dim=1)

    def _flush(self, carry: VocoderCarry) -> torch.Tensor:
        """Vocode the held-back overlap after the last block (the stream ended on a block boundary)."""
        with self._device_context():
            mel = carry.mel_overlap if carry.cache_mel is None else torch.cat([carry.cache_mel, carry.mel_overlap], dim=2)
            speech, _ = self.hift.inference(mel, carry.cache_source, carry.generator)
            speech = self._join_seam(speech, [carry])
            carry.clear()
            return speech


class DecoderStream:
    """One streamed answer: ``feed(codes) -> pcm`` any number of times, then ``finish() -> pcm``.

    Tokens are decoded once at least ``min_block_tokens`` are pending (else ``feed`` returns an empty
    array and keeps them). The audio of all calls together has ``decoder.mel_frames(n) * 256`` samples
    for n tokens, like the offline decode.
    """

    def __init__(self, decoder: AudioDecoder, seed: int, prompt_window: int | None, noise: NoiseSource | None = None):
        self.decoder = decoder
        self.seed = seed
        self.prompt_window = prompt_window
        self._noise = noise if noise is not None else NoiseTimeline(seed)
        self._carry = VocoderCarry(decoder._generator(seed))
        self._pending: list[int] = []
        self._tokens = torch.zeros(0, dtype=torch.long)  # decoded tokens from _token_offset on (CPU)
        self._token_offset = 0
        self._mel = decoder._empty_mel()  # final mel frames from _mel_offset on
        self._mel_offset = 0
        self.tokens_decoded = 0
        self.frames_final = 0
        """Mel frames whose audio is final (emitted, or held back only as the vocoder cache frame)."""
        self.samples_emitted = 0
        self.finished = False
        self._new: torch.Tensor | None = None
        self._busy = threading.Lock()

    # ---- public ----------------------------------------------------------------------------------
    def feed(self, codes: Sequence[int]) -> np.ndarray:
        """Add codes; decode them (and earlier pending ones) once ``min_block_tokens`` are pending."""
        result = self.decoder.feed_many([(self, codes)], max_batch=1)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def finish(self) -> np.ndarray:
        """Decode what is pending and the held-back tail; the stream cannot be fed afterwards."""
        with self._exclusive():
            if self.finished:
                raise DecoderError("this stream is already finished")
            self.finished = True
            try:
                if self._pending:
                    block = self._prepare(finalize=True)
                    with self.decoder._device_context():
                        return self._commit(block, self.decoder._decode_blocks([block])[0])
                if self._carry.mel_overlap is not None:
                    with self.decoder._device_context():
                        return self._emit(self.decoder._flush(self._carry))
                return _EMPTY.copy()
            finally:
                self.close()

    def close(self) -> None:
        """Drop the stream's tensors (finish() does this too)."""
        self.finished = True
        self._pending = []
        self._carry.clear()
        self._mel = self._tokens = None

    @property
    def pending_tokens(self) -> int:
        return len(self._pending)

    def __enter__(self) -> DecoderStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------------
    def _exclusive(self):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("DecoderStream is used from two threads at once; give each caller its own stream")
        return _Release(self._busy)

    def _window_start(self, tokens: int) -> int:
        """First prompt token for a block after ``tokens`` decoded tokens: a multiple of the encoder's
        block size (so its block-causal partition is unchanged) that keeps >= prompt_window tokens."""
        if self.prompt_window is None or tokens <= self.prompt_window:
            return 0
        block = self.decoder.block_size
        return (tokens - self.prompt_window) // block * block

    def _claim_and_prepare(self, codes: Sequence[int]) -> _Block | None:
        """For :meth:`AudioDecoder.feed_many`: take the stream (the caller releases ``_busy``), add the
        codes, and return the block to decode (None: fewer than ``min_block_tokens`` pending)."""
        codes = validate_codes(codes, self.decoder.num_codes)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("DecoderStream is used from two threads at once; give each caller its own stream")
        try:
            if self.finished:
                raise DecoderError("this stream is finished; start a new one with decoder.stream()")
            self._pending.extend(codes)
            if len(self._pending) < self.decoder.min_block_tokens:
                return None
            return self._prepare(finalize=False)
        except BaseException:
            self._busy.release()
            raise

    def _prepare(self, finalize: bool) -> _Block:
        """The next block's inputs from the pending tokens and the kept prompt (tokens, mel, noise)."""
        decoder = self.decoder
        new = torch.tensor(self._pending, dtype=torch.long)
        self._pending = []
        done, total = self.tokens_decoded, self.tokens_decoded + len(new)
        start = self._window_start(done)
        start_frame = decoder.mel_frames(start)
        end_frame = decoder.mel_frames(total)
        prompt = self._tokens[start - self._token_offset :]
        tokens = torch.cat([prompt, new]).unsqueeze(0)
        prompt_mel = self._mel[:, :, start_frame - self._mel_offset : self.frames_final - self._mel_offset]
        noise = self._noise.take(start_frame, end_frame)
        self._new = new
        return _Block(tokens, prompt.numel(), prompt_mel, end_frame - start_frame, noise, self._carry, finalize)

    def _commit(self, block: _Block, result: BlockResult) -> np.ndarray:
        """Keep the block's tokens and mel as the next prompt (within the window); the PCM on the host.
        Call within the decoder's device context."""
        decoder = self.decoder
        new, self._new = self._new, None
        total = self.tokens_decoded + len(new)
        self.tokens_decoded = total
        self.frames_final += result.mel.shape[2]
        if block.finalize:
            return self._emit(result.speech)
        self._tokens = torch.cat([self._tokens, new])
        self._mel = torch.cat([self._mel, result.mel], dim=2)
        keep = self._window_start(total)
        keep_frame = decoder.mel_frames(keep)
        self._tokens = self._tokens[keep - self._token_offset :]
        self._token_offset = keep
        self._mel = self._mel[:, :, keep_frame - self._mel_offset :]
        self._mel_offset = keep_frame
        self._noise.forget_before(keep_frame)
        return self._emit(result.speech)

    def _emit(self, speech: torch.Tensor) -> np.ndarray:
        pcm = speech[0].float().cpu().numpy()
        self.samples_emitted += pcm.shape[0]
        return pcm


class _Release:
    def __init__(self, lock: threading.Lock):
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        self._lock.release()


_EMPTY = np.zeros(0, dtype=np.float32)


def _seed(seed: int | None) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def _load_strict(module: torch.nn.Module, path: str | os.PathLike, what: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state dict (found {type(state).__name__})")
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the {what} model of config.yaml: {error}") from error
    leftover = [name for name, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"{path} left parameters unset: {leftover[:5]}")
