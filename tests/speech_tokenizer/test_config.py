import json

import pytest

from glm4voice.checkpoints.speech_tokenizer import PUBLISHED_CONFIG, TINY_OVERRIDES, published_config
from speech_tokenizer.configuration_whisper import ConfigError, WhisperVQConfig


def test_published_config_round_trips_field_for_field():
    config = WhisperVQConfig.from_dict(PUBLISHED_CONFIG)
    assert config.to_dict() == PUBLISHED_CONFIG
    assert config.extra == {}
    assert (config.d_model, config.quantize_position, config.pooling_kernel_size, config.pooling_type) == (
        1280,
        16,
        4,
        "avg",
    )
    assert config.quantize_vocab_size == 16384 and config.quantize_causal_block_size == 200
    assert config.encoder_causal_convolution and not config.attention_is_causal


def test_tiny_config_file_has_the_published_fields(tiny_checkpoints):
    written = json.loads((tiny_checkpoints.speech_tokenizer / "config.json").read_text())
    assert set(written) == set(PUBLISHED_CONFIG)
    for key, value in PUBLISHED_CONFIG.items():
        if key not in TINY_OVERRIDES and key != "quantize_vocab_size":
            assert written[key] == value, key
    assert written["quantize_vocab_size"] == tiny_checkpoints.vocab.num_audio_codes
    assert written["encoder_layers"] > written["quantize_position"]


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="pooling_kernal_size"):
        WhisperVQConfig.from_dict({**PUBLISHED_CONFIG, "pooling_kernal_size": 4})


def test_other_whisper_fields_are_kept_not_dropped():
    values = {**PUBLISHED_CONFIG, "suppress_tokens": [1, 2], "output_hidden_states": False}
    config = WhisperVQConfig.from_dict(values)
    assert config.extra == {"suppress_tokens": [1, 2], "output_hidden_states": False}
    assert config.to_dict() == values


def test_missing_fields_take_the_original_defaults():
    config = WhisperVQConfig.from_dict(
        {"quantize_vocab_size": 8, "d_model": 64, "encoder_attention_heads": 4, "quantize_position": 2}
    )
    assert config.pooling_type == "max" and config.pooling_kernel_size is None and config.pooling == 1
    assert config.num_mel_bins == 80 and config.encoder_layers == 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantize_vocab_size": None}, "quantize_vocab_size is not set"),
        ({"pooling_position": 0}, "pooling_position"),
        ({"pooling_position": 17}, "pooling_position"),
        ({"pooling_type": "median"}, "pooling_type"),
        ({"quantize_position": 33}, "exceeds encoder_layers"),
        ({"encoder_attention_heads": 7}, "not divisible"),
        ({"d_model": 0}, "d_model"),
        ({"activation_function": "swishy"}, "activation_function"),
        ({"quantize_causal_block_size": 0}, "quantize_causal_block_size"),
    ],
)
def test_configs_the_tokenizer_cannot_run_are_rejected(change, message):
    with pytest.raises(ConfigError, match=message):
        WhisperVQConfig.from_dict({**PUBLISHED_CONFIG, **change})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        WhisperVQConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        WhisperVQConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        WhisperVQConfig.from_json_file(tmp_path / "config.json")


def test_save_and_read_back(tmp_path):
    config = published_config().replace(d_model=64, encoder_attention_heads=4)
    config.save(tmp_path)
    assert WhisperVQConfig.from_pretrained(tmp_path) == config
    text = (tmp_path / "config.json").read_text()
    assert (
        text.endswith("}\n")
        and '"_name_or_path"' in text
        and 'name_or_path"' not in text.replace('"_name_or_path"', "")
    )
