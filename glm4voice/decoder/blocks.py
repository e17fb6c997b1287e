"""Block bookkeeping of a stream: which tokens, prompt and noise the next block decodes, and what the
stream keeps afterwards (the bounded prompt window).

Pure functions over :class:`~glm4voice.decoder.state.StreamState`; no model work happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from cosyvoice.flow.flow import mel_frames
from glm4voice.decoder.state import StreamState, VocoderCarry

T = TypeVar("T")


@dataclass(frozen=True)
class BlockGeometry:
    """The flow's fixed sizes that decide where blocks and prompt windows may start."""

    block_size: int
    """The flow encoder's attention block (tokens): prompt windows start on its multiples, so the
    encoder's block-causal partition of the kept tokens does not change."""
    input_frame_rate: float
    """Tokens per second (12.5)."""

    def mel_frames(self, tokens: int) -> int:
        """Mel frames the flow makes for ``tokens`` tokens (the original's float32 arithmetic)."""
        return mel_frames(tokens, self.input_frame_rate)

    def window_start(self, tokens: int, prompt_window: int | None) -> int:
        """First prompt token for a block after ``tokens`` decoded tokens: a multiple of the block
        size that keeps at least ``prompt_window`` tokens (0 while everything fits, or with no window)."""
        if prompt_window is None or tokens <= prompt_window:
            return 0
        return (tokens - prompt_window) // self.block_size * self.block_size


@dataclass(eq=False)
class Block:
    """The inputs of one stream's block: the flow runs over ``tokens`` (1, prompt + new; the first
    ``prompt_tokens`` are the prompt, whose mel is ``prompt_mel`` (1, 80, P)) into ``feat_len`` mel
    frames from ``noise`` (1, 80, feat_len); ``carry`` is the stream's vocoder carry."""

    tokens: torch.Tensor
    prompt_tokens: int
    prompt_mel: torch.Tensor
    feat_len: int
    noise: torch.Tensor
    carry: VocoderCarry
    finalize: bool

    @property
    def new_tokens(self) -> torch.Tensor:
        """(n,) the tokens this block adds (on the CPU for blocks of a stream)."""
        return self.tokens[0, self.prompt_tokens :]

    @property
    def starts_stream(self) -> bool:
        """No prompt and nothing carried: a stream's first block (whole-block graphs serve these)."""
        c = self.carry
        return not self.prompt_tokens and c.mel_overlap is None and c.cache_mel is None and c.cache_source is None

    def vocoder_key(self) -> tuple[int | bool, ...]:
        """Blocks with equal keys can share one vocoder batch (same new mel frames, same carried state)."""
        c = self.carry
        return (self.feat_len - self.prompt_mel.shape[2], self.finalize,
                c.mel_overlap is None, c.cache_mel is None, c.cache_source is None, c.cache_speech is None)  # fmt: skip

    def shape_key(self) -> tuple[int | bool, ...]:
        """Blocks with equal keys can run as one batch with no padding."""
        c = self.carry
        return (self.tokens.shape[1], self.prompt_tokens, self.prompt_mel.shape[2], self.feat_len, self.finalize,
                c.mel_overlap is None, c.cache_mel is None, c.cache_source is None, c.cache_speech is None)  # fmt: skip


@dataclass(eq=False)
class BlockResult:
    speech: torch.Tensor
    """(1, samples) float32 on the decoder's device."""
    mel: torch.Tensor
    """(1, 80, frames) final mel frames of this block (what later blocks take as prompt)."""


def take_block(state: StreamState, geometry: BlockGeometry, finalize: bool) -> Block:
    """The next block of ``state`` from its pending codes and kept prompt (the pending codes are taken)."""
    new = torch.tensor(state.pending, dtype=torch.long)
    state.pending = []
    done, total = state.tokens_decoded, state.tokens_decoded + len(new)
    start = geometry.window_start(done, state.prompt_window)
    start_frame = geometry.mel_frames(start)
    end_frame = geometry.mel_frames(total)
    prompt = state.tokens[start - state.token_offset :]
    tokens = torch.cat([prompt, new]).unsqueeze(0)
    prompt_mel = state.mel[:, :, start_frame - state.mel_offset : state.frames_final - state.mel_offset]
    noise = state.noise.take(start_frame, end_frame)
    return Block(tokens, prompt.numel(), prompt_mel, end_frame - start_frame, noise, state.carry, finalize)


def put_back_block(state: StreamState, block: Block, added: int) -> None:
    """Undo adding ``added`` codes and taking ``block`` (:func:`take_block`), which was not decoded: the
    codes that were pending before are pending again (nothing else of the stream changed)."""
    codes = block.new_tokens.tolist()
    state.pending = codes[: len(codes) - added] + state.pending


def commit_block(state: StreamState, geometry: BlockGeometry, block: Block, result: BlockResult) -> None:
    """Count the decoded block; keep its tokens and final mel as the next prompt (within the window)."""
    new = block.new_tokens
    total = state.tokens_decoded + len(new)
    state.tokens_decoded = total
    state.frames_final += result.mel.shape[2]
    if block.finalize:
        return
    tokens = torch.cat([state.tokens, new])
    mel = torch.cat([state.mel, result.mel], dim=2)
    keep = geometry.window_start(total, state.prompt_window)
    keep_frame = geometry.mel_frames(keep)
    state.tokens = tokens[keep - state.token_offset :]
    state.token_offset = keep
    state.mel = mel[:, :, keep_frame - state.mel_offset :]
    state.mel_offset = keep_frame
    state.noise.forget_before(keep_frame)


def caller_block(
    state: StreamState,
    geometry: BlockGeometry,
    token: torch.Tensor,
    prompt_token: torch.Tensor,
    prompt_feat: torch.Tensor,
    finalize: bool,
    noise: torch.Tensor | None = None,
) -> Block:
    """A block whose prompt the caller keeps (the original's ``token2wav``): ``token`` (1, n) and
    ``prompt_token`` (1, p) on one device, ``prompt_feat`` (1, P, 80); the noise covers the prompt
    and the new frames (from ``state.noise`` at frames 0 ... unless given)."""
    tokens = torch.cat([prompt_token, token], dim=1)
    feat_len = geometry.mel_frames(tokens.shape[1])
    if noise is None:
        noise = state.noise.take(0, feat_len)
    return Block(tokens, prompt_token.shape[1], prompt_feat.transpose(1, 2), feat_len, noise, state.carry, finalize)


def length_batches(items: Sequence[T], feat_len: Callable[[T], int], limit: int, ratio: float) -> list[list[T]]:
    """Split blocks of different lengths into batches (a mixed batch is padded to its longest row): in
    order of length, at most ``limit`` per batch, the longest at most ``ratio`` times the shortest."""
    batches: list[list[T]] = []
    for item in sorted(items, key=feat_len):
        current = batches[-1] if batches else None
        if current is None or len(current) >= limit or feat_len(item) > ratio * feat_len(current[0]):
            batches.append([item])
        else:
            current.append(item)
    return batches
