"""Resolve a checkpoint argument (local folder or Hugging Face hub id) to a local folder."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

PUBLISHED_LLM = "THUDM/glm-4-voice-9b"
PUBLISHED_SPEECH_TOKENIZER = "THUDM/glm-4-voice-tokenizer"
PUBLISHED_DECODER = "THUDM/glm-4-voice-decoder"


class CheckpointNotFoundError(FileNotFoundError):
    """Neither a local folder nor a hub repository that could be fetched."""


def resolve_checkpoint(path_or_id: str | Path, allow_patterns: Sequence[str] | None = None) -> Path:
    """Return a local folder for ``path_or_id``.

    An existing local folder is used as is. Otherwise a string of the form ``owner/name`` is
    fetched (or found in the cache) with ``huggingface_hub.snapshot_download``; set
    ``HF_HUB_OFFLINE=1`` to use only the local cache.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; a checkpoint is a folder")
    text = str(path_or_id)
    if not HUB_ID_PATTERN.match(text):
        raise CheckpointNotFoundError(f"no checkpoint folder at {text!r} (and it is not a hub id like owner/name)")
    from huggingface_hub import snapshot_download

    logger.info("resolving %s on the Hugging Face hub", text)
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=list(allow_patterns) if allow_patterns else None))
    except Exception as error:  # network, auth, missing repo: all mean 'cannot get it'
        raise CheckpointNotFoundError(
            f"could not get {text!r}: not a local folder, and the hub download failed ({error})"
        ) from error
