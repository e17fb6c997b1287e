"""The published decoder config.yaml builds our modules with the checkpoint's parameter names and shapes.

The published ``glm-4-voice-decoder/config.yaml`` (4447 bytes) is not copied into this repository:
``render_decoder_config(PUBLISHED_DECODER_SIZES)`` reproduces it, checked here against the published
file's SHA-256 (taken from a faithful public copy, github susameddin/sympatheia).
``data/published_decoder_keys.json`` lists the
state-dict keys and shapes of the ORIGINAL implementation's modules built from that file (the original
loads flow.pt and hift.pt strictly into exactly these).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import ruamel.yaml
import torch

from cosyvoice.config import DecoderConfigError, DictConfig, load_decoder_config, prepare_decoder_yaml
from glm4voice.checkpoints.decoder import PUBLISHED_DECODER_SIZES, TINY_DECODER_SIZES, render_decoder_config

DATA = Path(__file__).parent / "data"
PUBLISHED_CONFIG_SHA256 = "44c108d91a3d0ee97940252fbf64ffe1f3a0d13ff2103f8e6cea95f9db50fe88"
PUBLISHED_CONFIG_BYTES = 4447


@pytest.fixture(scope="module")
def published_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("published-decoder") / "config.yaml"
    path.write_text(render_decoder_config(PUBLISHED_DECODER_SIZES), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def published_keys() -> dict:
    return json.loads((DATA / "published_decoder_keys.json").read_text())


@pytest.fixture(scope="module")
def published_modules(published_config):
    with torch.device("meta"):
        return load_decoder_config(published_config)


def test_published_config_builds_the_checkpoint_layout_on_meta(published_modules, published_keys):
    flow, hift = published_modules["flow"], published_modules["hift"]
    assert all(p.is_meta for p in flow.parameters()) and all(p.is_meta for p in hift.parameters())
    flow_shapes = {k: list(v.shape) for k, v in flow.state_dict().items()}
    hift_shapes = {k: list(v) for k, v in hift.checkpoint_key_shapes().items()}
    assert flow_shapes == published_keys["flow"]
    assert hift_shapes == published_keys["hift"]
    # 445 MB / 81.9 MB of float32 as published
    assert sum(p.numel() for p in flow.parameters()) == 111_166_208
    assert sum(int(np.prod(s)) for s in hift_shapes.values()) == 20_460_591


def test_published_config_values_reach_the_modules(published_modules):
    flow, hift = published_modules["flow"], published_modules["hift"]
    assert published_modules["sample_rate"] == 22050 and "llm" not in published_modules
    assert flow.input_frame_rate == 12.5 and flow.vocab_size == 16384 and flow.encoder.block_size == 10
    cfm = flow.decoder
    assert (cfm.t_scheduler, cfm.inference_cfg_rate, cfm.solver) == ("cosine", 0.7, "euler")
    assert cfm.estimator.in_channels == 320 and len(cfm.estimator.mid_blocks) == 12
    assert hift.upsample_scale == 256 and (hift.n_fft, hift.hop_len) == (16, 4) and hift.lrelu_slope == 0.1


def test_loading_does_not_reseed_the_process(published_config):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    with torch.device("meta"):
        load_decoder_config(published_config)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_prepared_yaml_drops_only_the_unused_nodes(published_config):
    tree = ruamel.yaml.YAML().load(prepare_decoder_yaml(published_config.read_text()))
    assert set(tree) == {
        "sample_rate",
        "text_encoder_input_size",
        "llm_input_size",
        "llm_output_size",
        "spk_embed_dim",
        "flow",
        "hift",
    }
    assert "omegaconf" not in prepare_decoder_yaml(published_config.read_text())


def test_dictconfig_stand_in():
    params = DictConfig(content={"solver": "euler", "inference_cfg_rate": 0.7})
    assert (
        params.solver == "euler"
        and params["inference_cfg_rate"] == 0.7
        and dict(params) == {"solver": "euler", "inference_cfg_rate": 0.7}
    )
    with pytest.raises(AttributeError):
        _ = params.missing


def test_tiny_writer_renders_the_published_file_form(published_config):
    published_bytes = published_config.read_bytes()
    assert len(published_bytes) == PUBLISHED_CONFIG_BYTES
    assert hashlib.sha256(published_bytes).hexdigest() == PUBLISHED_CONFIG_SHA256

    def shape(node, path=""):
        """(path, tag) of every node: same keys, nesting and tags, values aside."""
        out = [(path, getattr(getattr(node, "tag", None), "value", None))]
        if isinstance(node, dict):
            for key, value in node.items():
                out += shape(value, f"{path}/{key}")
        return out

    yaml = ruamel.yaml.YAML()
    tiny = yaml.load(render_decoder_config(TINY_DECODER_SIZES))
    published = yaml.load(published_config.read_text())
    assert shape(tiny) == shape(published)
    assert tiny["flow"]["encoder"]["num_blocks"] < published["flow"]["encoder"]["num_blocks"]


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(DecoderConfigError, match="cannot read"):
        load_decoder_config(tmp_path / "missing.yaml")
    (tmp_path / "no_hift.yaml").write_text("sample_rate: 22050\n")
    with pytest.raises(DecoderConfigError, match="no flow, hift section"):
        load_decoder_config(tmp_path / "no_hift.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(DecoderConfigError, match="mapping"):
        load_decoder_config(tmp_path / "list.yaml")
