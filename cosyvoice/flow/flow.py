"""Speech tokens -> 80-bin mel (``cosyvoice.flow.flow.MaskedDiffWithXvec`` in config.yaml), GLM-4-Voice's variant:
the prompt and new tokens are encoded together and the mel length is computed from their total."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.flow.flow_matching import ConditionalCFM
from cosyvoice.flow.length_regulator import InterpolateRegulator
from cosyvoice.transformer.encoder import ConformerEncoder, padding_mask

MEL_SAMPLE_RATE = 22_050
MEL_HOP = 256
# The flow computes mel lengths with these literals (not with the config's sample_rate), so they
# are fixed by the checkpoint; glm4voice.audio holds the same values for the rest of the project.


def mel_frames(tokens: int, input_frame_rate: float) -> int:
    """Mel frames for ``tokens`` speech tokens, with the original's float32 arithmetic
    (``int(n / rate * 22050 / 256)``; exact rational arithmetic would differ for some n)."""
    n = torch.tensor(tokens, dtype=torch.int32)
    return int((n / input_frame_rate * MEL_SAMPLE_RATE / MEL_HOP).int())


Encode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``encode(token (B, T_tok), token_len (B,), feat_len (B,), frames) -> mu (B, frames, 80)``:
:meth:`MaskedDiffWithXvec.encode_padded` or its CUDA graphs."""


@dataclass(eq=False)
class RowInputs:
    """The ODE's inputs for rows of different lengths, padded to the longest (``MaskedDiffWithXvec.prepare_rows``)."""

    z: torch.Tensor
    """(B, 80, F) float32: each row's starting noise, zero past its frames."""
    mu: torch.Tensor
    mask: torch.Tensor
    """(B, 1, F): 1 on each row's valid frames."""
    spks: torch.Tensor
    """(B, 80): the projected speaker embeddings."""
    cond: torch.Tensor
    """(B, 80, F): each row's prompt mel, zero after it."""
    feat_lens: list[int]
    prompt_frames: list[int]

    def mel_of(self, row: int, feat: torch.Tensor) -> torch.Tensor:
        """Row ``row``'s mel after its prompt (1, 80, frames), float32, from its solved state ``feat`` (1, 80, >= its frames)."""
        return feat[:, :, self.prompt_frames[row] : self.feat_lens[row]].float()


class MaskedDiffWithXvec(nn.Module):
    """Token embedding -> Conformer encoder -> projection to 80 -> length regulator -> conditional flow matching."""

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: float = 50,
        only_mask_loss: bool = True,
        encoder: ConformerEncoder | None = None,
        length_regulator: InterpolateRegulator | None = None,
        decoder: ConditionalCFM | None = None,
        decoder_conf: Mapping[str, Any] | None = None,
        mel_feat_conf: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if encoder is None or length_regulator is None or decoder is None:
            raise ValueError("MaskedDiffWithXvec needs an encoder, a length_regulator and a decoder")
        self.input_size = input_size
        self.output_size = output_size
        self.output_type = output_type
        self.vocab_size = vocab_size
        self.input_frame_rate = input_frame_rate
        self.only_mask_loss = only_mask_loss
        self.decoder_conf = decoder_conf
        self.mel_feat_conf = mel_feat_conf
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder
        self.length_regulator = length_regulator

    def mel_frames(self, tokens: int) -> int:
        return mel_frames(tokens, self.input_frame_rate)

    def encode(self, token: torch.Tensor, token_len: torch.Tensor, feat_len: int) -> torch.Tensor:
        """Tokens (B, T_tok) -> mu (B, T_mel=feat_len, 80) at mel rate."""
        mask = padding_mask(token_len, token.shape[1]).unsqueeze(-1).to(self.input_embedding.weight.dtype)
        x = self.input_embedding(torch.clamp(token, min=0)) * mask
        h, _ = self.encoder(x, token_len)
        h = self.encoder_proj(h)
        lengths = torch.full_like(token_len, feat_len)
        h, _ = self.length_regulator(h, lengths, max_len=feat_len)
        return h

    def encode_rows(self, token: torch.Tensor, token_lens: Sequence[int], feat_lens: Sequence[int]) -> torch.Tensor:
        """Tokens (B, T_tok) right-padded, row i valid up to ``token_lens[i]`` -> mu (B, max feat_len, 80),
        row i stretched to ``feat_lens[i]`` frames and zero after them: each row as :meth:`encode` gives
        it alone, up to float rounding (:meth:`encode_padded`)."""
        lengths = torch.tensor([list(token_lens), list(feat_lens)], dtype=torch.int32).to(token.device)
        return self.encode_padded(token, lengths[0], lengths[1], max(feat_lens))

    def encode_padded(
        self, token: torch.Tensor, token_len: torch.Tensor, feat_len: torch.Tensor, frames: int
    ) -> torch.Tensor:
        """:meth:`encode_rows` with the lengths as (B,) integer tensors on the device and ``frames`` >= every
        row's: no host synchronisation (the encoder masks padding keys; the length regulator masks its
        convolutions and GroupNorm statistics per row)."""
        mask = padding_mask(token_len, token.shape[1]).unsqueeze(-1).to(self.input_embedding.weight.dtype)
        x = self.input_embedding(torch.clamp(token, min=0)) * mask
        h, _ = self.encoder(x, token_len)
        h = self.encoder_proj(h)  # (B, T_tok, 80)
        return self.length_regulator.forward_rows(h, token_len, feat_len, frames)

    def prepare_rows(
        self,
        tokens: Sequence[torch.Tensor],
        prompt_feats: Sequence[torch.Tensor],
        embedding: torch.Tensor,
        feat_lens: Sequence[int],
        noises: Sequence[torch.Tensor],
        encode: Encode | None = None,
    ) -> RowInputs:
        """The ODE's inputs for a batch of sequences of *different* lengths, as one padded batch (the
        encoder and the length regulator run here). Row i: ``tokens[i]`` (1, prompt + new tokens),
        ``prompt_feats[i]`` (1, 80, P_i) the prompt's mel on the device, ``feat_lens[i]`` mel frames in all,
        ``noises[i]`` (1, 80, feat_lens[i]); ``embedding`` (B, 192) on the device. Tokens and noise are
        padded where they are (on the host: one copy each to the device). ``encode``: replaces
        :meth:`encode_padded` (CUDA graphs)."""
        batch = len(tokens)
        if not (len(prompt_feats) == len(feat_lens) == len(noises) == embedding.shape[0] == batch):
            raise ValueError("tokens, prompt_feats, feat_lens, noises and embedding need one entry per row")
        device = embedding.device
        token_lens = [int(t.shape[1]) for t in tokens]
        padded = tokens[0].new_zeros(batch, max(token_lens), dtype=torch.long)
        for row, t in enumerate(tokens):
            padded[row, : token_lens[row]] = t[0]
        prompt_frames = [int(f.shape[2]) for f in prompt_feats]
        for prompt, frames in zip(prompt_frames, feat_lens):
            if prompt > frames:
                raise ValueError(f"the prompt mel ({prompt} frames) is longer than the whole mel ({frames} frames)")
        frames = max(feat_lens)
        z = noises[0].new_zeros(batch, self.output_size, frames)
        for row, noise in enumerate(noises):
            if tuple(noise.shape) != (1, self.output_size, feat_lens[row]):
                raise ValueError(f"row {row}: noise has shape {tuple(noise.shape)}, expected (1, 80, {feat_lens[row]})")
            z[row, :, : feat_lens[row]] = noise[0]
        lengths = torch.tensor([token_lens, list(feat_lens)], dtype=torch.int32).to(device)
        mu = (encode or self.encode_padded)(padded.to(device), lengths[0], lengths[1], frames)
        mu = mu.transpose(1, 2).contiguous()  # (B, 80, F)
        mask = padding_mask(lengths[1], frames).unsqueeze(1).to(mu.dtype)  # (B, 1, F)
        conds = torch.zeros_like(mu)
        for row, (prompt, feat) in enumerate(zip(prompt_frames, prompt_feats)):
            conds[row, :, :prompt] = feat[0].to(mu.dtype)
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        z = z.to(device=device, dtype=mu.dtype)
        return RowInputs(z, mu, mask, spks, conds, list(feat_lens), prompt_frames)

    def inference(
        self,
        token: torch.Tensor,
        token_len: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_token_len: torch.Tensor,
        prompt_feat: torch.Tensor,
        prompt_feat_len: torch.Tensor,
        embedding: torch.Tensor,
        *,
        feat_len: int | None = None,
        n_timesteps: int = 10,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        solve=None,
        encode: Encode | None = None,
    ) -> torch.Tensor:
        """The original's ``inference``: returns the mel (B, 80, T) of the frames after the prompt mel.

        One sequence (B = 1) as the original, or a batch of B sequences of the same lengths (prompt
        tokens, new tokens, prompt mel frames; no padding), each computed as it would be alone.
        ``feat_len`` overrides the total mel length (default: :func:`mel_frames` of prompt+new tokens);
        ``noise`` (B, 80, feat_len) or ``generator`` give the ODE's starting noise; ``solve(z, mu, mask,
        spks, cond, t_span)`` (mask None) replaces the eager ODE solver (CUDA graphs); ``encode`` (see
        :data:`Encode`) the encoder and length regulator (then equal up to float rounding).
        """
        batch = token.shape[0]
        if prompt_token.shape[0] != batch or prompt_feat.shape[0] != batch or embedding.shape[0] != batch:
            raise ValueError("token, prompt_token, prompt_feat and embedding must have the same batch size")
        embedding = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        tokens = torch.cat([prompt_token.to(token.dtype), token], dim=1)
        total = int(prompt_token.shape[1]) + int(token.shape[1])
        if feat_len is None:
            feat_len = self.mel_frames(total)
        lengths = torch.full((batch,), total, dtype=torch.int32, device=token.device)
        if encode is None:
            mu = self.encode(tokens, lengths, feat_len)
        else:
            mu = encode(tokens, lengths, torch.full_like(lengths, feat_len), feat_len)
        mu = mu.transpose(1, 2).contiguous()  # (B, 80, T)

        prompt_frames = int(prompt_feat.shape[1])
        if prompt_frames > feat_len:
            raise ValueError(
                f"the prompt mel ({prompt_frames} frames) is longer than the whole mel ({feat_len} frames)"
            )
        conds = torch.zeros(batch, self.output_size, feat_len, device=mu.device, dtype=mu.dtype)
        if prompt_frames:
            conds[:, :, :prompt_frames] = prompt_feat.transpose(1, 2).to(mu.dtype)
        cfm = self.decoder
        if noise is None:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        elif tuple(noise.shape) != tuple(mu.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(mu.shape)}")
        z = noise.to(device=mu.device, dtype=mu.dtype)
        t_span = cfm.time_span(n_timesteps, device=mu.device)
        solver = solve if solve is not None else cfm.solve
        feat = solver(z, mu, None, embedding, conds, t_span)  # mask None: equal lengths, every frame valid
        return feat[:, :, prompt_frames:]
