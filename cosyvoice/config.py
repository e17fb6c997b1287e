"""Load the published ``glm-4-voice-decoder/config.yaml`` (hyperpyyaml) as it is on disk.

The file builds the decoder by import path (``!new:cosyvoice.flow.flow.MaskedDiffWithXvec``, ...); our
classes live at those paths. Three of its nodes are not built, on purpose:

- top-level ``!apply:`` nodes (``random.seed``, ``numpy.random.seed``, ``torch.manual_seed``,
  ``torch.cuda.manual_seed_all`` with 1986): loading a config must not reseed the process's RNGs;
- the top-level ``llm`` node (a CosyVoice text-to-token ``TransformerLM`` with two encoders, ~hundreds
  of MB when built): GLM-4-Voice never uses it and ships no weights for it;
- ``!new:omegaconf.DictConfig`` (the flow-matching solver settings) is built as the plain
  :class:`DictConfig` mapping below, so omegaconf is not needed.

Everything else (``!ref`` references, the flow and hift sections) goes through hyperpyyaml unchanged.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ruamel.yaml
import yaml
from hyperpyyaml import load_hyperpyyaml
from ruamel.yaml.comments import CommentedMap

logger = logging.getLogger(__name__)

UNUSED_TOP_LEVEL = ("llm",)
OMEGACONF_TAG = "!new:omegaconf.DictConfig"
OUR_DICTCONFIG_TAG = "!new:cosyvoice.config.DictConfig"
REQUIRED_SECTIONS = ("flow", "hift")


class _Loader(yaml.SafeLoader):
    """The loader hyperpyyaml registers its ``!new:`` constructors on: PyYAML's, in a private class (hyperpyyaml's
    default, ruamel's legacy ``Loader``, breaks with ruamel.yaml 0.19, and registering on a shared loader
    class would leak the constructors into every other YAML load of the process)."""


class DecoderConfigError(ValueError):
    """config.yaml is missing, unreadable, or lacks the flow/hift sections."""


class DictConfig(Mapping):
    """Read-only mapping with attribute access, standing in for ``omegaconf.DictConfig(content=...)``."""

    def __init__(self, content: Mapping[str, Any] | None = None):
        self._content = dict(content or {})

    def __getitem__(self, key: str) -> Any:
        return self._content[key]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_content"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._content)

    def __len__(self) -> int:
        return len(self._content)

    def __repr__(self) -> str:
        return f"DictConfig({self._content!r})"


def _tag_of(node: Any) -> str | None:
    tag = getattr(node, "tag", None)
    value = getattr(tag, "value", tag)
    return value if isinstance(value, str) else None


def _retag(node: Any) -> None:
    if isinstance(node, CommentedMap):
        if _tag_of(node) == OMEGACONF_TAG:
            node.yaml_set_ctag(ruamel.yaml.comments.Tag(suffix=OUR_DICTCONFIG_TAG))
        for value in node.values():
            _retag(value)
    elif isinstance(node, list):
        for value in node:
            _retag(value)


def prepare_decoder_yaml(text: str) -> str:
    """The YAML text with the unused/side-effect nodes dropped and omegaconf replaced (see module doc)."""
    yaml = ruamel.yaml.YAML()
    tree = yaml.load(text)
    if not isinstance(tree, CommentedMap):
        raise DecoderConfigError("config.yaml does not hold a mapping at the top level")
    for key in list(tree.keys()):
        tag = _tag_of(tree[key])
        if key in UNUSED_TOP_LEVEL or (tag or "").startswith("!apply:"):
            logger.debug("config.yaml: not building top-level node %r (%s)", key, tag or "unused")
            del tree[key]
    _retag(tree)
    out = io.StringIO()
    yaml.dump(tree, out)
    return out.getvalue()


def load_decoder_config(path: str | Path) -> dict[str, Any]:
    """Build the objects of a decoder ``config.yaml``: a dict with ``flow`` (MaskedDiffWithXvec),
    ``hift`` (HiFTGenerator) and the plain values. Modules are built on the current default device
    (wrap the call in ``torch.device("meta")`` to build without memory)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DecoderConfigError(f"cannot read the decoder config {path}: {error}") from error
    try:
        config = load_hyperpyyaml(prepare_decoder_yaml(text), loader=_Loader)
    except DecoderConfigError:
        raise
    except (ruamel.yaml.YAMLError, yaml.YAMLError, ImportError, AttributeError) as error:
        raise DecoderConfigError(f"{path} is not a loadable decoder config.yaml: {error}") from error
    missing = [name for name in REQUIRED_SECTIONS if name not in config]
    if missing:
        raise DecoderConfigError(f"{path} has no {', '.join(missing)} section")
    return config
