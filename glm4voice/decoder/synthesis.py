"""Blocks -> mel -> speech: the flow and the vocoder with the seam bookkeeping between blocks.

One call decodes a batch of blocks (one per stream) and updates their carries. Blocks of the same
:meth:`~glm4voice.decoder.blocks.Block.shape_key` run as one batch all the way; blocks of different
lengths share the flow as one padded batch (masked encoder and ODE, the length regulator row by row)
and the vocoder in groups of the same :meth:`~glm4voice.decoder.blocks.Block.vocoder_key` (the vocoder
has no masks: its convolutions and STFT would see the padding). Either way each row gets what it
would alone, up to float rounding.

- the flow makes the block's mel (prompt tokens + new tokens, conditioned on the prompt's mel);
- the first 34 frames (5 tokens) are cross-faded (Hamming) with the previous block's version of them,
  and the last 34 are held back for the next block (unless the block is final);
- the vocoder starts from the frame it carried over (one mel frame and its 256 source samples) and
  holds back the audio of its new last frame; with ``seam_crossfade`` the first 256 samples are
  cross-faded with the previous block's version of them (the vocoder computes them without left
  context; without the fade the seam is an audible jump, as in the original).

First blocks (no prompt, nothing carried) may run as CUDA graphs of whole stages, and the encoder and
the vocoder of later blocks as graphs of their own (:mod:`glm4voice.decoder.graphs`); everything else
runs the modules, with the ODE's own graphs when ``solve`` is a
:class:`~cosyvoice.flow.cuda_graph.GraphedEulerSolver`.

Not thread-safe: the caller (:class:`~glm4voice.decoder.AudioDecoder`) holds its lock and device
context around every call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch

from glm4voice.audio import SPEAKER_EMBEDDING_DIM
from glm4voice.decoder.blocks import Block, BlockResult
from glm4voice.decoder.codes import DecoderError
from glm4voice.decoder.graphs import FirstBlockGraphs, LaterBlockGraphs
from glm4voice.decoder.options import MEL_CACHE_FRAMES, N_TIMESTEPS
from glm4voice.decoder.state import VocoderCarry
from glm4voice.decoder.stats import DecodeStats

if TYPE_CHECKING:
    from cosyvoice.flow.flow import MaskedDiffWithXvec, RowInputs
    from cosyvoice.hifigan.generator import HiFTGenerator

Solve = Callable[..., torch.Tensor]
"""``solve(z, mu, mask, spks, cond, t_span, between_steps=None) -> mel`` (the eager ODE or its CUDA graphs)."""


def hamming_fade(length: int, device: torch.device) -> torch.Tensor:
    """The original's mel cross-fade window (symmetric Hamming of twice the overlap, float64)."""
    return torch.from_numpy(np.hamming(2 * length)).to(device)


def raised_cosine_fade_in(length: int, device: torch.device) -> torch.Tensor:
    """sin² ramp over ``length`` samples; with 1 - ramp as fade-out the gains sum to 1."""
    phase = (torch.arange(length, dtype=torch.float64) + 0.5) / length * (np.pi / 2)
    return torch.sin(phase).pow(2).float().to(device)


class BlockSynthesizer:
    """The decoder's model work on blocks (see the module docstring)."""

    def __init__(
        self,
        flow: MaskedDiffWithXvec,
        hift: HiFTGenerator,
        solve: Solve,
        device: torch.device,
        mel_overlap: int,
        seam_crossfade: bool,
        first_blocks: FirstBlockGraphs | None = None,
        stats: DecodeStats | None = None,
        later_blocks: LaterBlockGraphs | None = None,
    ):
        self.flow = flow
        self.stats = stats
        """Where the phases of each call are timed (None: not timed)."""
        self.first_blocks = first_blocks
        self.later_blocks = later_blocks
        self._encode = later_blocks.encode if later_blocks is not None else None
        """The later blocks' encoder (None: the flow's own, eager)."""
        self.hift = hift
        self.solve = solve
        self.device = device
        self.mel_overlap = mel_overlap
        self.cache_samples = MEL_CACHE_FRAMES * int(hift.upsample_scale)
        self.seam_crossfade = seam_crossfade
        self.fade = hamming_fade(mel_overlap, device)
        self.seam_fade_in = raised_cosine_fade_in(self.cache_samples, device)
        self.embedding = torch.zeros(1, SPEAKER_EMBEDDING_DIM, device=device)

    def run(
        self, blocks: Sequence[Block], embedding: torch.Tensor | None = None, pause: Callable[[], None] | None = None
    ) -> list[BlockResult]:
        """Decode ``blocks`` as one batch; their carries move on to the next block. ``pause()``: where
        other streams' blocks may be decoded in the middle of a batch of later blocks (between the ODE's
        steps, and before the vocoder); a whole first block is not split."""
        if blocks[0].starts_stream:
            pause = None
        if len({b.shape_key() for b in blocks}) == 1:
            with self._phase("flow"):
                mel = self.flow_mel(blocks, embedding, pause)
            if pause is not None:
                pause()
            with self._phase("vocoder"):
                return self.vocode(blocks, mel)
        with self._phase("flow"):
            mels = self.flow_mels_mixed(blocks, embedding, pause)
        if pause is not None:
            pause()
        with self._phase("vocoder"):
            return self.vocode_rows(blocks, mels)

    def _phase(self, name: str) -> AbstractContextManager[None]:
        return self.stats.phase(name) if self.stats is not None else nullcontext()

    def _solve(self, *inputs: torch.Tensor, between_steps: Callable[[], None] | None = None) -> torch.Tensor:
        """``solve``, timed as the ``ode`` phase."""
        with self._phase("ode"):
            return self.solve(*inputs, between_steps=between_steps)

    def vocode_rows(self, blocks: Sequence[Block], mels: Sequence[torch.Tensor]) -> list[BlockResult]:
        """:meth:`vocode` for blocks of any lengths, each with its mel (1, 80, frames): in groups of
        blocks that can share a vocoder batch."""
        groups: dict[tuple[int | bool, ...], list[int]] = {}
        for row, block in enumerate(blocks):
            groups.setdefault(block.vocoder_key(), []).append(row)
        results: list[BlockResult | None] = [None] * len(blocks)
        for rows in groups.values():
            outputs = self.vocode([blocks[r] for r in rows], torch.cat([mels[r] for r in rows]))
            for row, out in zip(rows, outputs):
                results[row] = out
        return [r for r in results if r is not None]

    def flow_inputs(self, blocks: Sequence[Block], embedding: torch.Tensor | None = None) -> RowInputs:
        """The ODE's inputs of blocks of any lengths, as one padded batch (the flow encoder runs here)."""
        embedding = (self.embedding if embedding is None else embedding).expand(len(blocks), -1)
        return self.flow.prepare_rows(
            [b.tokens for b in blocks],
            [b.prompt_mel for b in blocks],
            embedding,
            [b.feat_len for b in blocks],
            [b.noise for b in blocks],
            encode=self._encode,
        )

    def flow_mels_mixed(
        self, blocks: Sequence[Block], embedding: torch.Tensor | None = None, pause: Callable[[], None] | None = None
    ) -> list[torch.Tensor]:
        """The flow's mel (1, 80, frames after the prompt) of each block, float32; the blocks may differ
        in length (one padded batch through the encoder and the ODE, which calls ``pause`` between steps)."""
        rows = self.flow_inputs(blocks, embedding)
        t_span = self.flow.decoder.time_span(N_TIMESTEPS, device=rows.mu.device)
        feat = self._solve(rows.z, rows.mu, rows.mask, rows.spks, rows.cond, t_span, between_steps=pause)
        return [rows.mel_of(row, feat[row : row + 1]) for row in range(len(blocks))]

    def graphed(self, blocks: Sequence[Block]) -> bool:
        """Whether these blocks run as first-block graphs."""
        first, c = blocks[0], blocks[0].carry
        carried = not (
            c.mel_overlap is None and c.cache_mel is None and c.cache_source is None and c.cache_speech is None
        )
        return self.first_blocks is not None and self.first_blocks.serves(
            len(blocks), first.prompt_tokens, carried, first.feat_len
        )

    def flow_mel(
        self, blocks: Sequence[Block], embedding: torch.Tensor | None = None, pause: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """The flow's mel (B, 80, frames after the prompt) of the blocks, float32 (the ODE calls ``pause``
        between steps)."""
        first = blocks[0]
        batch = len(blocks)
        prompt_tokens = first.prompt_tokens
        tokens = torch.cat([b.tokens for b in blocks]).to(self.device)
        embedding = (self.embedding if embedding is None else embedding).expand(batch, -1)
        if self.first_blocks is not None and self.graphed(blocks):
            noise = torch.cat([b.noise.to(self.device) for b in blocks])
            return self.first_blocks.flow_mel(tokens, noise, embedding)
        prompt_mel = torch.cat([b.prompt_mel for b in blocks])
        lengths = torch.full((batch,), tokens.shape[1] - prompt_tokens, dtype=torch.int32, device=self.device)
        return self.flow.inference(
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
            solve=functools.partial(self._solve, between_steps=pause),
            encode=self._encode,
        ).float()

    def vocode(self, blocks: Sequence[Block], mel: torch.Tensor) -> list[BlockResult]:
        """The blocks' speech from their flow mel (B, 80, frames), with the cross-fades and carries."""
        overlap = self.mel_overlap
        first = blocks[0]
        batch = len(blocks)
        carries = [b.carry for b in blocks]
        if first.carry.mel_overlap is not None:
            previous = _cat_carried([c.mel_overlap for c in carries], "mel overlap")
            faded = mel[:, :, :overlap] * self.fade[:overlap] + previous * self.fade[overlap:]
            mel = torch.cat([faded.to(mel.dtype), mel[:, :, overlap:]], dim=2)
        vocoder_mel = (
            mel
            if first.carry.cache_mel is None
            else torch.cat([_cat_carried([c.cache_mel for c in carries], "cache mel"), mel], dim=2)
        )
        cache_source = (
            None
            if first.carry.cache_source is None
            else _cat_carried([c.cache_source for c in carries], "cache source")
        )
        generators = [c.generator for c in carries]
        graphed = self.graphed(blocks)
        if first.finalize:
            speech, _ = self.vocoder(vocoder_mel, cache_source, generators, graphed)
            speech = self.join_seam(speech, carries)
            for c in carries:
                c.clear()
            return [BlockResult(speech[i : i + 1], mel[i : i + 1]) for i in range(batch)]
        if vocoder_mel.shape[2] <= overlap:
            raise DecoderError(f"a streamed block needs more than {overlap} mel frames; decode more tokens at once")
        held_back = vocoder_mel[:, :, -overlap:]
        vocoder_mel = vocoder_mel[:, :, :-overlap]
        speech, source = self.vocoder(vocoder_mel, cache_source, generators, graphed)
        speech = self.join_seam(speech, carries)
        n = self.cache_samples
        for i, c in enumerate(carries):
            c.mel_overlap = held_back[i : i + 1]
            c.cache_mel = vocoder_mel[i : i + 1, :, -MEL_CACHE_FRAMES:]
            c.cache_source = source[i : i + 1, :, -n:]
            c.cache_speech = speech[i : i + 1, -n:]
        return [BlockResult(speech[i : i + 1, :-n], mel[i : i + 1, :, :-overlap]) for i in range(batch)]

    def vocoder(
        self, mel: torch.Tensor, cache_source: torch.Tensor | None, generators: Sequence[torch.Generator], graphed: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HiFT on mel (B, 80, frames) -> (speech (B, samples), source (B, 1, samples)), one generator per row."""
        if graphed and self.first_blocks is not None:
            randomness = self.hift.draw_randomness(len(generators), mel.shape[2], list(generators), self.device)
            return self.first_blocks.vocode(mel, *randomness)
        later = self.later_blocks
        if cache_source is not None and later is not None and later.serves(len(generators)):
            randomness = self.hift.draw_randomness(len(generators), mel.shape[2], list(generators), self.device)
            return later.vocode(mel, cache_source, *randomness)
        generator = generators[0] if len(generators) == 1 else list(generators)
        return self.hift.inference(mel, cache_source, generator)

    def join_seam(self, speech: torch.Tensor, carries: Sequence[VocoderCarry]) -> torch.Tensor:
        """Cross-fade the start of each row's audio (the carried frame) with the last block's version of it."""
        if not self.seam_crossfade or carries[0].cache_speech is None:
            return speech
        n = self.cache_samples
        fade_in = self.seam_fade_in
        previous = _cat_carried([c.cache_speech for c in carries], "cache speech")
        head = speech[:, :n] * fade_in + previous * (1 - fade_in)
        return torch.cat([head, speech[:, n:]], dim=1)

    def flush(self, carry: VocoderCarry) -> torch.Tensor:
        """Vocode the held-back overlap after the last block (the stream ended on a block boundary)."""
        if carry.mel_overlap is None:
            raise DecoderError("nothing is held back to flush")
        mel = carry.mel_overlap if carry.cache_mel is None else torch.cat([carry.cache_mel, carry.mel_overlap], dim=2)
        speech, _ = self.vocoder(mel, carry.cache_source, [carry.generator], graphed=False)
        speech = self.join_seam(speech, [carry])
        carry.clear()
        return speech


def _cat_carried(parts: Sequence[torch.Tensor | None], name: str) -> torch.Tensor:
    """The rows' carried tensors as one batch; the rows of a batch are at the same stage of their streams."""
    present = [p for p in parts if p is not None]
    if len(present) != len(parts):
        raise DecoderError(f"a batch mixes streams with and without a carried {name}")
    return torch.cat(present)
