"""Block bookkeeping on plain state (no model): which prompt each block gets, what the stream keeps."""

from __future__ import annotations

import torch

from cosyvoice.flow.noise import NoiseTimeline
from glm4voice.decoder.blocks import BlockGeometry, BlockResult, commit_block, length_batches, take_block
from glm4voice.decoder.state import StreamState, VocoderCarry

GEOMETRY = BlockGeometry(block_size=10, input_frame_rate=12.5)


def new_state(window) -> StreamState:
    return StreamState(0, window, NoiseTimeline(0), VocoderCarry(torch.Generator()), mel=torch.zeros(1, 80, 0))


def run(state: StreamState, sizes: list[int], overlap: int = 34) -> list[tuple[int, int, int]]:
    """Feed blocks of ``sizes`` codes (code = its absolute position) with a fake decode whose final mel
    frame f holds the value f; returns each block's (prompt tokens, prompt mel frames, feat_len)."""
    seen, position = [], 0
    for size in sizes:
        state.pending.extend(range(position, position + size))
        position += size
        block = take_block(state, GEOMETRY, finalize=False)
        assert state.pending == []
        start = state.tokens_decoded - block.prompt_tokens  # absolute first prompt token
        assert block.tokens[0].tolist() == list(range(start, position))
        first_frame = GEOMETRY.mel_frames(start)
        # the prompt mel is the final frames from the window's start on, in order
        assert block.prompt_mel[0, 0].tolist() == list(range(first_frame, first_frame + block.prompt_mel.shape[2]))
        assert block.noise.shape == (1, 80, block.feat_len)
        assert torch.equal(block.noise, NoiseTimeline(0).take(first_frame, first_frame + block.feat_len))
        final_from = state.frames_final
        new_final = GEOMETRY.mel_frames(position) - overlap - final_from  # frames this block makes final
        mel = torch.arange(final_from, final_from + new_final, dtype=torch.float32).expand(1, 80, -1)
        commit_block(state, GEOMETRY, block, BlockResult(torch.zeros(1, 1), mel))
        seen.append((block.prompt_tokens, block.prompt_mel.shape[2], block.feat_len))
    return seen


def test_window_starts_on_encoder_blocks_and_keeps_at_least_the_window():
    assert [GEOMETRY.window_start(n, 20) for n in (0, 20, 21, 29, 30, 31, 45)] == [0, 0, 0, 0, 10, 10, 20]
    assert GEOMETRY.window_start(1000, None) == 0


def test_bounded_window_keeps_only_what_the_next_block_needs():
    state = new_state(window=20)
    seen = run(state, [10, 10, 20, 15, 25])
    assert [p for p, _, _ in seen] == [0, 10, 20, 20, 25]  # 40 decoded -> start 20; 55 -> start 30
    for _prompt_tokens, prompt_frames, feat_len in seen[1:]:
        assert 0 < prompt_frames < feat_len
    assert state.tokens_decoded == 80 and state.token_offset == 60 and state.tokens.tolist() == list(range(60, 80))
    assert state.mel_offset == GEOMETRY.mel_frames(60) and state.mel.shape[2] == state.frames_final - state.mel_offset


def test_unbounded_window_keeps_everything():
    state = new_state(window=None)
    seen = run(state, [10, 10, 20])
    assert [p for p, _, _ in seen] == [0, 10, 20] and state.token_offset == 0 and state.tokens.numel() == 40
    assert seen[-1][2] == GEOMETRY.mel_frames(40)


def test_length_batches_keep_similar_lengths_together_and_the_limit():
    lengths = [300, 100, 140, 149, 151, 1000, 120]
    batches = length_batches(lengths, lambda n: n, limit=3, ratio=1.5)
    assert batches == [[100, 120, 140], [149, 151], [300], [1000]]
    assert length_batches([5] * 7, lambda n: n, limit=3, ratio=1.5) == [[5, 5, 5], [5, 5, 5], [5]]
    assert length_batches([], lambda n: n, limit=3, ratio=1.5) == []
