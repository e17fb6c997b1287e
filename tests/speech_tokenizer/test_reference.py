"""The model against a plain, loop-and-matmul reference of the Whisper-VQ computation.

The reference is written from the description of the original (docs/ORIGINAL.md), in float64,
without transformers: it checks that transformers' layers, our masks, pooling and code search
compute the same thing, for the published settings and for the other settings a config may have.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glm4voice.checkpoints.speech_tokenizer import init_random_weights, tiny_config
from speech_tokenizer import WhisperVQEncoder
from speech_tokenizer.pipeline import split_pieces


def reference_hidden(model: WhisperVQEncoder, features: torch.Tensor, frame_mask: torch.Tensor):
    """Quantiser input (T, D) and mask (T,) for ONE example, float64, explicit loops over layers/heads."""
    config = model.config
    p = {name: tensor.detach().double() for name, tensor in model.state_dict().items()}
    x = features.double()[None]
    if config.encoder_causal_convolution:
        x = F.conv1d(F.pad(x, (2, 0)), p["conv1.weight"], p["conv1.bias"])
        x = F.gelu(x)
        x = F.conv1d(F.pad(x, (2, 0)), p["conv2.weight"], p["conv2.bias"], stride=2)
    else:
        x = F.gelu(F.conv1d(x, p["conv1.weight"], p["conv1.bias"], padding=1))
        x = F.conv1d(x, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1)
    x = F.gelu(x)[0].T
    length = x.shape[0]
    x = x + p["embed_positions.weight"][:length]
    mask = frame_mask.bool()[::2]
    block = config.quantize_causal_block_size
    heads, width = config.encoder_attention_heads, config.d_model
    head = width // heads

    def allowed(i: int, j: int, valid: torch.Tensor, block_size) -> bool:
        if config.encoder_causal_attention or config.quantize_causal_encoder:
            return j <= i
        if block_size is not None:
            return bool(valid[j]) and (j <= i or i // block_size == j // block_size)
        return bool(valid[j])

    def layer_norm(v, name):
        return F.layer_norm(v, (width,), p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    def linear(v, name, bias=True):
        out = v @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if bias else out

    bias_matrix = None
    for index in range(config.quantize_position):
        n = x.shape[0]
        if bias_matrix is None:
            bias_matrix = torch.tensor(
                [[0.0 if allowed(i, j, mask, block) else -math.inf for j in range(n)] for i in range(n)],
                dtype=torch.float64,
            )
        name = f"layers.{index}"
        h = layer_norm(x, f"{name}.self_attn_layer_norm")
        q = linear(h, f"{name}.self_attn.q_proj")
        k = linear(h, f"{name}.self_attn.k_proj", bias=False)
        v = linear(h, f"{name}.self_attn.v_proj")
        outputs = []
        for hd in range(heads):
            cols = slice(hd * head, (hd + 1) * head)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(head) + bias_matrix
            outputs.append(torch.softmax(scores, dim=-1) @ v[:, cols])
        x = x + linear(torch.cat(outputs, dim=1), f"{name}.self_attn.out_proj")
        h = layer_norm(x, f"{name}.final_layer_norm")
        x = x + linear(F.gelu(linear(h, f"{name}.fc1")), f"{name}.fc2")
        if index + 1 == config.pooling_position and config.pooling_kernel_size:
            kernel = config.pooling_kernel_size
            pad = (-x.shape[0]) % kernel
            x = torch.cat([x, torch.zeros(pad, width, dtype=x.dtype)])
            windows = x.reshape(-1, kernel, width)
            x = windows.mean(dim=1) if config.pooling_type == "avg" else windows.amax(dim=1)
            mask = mask[::kernel]
            block = None if block is None else block // kernel
            bias_matrix = None
    return x, mask


def reference_codes(model, hidden):
    codebook = model.codebook.weight.double()
    distances = ((hidden[:, None, :] - codebook[None]) ** 2).sum(-1)
    best2 = distances.topk(2, largest=False)
    return best2.indices[:, 0], (best2.values[:, 1] - best2.values[:, 0])


VARIANTS = {
    "published": {},
    "non-causal conv, max pool": {"encoder_causal_convolution": False, "pooling_type": "max"},
    "causal attention": {"encoder_causal_attention": True},
    "padding mask only": {"quantize_causal_block_size": None},
    "pool before the last layer": {"pooling_position": 1, "quantize_causal_block_size": 24},
    "no pooling": {"pooling_kernel_size": None, "pooling_position": 0},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_equals_reference(variant, feature_extractor, speechlike):
    config = tiny_config(512).replace(**VARIANTS[variant])
    model = WhisperVQEncoder(config).eval()
    init_random_weights(model, seed=3)
    # 3.3 s alone, and 1.1 s padded in a batch with it: the padded example checks the masks.
    long, short = speechlike(3.3, seed=1), speechlike(1.1, f0=220, seed=2)
    stride = model.frames_per_token * feature_extractor.hop_length
    inputs = feature_extractor(
        [long, short], sampling_rate=16000, padding="longest", pad_to_multiple_of=stride,
        return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        hidden, mask = model.encode(inputs["input_features"], inputs["attention_mask"])
        output = model(inputs["input_features"], inputs["attention_mask"])
    for row in range(2):
        ref_hidden, ref_mask = reference_hidden(model, inputs["input_features"][row], inputs["attention_mask"][row])
        assert torch.equal(mask[row], ref_mask)
        valid = ref_mask
        torch.testing.assert_close(hidden[row][valid].double(), ref_hidden[valid], rtol=1e-4, atol=1e-4)
        ref_ids, margin = reference_codes(model, ref_hidden[valid])
        ids = output.quantized_token_ids[row][valid]
        clear = margin > 1e-3 * margin.median()
        assert clear.float().mean() > 0.9
        assert torch.equal(ids[clear], ref_ids[clear]), variant
        assert len(set(ids.tolist())) > 1
        expected_tokens = math.ceil(len((long, short)[row]) / (160 * model.frames_per_token))
        assert int(valid.sum()) == expected_tokens


def test_piece_padding_follows_the_original():
    waveform = np.zeros(30 * 16000 + 5 * 1280, dtype=np.float32)
    pieces = split_pieces(waveform, 0, 1280)
    assert [(p.index, len(p.samples), p.padded_length) for p in pieces] == [(0, 480000, 480000), (1, 6400, 480000)]
    alone = split_pieces(waveform[:6401], 0, 1280)
    assert [(len(p.samples), p.padded_length) for p in alone] == [(6401, 6 * 1280)]
