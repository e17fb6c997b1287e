"""``POST /generate_stream`` request: the original's JSON body, validated strictly.

The original read ``prompt``, ``temperature``, ``top_p`` and ``max_new_tokens`` (defaults:
``glm4voice.defaults.WIRE_*``, the original's) from any JSON body, whatever its Content-Type (its
web demo posts ``data=json.dumps(...)`` with none). We accept the same bodies, plus ``prompt_token_ids`` (instead of ``prompt``) and ``seed``,
and refuse everything else with a clear message before any streaming starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from glm4voice.defaults import (
    MAX_NEW_TOKENS_MIN,
    MAX_SEED,
    TEMPERATURE,
    TOP_P,
    WIRE_MAX_NEW_TOKENS,
    WIRE_TEMPERATURE,
    WIRE_TOP_P,
    temperature_problem,
    top_p_problem,
)

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class RequestError(Exception):
    """A request refused before streaming: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, text: str, detail: list[dict[str, Any]] | None = None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.detail = detail


class GenerateRequest(BaseModel):
    """The body of ``POST /generate_stream``. Exactly one of ``prompt`` / ``prompt_token_ids``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str | None = None
    """Prompt text; special-token texts (``<|user|>``, ``<|audio_5|>``) become their ids and
    ``[gMASK]<sop>`` is put in front, as the original's tokenizer does."""
    prompt_token_ids: list[StrictInt] | None = None
    """Prompt ids, taken as given (no prefix added)."""
    temperature: float = Field(WIRE_TEMPERATURE, ge=TEMPERATURE.low, le=TEMPERATURE.high, allow_inf_nan=False)
    """0 means greedy. Bounds (``glm4voice.defaults``) shared with the engine and the page."""
    top_p: float = Field(WIRE_TOP_P, gt=TOP_P.low, le=TOP_P.high, allow_inf_nan=False)
    max_new_tokens: int = Field(WIRE_MAX_NEW_TOKENS, ge=MAX_NEW_TOKENS_MIN)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)

    # after the range checks above (pydantic's messages), the rest of the shared checks: float32
    @field_validator("temperature")
    @classmethod
    def _temperature_float32(cls, value: float) -> float:
        return _checked(value, temperature_problem(value))

    @field_validator("top_p")
    @classmethod
    def _top_p_float32(cls, value: float) -> float:
        return _checked(value, top_p_problem(value))

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _integral_number(cls, value: Any) -> Any:
        # Gradio's gr.Number (the original web demo's "Max new tokens") sends 2000.0.
        if type(value) is float and math.isfinite(value) and value.is_integer():
            return int(value)
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _within_cap(cls, value: int, info: ValidationInfo) -> int:
        cap = (info.context or {}).get("max_new_tokens_cap")
        if cap is not None and value > cap:
            raise ValueError(f"must be at most {cap} on this server")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompt' (text) and 'prompt_token_ids' (list of ints)")
        return self


def _checked(value: float, problem: str | None) -> float:
    if problem is not None:
        raise ValueError(problem)
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_generate_request(body: bytes, max_new_tokens_cap: int) -> GenerateRequest:
    """Decode and validate a request body; :class:`RequestError` (400 or 422) if it is bad."""
    if not body.strip():
        raise RequestError(400, 'the request body is empty; send a JSON object such as {"prompt": "..."}')
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}") from error
    except RecursionError as error:  # arrays or objects nested thousands deep
        raise RequestError(400, "the request body is nested too deeply; send a flat JSON object") from error
    if not isinstance(data, dict):
        raise RequestError(422, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return GenerateRequest.model_validate(data, context={"max_new_tokens_cap": max_new_tokens_cap})
    except ValidationError as error:
        detail = [_describe(e) for e in error.errors(include_url=False, include_input=False)]
        text = "; ".join(f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in detail)
        raise RequestError(422, f"invalid request: {text}", detail) from error


def _describe(error: ErrorDetails) -> dict[str, Any]:
    field = ".".join(str(part) for part in error.get("loc", ()))
    message = error["msg"].removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown field (allowed: " + ", ".join(GenerateRequest.model_fields) + ")"
    return {"field": field, "message": message}


@dataclass(frozen=True)
class PromptLimits:
    max_prompt_tokens: int
    vocab_size: int
    """Ids must be below this (the model's embedding rows, padded rows included)."""


def check_prompt_ids(ids: list[int], limits: PromptLimits) -> None:
    """Prompt length and id range; :class:`RequestError` (413 or 422)."""
    if not ids:
        raise RequestError(422, "invalid request: prompt_token_ids: must not be empty")
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(
            413, f"the prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}"
        )
    bad = next((i for i in ids if not 0 <= i < limits.vocab_size), None)
    if bad is not None:
        raise RequestError(
            422, f"invalid request: prompt_token_ids: id {bad} is outside the vocabulary [0, {limits.vocab_size})"
        )
