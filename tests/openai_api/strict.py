"""Checks that what the server sends is exactly what the openai SDK's types describe."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter


def no_extras(value: Any, where: str = "") -> None:
    """Nothing the SDK's types do not know: no ``model_extra`` anywhere inside ``value``."""
    if isinstance(value, BaseModel):
        assert not value.model_extra, (
            f"{where or type(value).__name__} has fields the SDK does not know: {value.model_extra}"
        )
        for name in type(value).model_fields:
            no_extras(getattr(value, name), f"{where}.{name}" if where else f"{type(value).__name__}.{name}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            no_extras(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            no_extras(item, f"{where}[{key!r}]")


def validate(sdk_type: Any, data: dict) -> Any:
    """``data`` validated (not just constructed) as ``sdk_type``, with no unknown field anywhere."""
    parsed = TypeAdapter(sdk_type).validate_python(data)
    no_extras(parsed)
    return parsed
