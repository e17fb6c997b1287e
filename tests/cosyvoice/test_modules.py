"""Module math against straightforward reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.flow.cuda_graph import Arena
from cosyvoice.flow.decoder import ConditionalDecoder, SinusoidalPosEmb, masked_group_norm
from cosyvoice.flow.flow import mel_frames
from cosyvoice.flow.flow_matching import ConditionalCFM, original_noise
from cosyvoice.flow.length_regulator import InterpolateRegulator
from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
from cosyvoice.hifigan.generator import HiFTGenerator, Snake, istft
from cosyvoice.transformer.attention import RelPositionMultiHeadedAttention, block_causal_mask, shift_relative
from cosyvoice.transformer.embedding import relative_position_table
from cosyvoice.transformer.encoder import BlockConformerEncoder


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    generator = _seeded(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if p.dim() > 1 else 0.1))
    return module.eval()


def test_shift_relative_picks_relative_position_i_minus_j():
    length = 6
    scores = torch.randn(2, 3, length, 2 * length - 1)
    reference = torch.empty(2, 3, length, length)
    for i in range(length):
        for j in range(length):
            reference[..., i, j] = scores[..., i, length - 1 - i + j]  # column of relative position i - j
    assert torch.equal(shift_relative(scores), reference)


def test_block_causal_mask_is_the_grid_mask():
    size, block = 23, 10
    reference = torch.tensor([[j <= i or j // block == i // block for j in range(size)] for i in range(size)])
    assert torch.equal(block_causal_mask(size, block), reference)


def test_relative_position_attention_matches_a_naive_loop():
    torch.manual_seed(0)
    heads, dim, length, block = 2, 8, 7, 3
    attn = _randomize(RelPositionMultiHeadedAttention(heads, dim, block_size=block), 1)
    x = torch.randn(2, length, dim)
    lengths = [7, 5]
    key_mask = torch.tensor([[j < n for j in range(length)] for n in lengths]).unsqueeze(1)
    pos_emb = relative_position_table(length, dim)[:, :]  # relative positions length-1 ... -(length-1)
    with torch.no_grad():
        out = attn(x, key_mask, pos_emb)
        d_k = dim // heads

        def pe(r: int) -> torch.Tensor:  # ESPnet table entry for relative position r
            f = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
            row = torch.zeros(dim)
            row[0::2], row[1::2] = torch.sin(r * f), torch.cos(r * f)
            return row

        for b, n in enumerate(lengths):
            q = attn.linear_q(x[b]).view(length, heads, d_k)
            k = attn.linear_k(x[b]).view(length, heads, d_k)
            v = attn.linear_v(x[b]).view(length, heads, d_k)
            context = torch.zeros(length, heads, d_k)
            for i in range(n):
                for h in range(heads):
                    allowed = [j for j in range(n) if j <= i or j // block == i // block]
                    logits = torch.stack([
                        ((q[i, h] + attn.pos_bias_u[h]) @ k[j, h]
                         + (q[i, h] + attn.pos_bias_v[h]) @ attn.linear_pos(pe(i - j)).view(heads, d_k)[h]) / math.sqrt(d_k)
                        for j in allowed
                    ])  # fmt: skip
                    weights = torch.softmax(logits, 0)
                    context[i, h] = sum(w * v[j, h] for w, j in zip(weights, allowed))
            expected = attn.linear_out(context.reshape(length, dim))
            torch.testing.assert_close(out[b, :n], expected[:n], atol=1e-5, rtol=1e-5)


def test_encoder_is_block_causal():
    encoder = _randomize(
        BlockConformerEncoder(16, 16, attention_heads=2, linear_units=32, num_blocks=2, block_size=10), 2
    )
    x = torch.randn(1, 27, 16)
    with torch.no_grad():
        full, masks = encoder(x, torch.tensor([27]))
        prefix, _ = encoder(x[:, :20], torch.tensor([20]))
        partial, _ = encoder(x[:, :25], torch.tensor([25]))
    assert masks.shape == (1, 1, 27) and bool(masks.all())
    torch.testing.assert_close(
        prefix, full[:, :20], atol=1e-5, rtol=1e-5
    )  # tokens >= 20 are invisible to the first two blocks
    assert not torch.allclose(partial[:, 20:25], full[:, 20:25], atol=1e-4)  # within a block they see ahead


def test_masked_group_norm_equals_group_norm_of_the_valid_frames():
    norm = nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, 20)
    mask = torch.zeros(2, 1, 20)
    mask[0, :, :13] = 1
    mask[1] = 1
    with torch.no_grad():
        out = masked_group_norm(x, mask, norm)
        torch.testing.assert_close(out[0, :, :13], norm(x[:1, :, :13])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], norm(x[1:])[0], atol=1e-5, rtol=1e-5)


def _tiny_estimator(seed: int = 3) -> ConditionalDecoder:
    estimator = ConditionalDecoder(
        320,
        80,
        channels=(16, 16),
        dropout=0,
        attention_head_dim=8,
        n_blocks=1,
        num_mid_blocks=2,
        num_heads=2,
        act_fn="gelu",
    )
    return _randomize(estimator, seed)


@pytest.mark.parametrize("length", [13, 32])
def test_padded_estimator_equals_unpadded(length):
    """The fixed-shape (CUDA graph) path: padding with garbage changes nothing on valid frames."""
    estimator = _tiny_estimator()
    g = _seeded(4)
    x, mu, cond = (torch.randn(1, 80, length, generator=g) for _ in range(3))
    spks = torch.randn(1, 80, generator=g)
    t = torch.tensor(0.3)
    padded_len = 64

    def pad(a: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, 5 * torch.randn(1, a.shape[1], padded_len - length, generator=g)], dim=2)

    mask = torch.zeros(1, 1, padded_len)
    mask[..., :length] = 1
    with torch.no_grad():
        reference = estimator(x, torch.ones(1, 1, length), mu, t, spks, cond)
        padded = estimator(pad(x), mask, pad(mu), t, spks, pad(cond), padded=True)
        # a batch of two sequences of different lengths gives each its own unpadded result
        other = torch.randn(1, 80, padded_len, generator=g)
        batch = estimator(
            torch.cat([pad(x), other]), torch.cat([mask, torch.ones(1, 1, padded_len)]), torch.cat([pad(mu), other]),
            t, torch.cat([spks, spks]), torch.cat([pad(cond), other]), padded=True,
        )  # fmt: skip
        alone = estimator(other, torch.ones(1, 1, padded_len), other, t, spks, other)
    torch.testing.assert_close(padded[..., :length], reference, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(batch[:1, :, :length], reference, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1:], alone, atol=2e-5, rtol=1e-4)
    assert torch.all(padded[..., length:] == 0)


def test_batched_guidance_equals_the_original_two_pass_euler():
    estimator = _tiny_estimator(5)
    cfm = ConditionalCFM(
        240,
        {"solver": "euler", "t_scheduler": "cosine", "inference_cfg_rate": 0.7, "sigma_min": 1e-6},
        1,
        80,
        estimator,
    ).eval()
    g = _seeded(6)
    mu, cond = torch.randn(1, 80, 21, generator=g), torch.randn(1, 80, 21, generator=g)
    spks = torch.randn(1, 80, generator=g)
    mask = torch.ones(1, 1, 21)
    noise = original_noise((1, 80, 21))
    with torch.no_grad():
        out = cfm(mu, mask, 10, spks=spks, cond=cond, noise=noise)
        # reference: the original's loop, conditional and unconditional passes separately
        t_span = 1 - torch.cos(torch.linspace(0, 1, 11) * 0.5 * torch.pi)
        x, t, dt = noise.clone(), t_span[0], t_span[1] - t_span[0]
        for step in range(1, 11):
            v = estimator(x, mask, mu, t, spks, cond)
            v_u = estimator(x, mask, torch.zeros_like(mu), t, torch.zeros_like(spks), torch.zeros_like(cond))
            x = x + dt * (1.7 * v - 0.7 * v_u)
            t = t + dt
            if step < 10:
                dt = t_span[step + 1] - t
    torch.testing.assert_close(out, x, atol=2e-5, rtol=1e-4)
    torch.manual_seed(42)
    assert torch.equal(noise, torch.randn(1, 80, 21))  # the original's draw


def test_time_embedding_formula():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = SinusoidalPosEmb(320)(t).double()
    half = 160
    freq = np.exp(-np.arange(half) * math.log(10000) / (half - 1))
    angles = 1000 * t.double().numpy()[:, None] * freq[None]
    reference = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    np.testing.assert_allclose(emb.numpy(), reference, atol=2e-4)


def test_mel_frames_uses_the_original_float32_arithmetic():
    for n in list(range(1000)) + [3392, 3776, 13440, 100_000]:
        n32 = np.float32(n)
        expected = int(np.float32(np.float32(n32 / np.float32(12.5)) * np.float32(22050)) / np.float32(256))
        assert mel_frames(n, 12.5) == expected
    assert mel_frames(10, 12.5) == 68 and mel_frames(25, 12.5) == 172
    assert mel_frames(3392, 12.5) == 3392 * 441 // 64 - 1  # exact arithmetic would give one frame more


def test_snake():
    snake = Snake(3)
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(2, 3, 5)
    alpha = snake.alpha.detach().view(1, 3, 1)
    torch.testing.assert_close(snake(x).detach(), x + torch.sin(alpha * x) ** 2 / (alpha + 1e-9))


def _tiny_hift() -> HiFTGenerator:
    hift = HiFTGenerator(
        base_channels=16, resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3], [1, 3]],
        source_resblock_kernel_sizes=[3, 5], source_resblock_dilation_sizes=[[1, 3], [1, 3]],
        f0_predictor=ConvRNNF0Predictor(cond_channels=8),
    )  # fmt: skip
    return _randomize(hift, 7)


def test_weight_norm_checkpoint_layouts_load_folded():
    hift = _tiny_hift()
    state = hift.checkpoint_state_dict()
    assert "conv_pre.weight_g" in state and "conv_pre.weight" not in state and "source_downs.0.weight" in state
    # the old layout: weight = g * v / |v|, with g, v as torch's weight_norm keeps them
    g, v = torch.rand_like(state["conv_pre.weight_g"]) + 0.5, torch.randn_like(state["conv_pre.weight_v"])
    state["conv_pre.weight_g"], state["conv_pre.weight_v"] = g, v
    fresh = _tiny_hift()
    fresh.load_state_dict(state, strict=True)
    reference = nn.utils.parametrizations.weight_norm(nn.Conv1d(80, 16, 7, padding=3))
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(g)
        reference.parametrizations.weight.original1.copy_(v)
    torch.testing.assert_close(fresh.conv_pre.weight.detach(), reference.weight.detach())
    # the newer parametrization layout is accepted too
    renamed = {
        k.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1"
        ): t
        for k, t in state.items()
    }
    again = _tiny_hift()
    again.load_state_dict(renamed, strict=True)
    torch.testing.assert_close(again.conv_pre.weight, fresh.conv_pre.weight)
    # strictness survives the folding
    broken = dict(state)
    del broken["ups.0.weight_v"]
    with pytest.raises(KeyError, match="ups.0.weight_v"):
        _tiny_hift().load_state_dict(broken)
    with pytest.raises(RuntimeError, match="Unexpected"):
        _tiny_hift().load_state_dict({**state, "conv_pre.extra": torch.zeros(1)})


def test_hift_is_deterministic_per_generator_and_honours_the_source_cache():
    hift = _tiny_hift()
    mel = torch.randn(1, 80, 12)
    with torch.no_grad():
        a, source_a = hift.inference(mel, generator=_seeded(1))
        b, _ = hift.inference(mel, generator=_seeded(1))
        c, _ = hift.inference(mel, generator=_seeded(2))
        cache = torch.randn(1, 1, 256)
        _, source_cached = hift.inference(mel, cache, generator=_seeded(1))
    assert a.shape == (1, 12 * 256) and source_a.shape == (1, 1, 12 * 256)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(source_cached[:, :, :256], cache) and torch.equal(
        source_cached[:, :, 256:], source_a[:, :, 256:]
    )
    assert float(a.abs().max()) <= 0.99 + 1e-6  # audio_limit


def test_sync_free_istft_is_torch_istft_bit_for_bit():
    n_fft, hop = 16, 4
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).float()
    generator = _seeded(3)
    for batch, frames in ((1, 9), (3, 2177)):
        magnitude = torch.rand(batch, n_fft // 2 + 1, frames, generator=generator) * 3
        phase = torch.randn(batch, n_fft // 2 + 1, frames, generator=generator)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        assert torch.equal(istft(spec, n_fft, hop, window), torch.istft(spec, n_fft, hop, n_fft, window=window))


def test_hift_with_predrawn_randomness_equals_drawing_it():
    """The randomness drawn beforehand (what a CUDA graph replays with) gives the same audio as drawing
    it inside, for one generator and for one generator per row."""
    hift = _tiny_hift()
    mel = torch.randn(3, 80, 12, generator=_seeded(4))
    with torch.no_grad():
        drawn = hift.inference(mel[:1], generator=_seeded(1))
        given = hift.inference(mel[:1], randomness=hift.draw_randomness(1, 12, _seeded(1)))
        assert all(torch.equal(a, b) for a, b in zip(drawn, given))
        rows = [_seeded(s) for s in (5, 6, 7)]
        randomness = hift.draw_randomness(3, 12, rows)
        given = hift.inference(mel, randomness=randomness)
        drawn = hift.inference(mel, generator=[_seeded(s) for s in (5, 6, 7)])
        assert all(torch.equal(a, b) for a, b in zip(drawn, given))
        # each row draws what it would draw alone with its generator
        assert torch.equal(randomness[1][1:2], hift.draw_randomness(1, 12, _seeded(6))[1])
    uniform, normal = randomness
    assert uniform.shape == (3, 9, 1) and normal.shape == (3, 9, 12 * 256)
    with pytest.raises(ValueError, match="generators"):
        hift.draw_randomness(2, 12, rows)


def test_ode_graph_arena_views_share_one_buffer_per_batch_size():
    arena = Arena(rows=4, device="cpu")
    long = arena.view("z", 80, 256)
    short = arena.view("z", 80, 128)
    assert long.is_contiguous() and short.is_contiguous() and short.data_ptr() == long.data_ptr()
    assert arena.view("mu", 80, 128).data_ptr() != short.data_ptr()  # another buffer per name
    longer = arena.view("z", 80, 512)  # grows: a new buffer, the old views stay valid
    assert longer.shape == (4, 80, 512) and longer.data_ptr() != long.data_ptr() and long.shape == (4, 80, 256)


def test_regulator_rows_pick_the_tokens_torchs_nearest_interpolation_picks():
    """forward_rows' stretch (a gather with indices computed on the device) picks, for every row length
    and frame count, the token F.interpolate(mode="nearest") picks (identity and doubling included)."""
    regulator = InterpolateRegulator(1, ())
    regulator.model = nn.Sequential(nn.Identity())  # the stretch alone: each frame shows its token's index
    pairs = [(t, f) for t in range(1, 41) for f in {t, 2 * t, mel_frames(t, 12.5), 3 * t + 1, max(1, t // 2)}]
    tokens, frames = max(t for t, _ in pairs), max(f for _, f in pairs)
    x = torch.arange(tokens, dtype=torch.float32).view(1, tokens, 1).expand(len(pairs), -1, -1).contiguous()
    token_lens = torch.tensor([t for t, _ in pairs])
    feat_lens = torch.tensor([f for _, f in pairs])
    stretched = regulator.forward_rows(x, token_lens, feat_lens, frames)[..., 0]
    for row, (t, f) in enumerate(pairs):
        expected = F.interpolate(torch.arange(t, dtype=torch.float32).view(1, 1, t), size=f, mode="nearest")[0, 0]
        assert torch.equal(stretched[row, :f], expected), (t, f)
        assert not stretched[row, f:].any()


@pytest.mark.parametrize("groups", [1, 2])
def test_regulator_rows_equal_each_row_alone(groups):
    """Rows of different lengths in one padded batch (junk past each row's tokens) give what forward gives
    each row alone, zero past its frames."""
    regulator = _randomize(InterpolateRegulator(8, (1, 1), out_channels=6, groups=groups), seed=groups)
    rows = [(12, 83), (5, 5), (7, 14), (1, 7), (20, 138)]  # (tokens, frames)
    x = torch.randn(len(rows), 20, 8, generator=_seeded(3)) * 3  # past each row's tokens: junk that must not leak in
    token_lens = torch.tensor([t for t, _ in rows])
    feat_lens = torch.tensor([f for _, f in rows])
    with torch.no_grad():
        together = regulator.forward_rows(x, token_lens, feat_lens, 140)
        assert together.shape == (len(rows), 140, 6)
        for row, (t, f) in enumerate(rows):
            alone, _ = regulator(x[row : row + 1, :t], torch.tensor([f]), max_len=f)
            torch.testing.assert_close(together[row : row + 1, :f], alone, atol=1e-5, rtol=1e-5)
            assert not together[row, f:].any()
