"""One home for shared defaults: every layer uses the same wire defaults and the same sampling bounds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from glm4voice import defaults
from glm4voice.client import request_body
from glm4voice.defaults import FLOAT32_SMALLEST_NORMAL, MAX_SEED
from glm4voice.llm.engine import EngineConfig, InvalidSamplingParams, SamplingParams
from glm4voice.pipeline import GenerationOptions, TurnError
from glm4voice.server.schema import RequestError, parse_generate_request
from glm4voice.server.settings import ServerSettings

from support import ROOT

WIRE = (defaults.WIRE_TEMPERATURE, defaults.WIRE_TOP_P, defaults.WIRE_MAX_NEW_TOKENS)


def test_defaults_import_no_torch():
    code = "import sys, glm4voice.defaults; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_server_client_and_engine_agree_on_the_wire_defaults():
    assert WIRE == (1.0, 1.0, 256)  # the original server's
    parsed = parse_generate_request(json.dumps({"prompt": "x"}).encode(), max_new_tokens_cap=10_000)
    assert (parsed.temperature, parsed.top_p, parsed.max_new_tokens) == WIRE
    body = request_body("x")
    assert (body["temperature"], body["top_p"], body["max_new_tokens"]) == WIRE
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.max_new_tokens) == WIRE


def test_the_demo_defaults_are_the_original_web_demos():
    options = GenerationOptions()
    assert (options.temperature, options.top_p, options.max_new_tokens) == (0.2, 0.8, 2000)
    assert (options.temperature, options.top_p, options.max_new_tokens) == (
        defaults.DEMO_TEMPERATURE,
        defaults.DEMO_TOP_P,
        defaults.DEMO_MAX_NEW_TOKENS,
    )
    assert defaults.DEMO_MAX_NEW_TOKENS <= defaults.MAX_NEW_TOKENS_CAP  # the server accepts the page's default


def test_server_and_engine_share_ports_and_lengths():
    settings = ServerSettings()
    assert (settings.host, settings.port) == ("localhost", defaults.TOKEN_SERVER_PORT) == ("localhost", 10000)
    assert settings.max_seq_len == EngineConfig().max_seq_len == defaults.MAX_SEQ_LEN
    assert settings.max_new_tokens_cap == defaults.MAX_NEW_TOKENS_CAP
    assert f"http://localhost:{settings.port}" == defaults.DEFAULT_SERVER_URL


# (setting, value, valid?) at and around every bound, and values that are not float32 numbers
CASES = [
    ("temperature", 0, True),
    ("temperature", 0.0, True),
    ("temperature", 100.0, True),
    ("temperature", FLOAT32_SMALLEST_NORMAL, True),
    ("temperature", 100.0001, False),
    ("temperature", 1e39, False),
    ("temperature", 1e-50, False),
    ("temperature", -0.1, False),
    ("temperature", float("nan"), False),
    ("top_p", 1.0, True),
    ("top_p", FLOAT32_SMALLEST_NORMAL, True),
    ("top_p", 1e-50, False),
    ("top_p", 0.0, False),
    ("top_p", 1.01, False),
    ("max_new_tokens", 1, True),
    ("max_new_tokens", 0, False),
]


def _server_accepts(name: str, value) -> bool:
    try:
        parse_generate_request(json.dumps({"prompt": "x", name: value}).encode(), max_new_tokens_cap=10_000)
    except RequestError as error:
        assert error.status == 422 and name in [d["field"] for d in error.detail], error.text
        return False
    return True


def _engine_accepts(name: str, value) -> bool:
    try:
        SamplingParams(**{name: value})
    except InvalidSamplingParams as error:
        assert name in str(error)
        return False
    return True


def _pipeline_accepts(name: str, value) -> bool:
    try:
        GenerationOptions(**{name: value}).check()
    except TurnError as error:
        assert name.replace("_", " ").replace("top p", "top-p") in error.message
        return False
    return True


@pytest.mark.parametrize("name, value, valid", CASES, ids=[f"{n}={v!r}" for n, v, _ in CASES])
def test_every_layer_applies_the_same_bounds(name, value, valid):
    if isinstance(value, float) and math.isnan(value):
        # NaN is not JSON, so the server never sees one (its parser refuses the body)
        assert not _engine_accepts(name, value) and not _pipeline_accepts(name, value)
        return
    assert (_server_accepts(name, value), _engine_accepts(name, value), _pipeline_accepts(name, value)) == (
        valid,
        valid,
        valid,
    )


def test_seed_bounds_are_shared():
    for seed, valid in ((0, True), (MAX_SEED, True), (MAX_SEED + 1, False), (-1, False)):
        assert _server_accepts("seed", seed) == _engine_accepts("seed", seed) == valid


def test_bounds_describe_themselves():
    assert str(defaults.TEMPERATURE) == "[0, 100]" and str(defaults.TOP_P) == "(0, 1]"
    assert 0.0 not in defaults.TOP_P and 1.0 in defaults.TOP_P and 0.0 in defaults.TEMPERATURE
    assert defaults.temperature_problem(1e39) == "must be in [0, 100] (0 = greedy), got 1e+39"
    assert "float32" in defaults.top_p_problem(1e-50)
    assert defaults.max_new_tokens_problem(2.5) is not None and defaults.seed_problem(None) is None
