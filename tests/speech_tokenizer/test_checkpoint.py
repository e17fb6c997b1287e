import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glm4voice.checkpoints.speech_tokenizer import PUBLISHED_PREPROCESSOR_CONFIG, published_config
from speech_tokenizer import CheckpointError, WhisperVQEncoder
from speech_tokenizer.checkpoint import required_shapes, skipped_shape


def published_keys() -> dict[str, tuple[int, ...]]:
    """The published model.safetensors (docs/ORIGINAL.md): 16 layers, codebook, EMA buffers."""
    d, ffn = 1280, 5120
    keys = {
        "conv1.weight": (d, 128, 3), "conv1.bias": (d,), "conv2.weight": (d, d, 3), "conv2.bias": (d,),
        "embed_positions.weight": (1500, d), "embed_positions2.weight": (375, d),
        "codebook.weight": (16384, d), "ema_count": (16384,), "ema_weight": (16384, d),
    }  # fmt: skip
    for i in range(16):
        for proj in ("q_proj", "v_proj", "out_proj"):
            keys[f"layers.{i}.self_attn.{proj}.weight"] = (d, d)
            keys[f"layers.{i}.self_attn.{proj}.bias"] = (d,)
        keys[f"layers.{i}.self_attn.k_proj.weight"] = (d, d)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            keys[f"layers.{i}.{norm}.weight"] = (d,)
            keys[f"layers.{i}.{norm}.bias"] = (d,)
        keys[f"layers.{i}.fc1.weight"], keys[f"layers.{i}.fc1.bias"] = (ffn, d), (ffn,)
        keys[f"layers.{i}.fc2.weight"], keys[f"layers.{i}.fc2.bias"] = (d, ffn), (d,)
    return keys


def test_full_size_model_on_meta_has_exactly_the_published_encoder_keys():
    config = published_config()
    with torch.device("meta"):
        model = WhisperVQEncoder(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    expected = {k: v for k, v in published_keys().items() if not k.startswith("ema_")}
    assert shapes == expected
    assert required_shapes(config) == expected
    assert len(model.layers) == 16 and sum(t.numel() for t in model.parameters()) == sum(
        torch.Size(s).numel() for s in expected.values()
    )


def test_every_published_key_is_either_loaded_or_skipped_on_purpose():
    config = published_config()
    required = required_shapes(config)
    for key, shape in published_keys().items():
        if key in required:
            assert required[key] == shape
        else:
            reason, expected = skipped_shape(config, key)
            assert expected == shape and "EMA" in reason


def test_tiny_folder_loads_strictly(tiny_checkpoints):
    folder = tiny_checkpoints.speech_tokenizer
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    model = WhisperVQEncoder.from_pretrained(folder)
    file_tensors = load_file(str(folder / "model.safetensors"))
    own = model.state_dict()
    assert set(file_tensors) - set(own) == {"ema_count", "ema_weight"}
    for name, tensor in own.items():
        assert torch.equal(tensor, file_tensors[name]), name
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    config = model.config
    layer_keys = {int(k.split(".")[1]) for k in file_tensors if k.startswith("layers.")}
    assert layer_keys == set(range(config.quantize_position)) and config.encoder_layers > config.quantize_position


def test_tiny_preprocessor_config_is_the_published_one(tiny_checkpoints):
    text = (tiny_checkpoints.speech_tokenizer / "preprocessor_config.json").read_text()
    assert json.loads(text) == PUBLISHED_PREPROCESSOR_CONFIG and len(text.encode()) == 340


def test_lower_precision_keeps_the_codebook_in_float32(tiny_checkpoints):
    model = WhisperVQEncoder.from_pretrained(tiny_checkpoints.speech_tokenizer, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.layers[0].fc1.weight.dtype == torch.bfloat16
    assert model.codebook.weight.dtype == torch.float32


def _copy(folder, tmp_path):
    target = tmp_path / "tok"
    shutil.copytree(folder, target)
    return target


def test_full_model_layout_loads_and_says_what_it_skips(tiny_checkpoints, tmp_path, caplog):
    """The `model.encoder.` layout of WhisperVQForConditionalGeneration: all 4 layers, final norm, decoder."""
    folder = _copy(tiny_checkpoints.speech_tokenizer, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    d = tensors["conv1.bias"].shape[0]
    full = {f"model.encoder.{k}": v for k, v in tensors.items()}
    for i in (2, 3):
        for k, v in tensors.items():
            if k.startswith("layers.0."):
                full[f"model.encoder.layers.{i}." + k[len("layers.0.") :]] = v.clone()
    full["model.encoder.layer_norm.weight"], full["model.encoder.layer_norm.bias"] = torch.ones(d), torch.zeros(d)
    full["model.decoder.embed_tokens.weight"] = torch.zeros(10, d)
    full["proj_out.weight"] = torch.zeros(10, d)
    (folder / "model.safetensors").unlink()
    save_file(full, str(folder / "model-00001-of-00001.safetensors"))
    with caplog.at_level(logging.DEBUG, logger="speech_tokenizer.checkpoint"):
        model = WhisperVQEncoder.from_pretrained(folder)
    message = " ".join(record.getMessage() for record in caplog.records)
    assert "full model" in message
    assert "30 key(s): encoder layers at or beyond quantize_position 2" in message
    assert "2 key(s): Whisper decoder" in message and "final encoder layer norm" in message
    reference = WhisperVQEncoder.from_pretrained(tiny_checkpoints.speech_tokenizer)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("layers.1.fc2.bias"), "missing 1 key.*layers.1.fc2.bias"),
        (lambda t: t.update({"layers.1.fc3.weight": torch.zeros(2)}), "unexpected 1 key.*layers.1.fc3.weight"),
        (lambda t: t.update({"layers.9.fc1.weight": torch.zeros(2)}), "unexpected 1 key.*layers.9.fc1.weight"),
        (lambda t: t.update({"codebook.weight": torch.zeros(7, 64)}), "shape mismatch.*codebook.weight"),
        (lambda t: t.update({"ema_weight": torch.zeros(7, 64)}), "shape mismatch.*ema_weight"),
    ],
)
def test_mismatched_weights_are_errors(tiny_checkpoints, tmp_path, change, message):
    folder = _copy(tiny_checkpoints.speech_tokenizer, tmp_path)
    _rewrite(folder, change)
    with pytest.raises(CheckpointError, match=message):
        WhisperVQEncoder.from_pretrained(folder)


def test_config_that_does_not_fit_the_weights_is_an_error(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints.speech_tokenizer, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantize_position": 3, "pooling_position": 3}))
    with pytest.raises(CheckpointError, match="missing .*layers.2"):
        WhisperVQEncoder.from_pretrained(folder)


def test_no_weights_is_an_error(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints.speech_tokenizer, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model"):
        WhisperVQEncoder.from_pretrained(folder)


def test_not_a_folder_is_a_clear_error(tmp_path, monkeypatch):
    from glm4voice.hub import CheckpointNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError):
        WhisperVQEncoder.from_pretrained(tmp_path / "nowhere")
