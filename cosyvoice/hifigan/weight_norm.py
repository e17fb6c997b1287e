"""Weight norm at the checkpoint boundary: convolutions hold plain (folded) weights for inference, and
load from / save to the checkpoint's weight-normed layout.

``hift.pt`` was written with ``torch.nn.utils.weight_norm`` (keys ``X.weight_g``, ``X.weight_v``); the
newer parametrization form (``X.parametrizations.weight.original0/1``) is accepted too. Either pair is
folded into ``X.weight = g · v / ‖v‖`` (norm over all dims but 0, torch's ``_weight_norm``) while the
state dict is loaded, so strict loading still rejects any unknown or missing key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

OLD_KEYS = ("weight_g", "weight_v")
PARAMETRIZATION_KEYS = ("parametrizations.weight.original0", "parametrizations.weight.original1")
_MARK = "_checkpoint_weight_norm"
_M = TypeVar("_M", bound=nn.Module)


def _fold_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for g_name, v_name in (OLD_KEYS, PARAMETRIZATION_KEYS):
        g_key, v_key = prefix + g_name, prefix + v_name
        if g_key in state_dict or v_key in state_dict:
            if prefix + "weight" in state_dict:
                raise KeyError(f"{prefix}weight is given both plain and weight-normed")
            if g_key not in state_dict or v_key not in state_dict:
                raise KeyError(f"weight norm of {prefix.rstrip('.')}: need both {g_key} and {v_key}")
            g, v = state_dict.pop(g_key), state_dict.pop(v_key)
            state_dict[prefix + "weight"] = torch._weight_norm(v, g, 0)
            return


def weight_normed(module: _M) -> _M:
    """Mark ``module`` (a conv with ``.weight``) as stored weight-normed in the checkpoint."""
    setattr(module, _MARK, True)
    module.register_load_state_dict_pre_hook(_fold_on_load)
    return module


def weight_normed_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in root.named_modules():
        if getattr(module, _MARK, False):
            yield name, module


def checkpoint_state_dict(root: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``root.state_dict()`` in the published layout: each marked conv's ``weight`` stored as
    ``weight_g`` (its norm over all dims but 0) and ``weight_v`` (the weight itself), after its bias
    like torch's old ``weight_norm`` ordered them."""
    normed = {f"{name}.weight" if name else "weight" for name, _ in weight_normed_modules(root)}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    later: dict[str, torch.Tensor] = {}
    for key, value in root.state_dict().items():
        if key in normed:
            later[key] = value
            continue
        out[key] = value
        weight_key = key[: -len("bias")] + "weight" if key.endswith("bias") else None
        if weight_key in later:
            _put_weight_norm(out, weight_key, later.pop(weight_key))
    for key, value in later.items():
        _put_weight_norm(out, key, value)
    return out


def _put_weight_norm(out: dict, weight_key: str, weight: torch.Tensor) -> None:
    prefix = weight_key[: -len("weight")]
    out[prefix + "weight_g"] = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), keepdim=True)
    out[prefix + "weight_v"] = weight.clone()


def checkpoint_key_shapes(root: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of :func:`checkpoint_state_dict`, without computing anything (works on meta)."""
    shapes = {key: tuple(value.shape) for key, value in root.state_dict().items()}
    for name, _ in weight_normed_modules(root):
        prefix = f"{name}." if name else ""
        shape = shapes.pop(prefix + "weight")
        shapes[prefix + "weight_g"] = (shape[0],) + (1,) * (len(shape) - 1)
        shapes[prefix + "weight_v"] = shape
    return shapes
