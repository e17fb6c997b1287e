"""Request validation and the NDJSON wire format (no server needed)."""

from __future__ import annotations

import json

import pytest

from glm4voice.defaults import WIRE_MAX_NEW_TOKENS as DEFAULT_MAX_NEW_TOKENS
from glm4voice.server import wire
from glm4voice.server.schema import (
    PromptLimits,
    RequestError,
    check_prompt_ids,
    parse_generate_request,
)
from glm4voice.server.settings import ServerSettings

CAP = 100


def parse(body: dict | bytes):
    return parse_generate_request(body if isinstance(body, bytes) else json.dumps(body).encode(), CAP)


def test_the_original_body_with_its_defaults():
    request = parse({"prompt": "<|user|>\nhi"})
    assert (request.prompt, request.prompt_token_ids, request.seed) == ("<|user|>\nhi", None, None)
    assert (request.temperature, request.top_p, request.max_new_tokens) == (1.0, 1.0, DEFAULT_MAX_NEW_TOKENS)


def test_gradio_floats_and_integer_temperatures_are_accepted():
    request = parse({"prompt": "x", "temperature": 0, "top_p": 1, "max_new_tokens": 20.0})
    assert request.max_new_tokens == 20 and type(request.max_new_tokens) is int
    assert request.temperature == 0.0


@pytest.mark.parametrize(
    "body,status,field",
    [
        (b"", 400, None),
        (b"{", 400, None),
        (b'{"prompt": "x", "top_p": Infinity}', 400, None),
        (b"null", 422, None),
        ({"prompt": "x", "temperature": True}, 422, "temperature"),
        ({"prompt": "x", "top_p": "0.5"}, 422, "top_p"),
        ({"prompt": "x", "max_new_tokens": CAP + 1}, 422, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 1e300}, 422, "max_new_tokens"),
        ({"prompt": "x", "seed": 2**63}, 422, "seed"),
        ({"prompt": "x", "seed": 1.0}, 422, "seed"),
        ({"prompt_token_ids": [1, 2.0]}, 422, "prompt_token_ids.1"),
        ({"prompt_token_ids": "1 2"}, 422, "prompt_token_ids"),
        ({"prompt": ["x"]}, 422, "prompt"),
        ({"prompt": "x", "stream": True}, 422, "stream"),
    ],
)
def test_bad_bodies(body, status, field):
    with pytest.raises(RequestError) as caught:
        parse(body)
    assert caught.value.status == status
    if field is not None:
        assert field in [d["field"] for d in caught.value.detail]
        assert caught.value.text.startswith("invalid request: ")


def test_prompt_id_limits():
    limits = PromptLimits(max_prompt_tokens=4, vocab_size=10)
    check_prompt_ids([0, 9, 1, 2], limits)
    for ids, status in (([], 422), ([1] * 5, 413), ([10], 422), ([-1], 422)):
        with pytest.raises(RequestError) as caught:
            check_prompt_ids(ids, limits)
        assert caught.value.status == status


def test_wire_lines_round_trip():
    assert wire.token_line(17) == b'{"token_id": 17, "error_code": 0}\n'
    assert json.loads(wire.token_line(17)) == {"token_id": 17, "error_code": 0}
    assert wire.parse_line(wire.token_line(5)) == wire.TokenLine(5)
    assert wire.parse_line(wire.error_line("engine error: boom")) == wire.ErrorLine("engine error: boom", 1)
    assert wire.parse_line('{"text": "Server Error", "error_code": 1}') == wire.ErrorLine(
        "Server Error", 1
    )  # the original's
    for bad in (
        "",
        "[1]",
        '{"token_id": 1}',
        '{"token_id": -1, "error_code": 0}',
        '{"token_id": "1", "error_code": 0}',
    ):
        with pytest.raises(wire.WireFormatError):
            wire.parse_line(bad)


def test_settings_check_their_limits():
    assert ServerSettings().prompt_limit == ServerSettings().max_seq_len - 1
    assert ServerSettings(max_prompt_tokens=10).prompt_limit == 10
    assert ServerSettings(max_prompt_tokens=10).max_body_bytes >= 1 << 20
    for bad in (dict(dtype="int3"), dict(max_concurrent_streams=0), dict(max_queue=-1), dict(queue_timeout_s=0),
                dict(max_prompt_tokens=8192, max_seq_len=8192)):  # fmt: skip
        with pytest.raises(ValueError):
            ServerSettings(**bad)
