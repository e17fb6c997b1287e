"""The original model server's wire format: newline-delimited JSON, one object per line.

``POST /generate_stream`` answers ``{"token_id": N, "error_code": 0}`` per generated token; a
failure ends the stream with ``{"error_code": 1, "text": MESSAGE}`` (the original wrote
``{"text": "Server Error", "error_code": 1}``). Error answers sent before streaming starts (4xx,
503, 500) have a body of the same shape, plus a ``detail`` list for validation errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ERROR_CODE_OK = 0
ERROR_CODE_FAILED = 1
MEDIA_TYPE = "application/x-ndjson"


def token_line(token_id: int) -> bytes:
    """The line for one generated token (key order as the original writes it)."""
    return b'{"token_id": %d, "error_code": 0}\n' % token_id


def error_body(text: str, detail: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error_code": ERROR_CODE_FAILED, "text": text}
    if detail:
        body["detail"] = detail
    return body


def error_line(text: str, detail: list[dict[str, Any]] | None = None) -> bytes:
    return (json.dumps(error_body(text, detail), ensure_ascii=False) + "\n").encode("utf-8")


@dataclass(frozen=True)
class TokenLine:
    token_id: int


@dataclass(frozen=True)
class ErrorLine:
    text: str
    error_code: int


Line = TokenLine | ErrorLine


class WireFormatError(ValueError):
    """A line that is not one of the two shapes above."""


def parse_line(raw: bytes | str) -> Line:
    """Parse one line of a ``/generate_stream`` answer."""
    try:
        obj = json.loads(raw)
    except ValueError as error:
        raise WireFormatError(f"not JSON: {raw[:200]!r}") from error
    if not isinstance(obj, dict):
        raise WireFormatError(f"not a JSON object: {raw[:200]!r}")
    code = obj.get("error_code")
    if type(code) is not int:
        raise WireFormatError(f"no integer error_code: {raw[:200]!r}")
    if code != ERROR_CODE_OK:
        return ErrorLine(str(obj.get("text", "unknown server error")), code)
    token_id = obj.get("token_id")
    if type(token_id) is not int or token_id < 0:
        raise WireFormatError(f"no token_id: {raw[:200]!r}")
    return TokenLine(token_id)
