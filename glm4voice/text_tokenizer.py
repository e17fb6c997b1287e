"""GLM-4 text tokenizer on tiktoken, read from a checkpoint folder's own files.

The published ``glm-4-voice-9b`` folder ships ``tokenizer.model`` (one ``base64(token) rank`` pair
per line: the byte-level BPE ranks) and ``tokenizer_config.json`` whose ``added_tokens_decoder``
lists every special token (``<|user|>``, ``<|begin_of_audio|>``, ``<|audio_N|>``, ...) with its id.
The original loads these through remote code (``ChatGLM4Tokenizer``); we read the same two files
and build one :class:`tiktoken.Encoding`, so no ``trust_remote_code`` is needed.
"""

from __future__ import annotations

import base64
import codecs
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import tiktoken

logger = logging.getLogger(__name__)

TOKENIZER_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# The pre-tokenization pattern of GLM-4's tokenizer (a fact of the published tokenizer).
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

GMASK_TOKEN = "[gMASK]"
SOP_TOKEN = "<sop>"


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or malformed."""


def read_mergeable_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (``base64 rank`` per line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as error:
                raise TokenizerFileError(f"{path}:{line_number}: not a 'base64 rank' line") from error
    if not ranks:
        raise TokenizerFileError(f"{path} holds no tokens")
    return ranks


def write_mergeable_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    """Write a tiktoken BPE file in rank order."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def read_added_tokens(path: Path) -> dict[str, int]:
    """Special tokens from ``tokenizer_config.json``'s ``added_tokens_decoder``."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
        decoder = config["added_tokens_decoder"]
        return {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TokenizerFileError(f"{path}: cannot read added_tokens_decoder ({error})") from error


@dataclass
class GLMTokenizer:
    """Byte-level BPE (tiktoken) plus the checkpoint's added special tokens."""

    mergeable_ranks: dict[bytes, int] = field(repr=False)
    special_tokens: dict[str, int] = field(repr=False)

    def __post_init__(self) -> None:
        overlap = set(self.special_tokens.values()) & set(self.mergeable_ranks.values())
        if overlap:
            raise TokenizerFileError(f"special token ids collide with BPE ranks: {sorted(overlap)[:5]}")
        self._encoding = tiktoken.Encoding(
            name="glm4",
            pat_str=GLM4_SPLIT_PATTERN,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self._special_by_id = {token_id: text for text, token_id in self.special_tokens.items()}

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> GLMTokenizer:
        folder = Path(folder)
        for name in (TOKENIZER_MODEL_FILE, TOKENIZER_CONFIG_FILE):
            if not (folder / name).is_file():
                raise TokenizerFileError(f"{folder} has no {name}")
        return cls(
            read_mergeable_ranks(folder / TOKENIZER_MODEL_FILE), read_added_tokens(folder / TOKENIZER_CONFIG_FILE)
        )

    # --- vocabulary ---------------------------------------------------------------------------------
    @cached_property
    def vocab_size(self) -> int:
        """One past the largest id the tokenizer knows (BPE ranks and special tokens)."""
        return max(max(self.mergeable_ranks.values()), max(self.special_tokens.values(), default=0)) + 1

    def token_to_id(self, token: str) -> int:
        """Id of a special token by its text, e.g. ``"<|user|>"``; KeyError if unknown."""
        return self.special_tokens[token]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    # --- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Tokens of ``text``. With ``allow_special`` (the original's behaviour for prompt
        strings) special-token texts such as ``<|audio_5|>`` become their ids; without it they
        are tokenized as plain text (use that for text typed by a user)."""
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def encode_prompt(self, text: str) -> list[int]:
        """What the original's ``tokenizer([prompt])`` returns: ``[gMASK]<sop>`` + tokens."""
        return self.prefix_ids + self.encode(text, allow_special=True)

    @cached_property
    def prefix_ids(self) -> list[int]:
        return [self.token_to_id(GMASK_TOKEN), self.token_to_id(SOP_TOKEN)]

    # --- decoding -----------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one id; special tokens give their text; ids the tokenizer does not know
        (padded embedding rows such as the published ``<|audio_16383|>``) give ``b""``."""
        special = self._special_by_id.get(token_id)
        if special is not None:
            return special.encode("utf-8")
        try:
            return self._encoding.decode_single_token_bytes(token_id)
        except KeyError:
            return b""

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> IncrementalTextDecoder:
        return IncrementalTextDecoder(self)


class IncrementalTextDecoder:
    """Turns token ids into text pieces as they arrive; a UTF-8 character split across tokens
    is held back until it is complete."""

    def __init__(self, tokenizer: GLMTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Sequence[int]) -> str:
        return self._utf8.decode(b"".join(self._tokenizer.token_bytes(i) for i in ids))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
