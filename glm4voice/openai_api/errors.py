"""Errors in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

The same :class:`APIError` carries a refused HTTP request and a realtime ``error`` event. Turn failures
of the pipeline (:class:`glm4voice.pipeline.FailureKind`) map to statuses in :func:`from_failure`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from glm4voice.pipeline import FailureKind

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": f"{self.retry_after_s:g}"}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


_FAILURES: dict[FailureKind, tuple[int, str, str]] = {
    FailureKind.EMPTY_INPUT: (400, INVALID_REQUEST, "empty_input"),
    FailureKind.INVALID_INPUT: (400, INVALID_REQUEST, "invalid_value"),
    FailureKind.INPUT_TOO_LONG: (400, INVALID_REQUEST, "input_too_long"),
    FailureKind.NO_SPEECH: (400, INVALID_REQUEST, "no_speech"),
    FailureKind.SESSION_BUSY: (409, INVALID_REQUEST, "conversation_busy"),
    FailureKind.SERVER_UNAVAILABLE: (503, UNAVAILABLE, "model_server_unavailable"),
    FailureKind.SERVER_BUSY: (503, UNAVAILABLE, "model_server_busy"),
    FailureKind.SERVER_REJECTED: (400, INVALID_REQUEST, "model_server_rejected"),
    FailureKind.STREAM_FAILED: (502, SERVER_ERROR, "model_server_stream_failed"),
    FailureKind.DECODER_FAILED: (500, SERVER_ERROR, "speech_decoder_failed"),
    FailureKind.INTERNAL: (500, SERVER_ERROR, "internal_error"),
}


def from_failure(kind: FailureKind, message: str, *, param: str | None = None, retry_after_s: float) -> APIError:
    """The HTTP error for a failed turn: the user's input is at fault (400), the token server is busy or
    down (503, with Retry-After), or something broke (500/502)."""
    status, type_, code = _FAILURES.get(kind, (500, SERVER_ERROR, "internal_error"))
    return APIError(
        status, message, type=type_, param=param, code=code, retry_after_s=retry_after_s if status == 503 else None
    )


def param_path(location: tuple[Any, ...]) -> str:
    """A pydantic error location as OpenAI writes parameters: ``messages[0].content[1].input_audio.data``."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "tagged-union", "json-or-python")):
            path += ("." if path else "") + part
    return path


def from_validation(error: ValidationError, prefix: tuple[Any, ...] = ()) -> APIError:
    """The first problem of a pydantic validation error, all of them in the message."""
    problems = error.errors(include_url=False)
    first = problems[0]
    messages = []
    for problem in problems:
        where = param_path(prefix + tuple(problem["loc"]))
        text = problem["msg"]
        if problem["type"] == "extra_forbidden":
            text = "unknown parameter"
        elif problem["type"] == "missing":
            text = "missing required parameter"
        messages.append(f"{where}: {text}" if where else text)
    code = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}.get(
        first["type"], "invalid_value"
    )
    return invalid(
        "Invalid request: " + "; ".join(messages) + ".", param_path(prefix + tuple(first["loc"])) or None, code
    )
