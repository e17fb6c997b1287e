"""Tiny speech decoder in the published ``glm-4-voice-decoder`` format.

Writes ``config.yaml`` (the published hyperpyyaml text with tiny channel sizes and block counts: same
sections, tags, argument names and order; :func:`render_decoder_config` with
:data:`PUBLISHED_DECODER_SIZES` reproduces the published file byte for byte), ``flow.pt`` and
``hift.pt`` (pickled OrderedDicts of float32 tensors with the published key names; ``hift.pt`` stores
its weight-normed convolutions as ``weight_g``/``weight_v`` like the published file).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from glm4voice.checkpoints.text import TinyVocab

if TYPE_CHECKING:
    from cosyvoice.flow.flow import MaskedDiffWithXvec
    from cosyvoice.hifigan.generator import HiFTGenerator

CONFIG_FILE = "config.yaml"
VOCODER_HEAD_WEIGHT_SCALE = 0.1
VOCODER_DC_WEIGHT_SCALE = 0.5
VOCODER_DC_LOG_MAGNITUDE = -1.0
VOCODER_HARMONIC_LOG_MAGNITUDE = -9.0
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"


@dataclass(frozen=True)
class DecoderSizes:
    """The numbers of config.yaml that a tiny checkpoint changes (everything else is fixed)."""

    vocab_size: int = 16384
    token_dim: int = 512
    encoder_heads: int = 8
    encoder_units: int = 2048
    encoder_blocks: int = 6
    regulator_ratios: str = "[1, 1, 1, 1]"
    estimator_channels: str = "[256, 256]"
    estimator_head_dim: int = 64
    estimator_blocks: int = 4
    estimator_mid_blocks: int = 12
    estimator_heads: int = 8
    hift_channels: int = 512
    resblock_kernel_sizes: str = "[3, 7, 11]"
    resblock_dilation_sizes: str = "[[1, 3, 5], [1, 3, 5], [1, 3, 5]]"
    source_resblock_kernel_sizes: str = "[7, 11]"
    source_resblock_dilation_sizes: str = "[[1, 3, 5], [1, 3, 5]]"
    f0_channels: int = 512


PUBLISHED_DECODER_SIZES = DecoderSizes()
TINY_DECODER_SIZES = DecoderSizes(
    token_dim=32,
    encoder_heads=2,
    encoder_units=64,
    encoder_blocks=2,
    regulator_ratios="[1, 1]",
    estimator_channels="[32, 32]",
    estimator_head_dim=16,
    estimator_blocks=1,
    estimator_mid_blocks=2,
    estimator_heads=2,
    hift_channels=32,
    resblock_kernel_sizes="[3, 5]",
    resblock_dilation_sizes="[[1, 3], [1, 3]]",
    source_resblock_kernel_sizes="[3, 5]",
    source_resblock_dilation_sizes="[[1, 3], [1, 3]]",
    f0_channels=16,
)

CONFIG_TEMPLATE = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 22050
text_encoder_input_size: 512
llm_input_size: 1024
llm_output_size: 1024
spk_embed_dim: 192

# model params
# for all class/function included in this repo, we use !<name> or !<new> for intialization, so that user may find all corresponding class/function according to one single yaml.
# for system/third_party class/function, we do not require this.
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 51866
    speech_token_size: 4096
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: 1024
        attention_heads: 8
        linear_units: 2048
        num_blocks: 3
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: 8
        linear_units: 2048
        num_blocks: 7
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {token_dim}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {vocab_size}
    input_frame_rate: 12.5
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {token_dim}
        attention_heads: {encoder_heads}
        linear_units: {encoder_units}
        num_blocks: {encoder_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: 10
        input_size: {token_dim}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: {regulator_ratios}
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: {estimator_channels}
            dropout: 0
            attention_head_dim: {estimator_head_dim}
            n_blocks: {estimator_blocks}
            num_mid_blocks: {estimator_mid_blocks}
            num_heads: {estimator_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: {resblock_kernel_sizes}
    resblock_dilation_sizes: {resblock_dilation_sizes}
    source_resblock_kernel_sizes: {source_resblock_kernel_sizes}
    source_resblock_dilation_sizes: {source_resblock_dilation_sizes}
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}
"""


def render_decoder_config(sizes: DecoderSizes = PUBLISHED_DECODER_SIZES) -> str:
    return CONFIG_TEMPLATE.format(**asdict(sizes))


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """Deterministic random init from a private generator (no global RNG use)."""
    for name, tensor in module.named_parameters(recurse=False):
        with torch.no_grad():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name == "alpha":
                tensor.fill_(1.0 if name in ("weight", "alpha") else 0.0)
            elif name == "bias":
                tensor.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, nn.Embedding):
                tensor.normal_(0.0, 1.0, generator=generator)
            elif tensor.dim() >= 2:
                fan_in = tensor.shape[1] * math.prod(tensor.shape[2:])
                if isinstance(module, nn.ConvTranspose1d):
                    fan_in = tensor.shape[0] * tensor.shape[2] // max(1, module.stride[0])
                tensor.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            else:
                tensor.normal_(0.0, 0.1, generator=generator)


def _tame_vocoder_head(hift: HiFTGenerator) -> None:
    """Make the random vocoder's output smooth: only the DC bin of its 16-point iSTFT carries energy
    (log-magnitude bias -1, the 8 harmonic bins -9), with small weights into the other channels, so
    the waveform is an overlap-add of Hann windows every 4 samples. Unscaled random weights give
    clipped white noise, in which no test could see a discontinuity at a block seam."""
    conv = hift.conv_post
    bins = conv.out_channels // 2
    with torch.no_grad():
        scale = torch.full((conv.out_channels, 1, 1), VOCODER_HEAD_WEIGHT_SCALE)
        scale[0] = VOCODER_DC_WEIGHT_SCALE
        conv.weight.mul_(scale)
        bias = conv.bias
        assert bias is not None  # conv_post is built with a bias
        bias.zero_()
        bias[0] = VOCODER_DC_LOG_MAGNITUDE
        bias[1:bins] = VOCODER_HARMONIC_LOG_MAGNITUDE


def build_random_decoder(config_path: Path, seed: int) -> tuple[MaskedDiffWithXvec, HiFTGenerator]:
    """flow and hift of ``config_path`` with deterministic random weights."""
    from cosyvoice.config import load_decoder_config

    with torch.device("meta"):
        config = load_decoder_config(config_path)
    generator = torch.Generator().manual_seed(seed)
    modules = []
    for key in ("flow", "hift"):
        module = config[key].to_empty(device="cpu")
        for sub in module.modules():
            _init_(sub, generator)
        modules.append(module.eval())
    _tame_vocoder_head(modules[1])
    return modules[0], modules[1]


def write_random_decoder(folder: Path, sizes: DecoderSizes, seed: int) -> tuple[MaskedDiffWithXvec, HiFTGenerator]:
    """A ``glm-4-voice-decoder`` folder (config.yaml, flow.pt, hift.pt) of these sizes with random
    weights (the benchmarks use the published sizes); returns the flow and hift modules written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / CONFIG_FILE
    config_path.write_text(render_decoder_config(sizes), encoding="utf-8")
    flow, hift = build_random_decoder(config_path, seed)
    torch.save(OrderedDict(flow.state_dict()), folder / FLOW_FILE)
    torch.save(OrderedDict(hift.checkpoint_state_dict()), folder / HIFT_FILE)
    return flow, hift


def write_tiny_decoder(folder: Path, vocab: TinyVocab, seed: int) -> None:
    write_random_decoder(folder, replace(TINY_DECODER_SIZES, vocab_size=vocab.num_audio_codes), seed)
