"""Tiny text tokenizer in the published ``glm-4-voice-9b`` format.

Writes ``tokenizer.model`` (tiktoken BPE ranks, trained here on a small built-in bilingual text)
and ``tokenizer_config.json`` whose ``added_tokens_decoder`` has the published special-token
layout: the GLM-4 special tokens right after the BPE ranks, the voice tokens, reserved slots up to
1024 specials, then ``<|audio_0|>`` ... ``<|audio_{N-2}|>`` (the published vocabulary lacks the
last code's string, ``<|audio_16383|>``; we reproduce that gap).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import regex

from glm4voice.audio import NUM_AUDIO_CODES
from glm4voice.text_tokenizer import (
    GLM4_SPLIT_PATTERN,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_MODEL_FILE,
    write_mergeable_ranks,
)

# Special tokens in id order from the first id after the BPE ranks (151329 in the published file).
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>", "<|end_of_transcription|>",
)  # fmt: skip
SPECIAL_SLOTS = 1024
"""Special-token slots before ``<|audio_0|>`` (published: 151329 + 1024 = 152353)."""
PUBLISHED_BPE_SIZE = 151_329
PUBLISHED_PADDED_VOCAB = 168_960
VOCAB_PADDING_MULTIPLE = 1024  # 151329 + 1024 + 16384 = 168737 -> 168960 as published

TINY_BPE_MERGES = 600

# A few lines of English and Mandarin so the tiny BPE has realistic multi-byte merges.
TRAINING_TEXT = """
Hello! How are you today? I am fine, thank you. Please speak a little faster, and then slower.
The weather is nice; let us take a walk in the park. Could you tell me a story about a cat?
Sure, here is a short story. Once upon a time there was a curious little cat who loved music.
What time is it? It is three o'clock in the afternoon. Numbers: 1, 2, 3, 10, 100, 2024, 3.14.
你好！今天过得怎么样？我很好，谢谢你。请说得快一点，然后再慢一点。
今天天气很好，我们去公园散步吧。你能给我讲一个关于猫的故事吗？
当然可以，这是一个小故事。从前有一只好奇的小猫，它非常喜欢音乐。
现在几点了？现在是下午三点。请用粤语说一遍，再用四川话说一遍。
"""


def published_special_layout(first_id: int, num_audio_codes: int = NUM_AUDIO_CODES) -> dict[str, int]:
    """Special-token texts and ids laid out as in the published tokenizer, from ``first_id``."""
    tokens = {text: first_id + k for k, text in enumerate(GLM_SPECIAL_TOKENS)}
    for k in range(len(GLM_SPECIAL_TOKENS), SPECIAL_SLOTS):
        tokens[f"<|reserved_{first_id + k}|>"] = first_id + k
    audio_offset = first_id + SPECIAL_SLOTS
    for code in range(num_audio_codes - 1):  # the last code has no string, as published
        tokens[f"<|audio_{code}|>"] = audio_offset + code
    return tokens


def padded_vocab_size(num_bpe: int, num_audio_codes: int = NUM_AUDIO_CODES) -> int:
    """Embedding rows: BPE + special slots + audio codes, rounded up as in the published model."""
    used = num_bpe + SPECIAL_SLOTS + num_audio_codes
    return -(-used // VOCAB_PADDING_MULTIPLE) * VOCAB_PADDING_MULTIPLE


def train_bpe(text: str, num_merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then the most frequent adjacent pairs (ties broken by
    byte order, so the result is deterministic)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(piece.encode("utf-8") for piece in regex.findall(GLM4_SPLIT_PATTERN, text))
    splits = {word: [bytes([b]) for b in word] for word in words}
    for _ in range(num_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            parts = splits[word]
            for pair in zip(parts, parts[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        for word, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[word] = out
    return ranks


@dataclass(frozen=True)
class TinyVocab:
    """What the other tiny models need to know about the tiny tokenizer."""

    num_bpe: int
    audio_offset: int
    num_audio_codes: int
    padded_vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def write_tiny_text_tokenizer(folder: Path, num_audio_codes: int = NUM_AUDIO_CODES) -> TinyVocab:
    folder.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe(TRAINING_TEXT, TINY_BPE_MERGES)
    write_mergeable_ranks(folder / TOKENIZER_MODEL_FILE, ranks)
    specials = published_special_layout(len(ranks), num_audio_codes)
    added = {
        str(token_id): {
            "content": text, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for text, token_id in sorted(specials.items(), key=lambda item: item[1])
    }  # fmt: skip
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": list(GLM_SPECIAL_TOKENS[:14]),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 128000,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return TinyVocab(
        num_bpe=len(ranks),
        audio_offset=specials["<|audio_0|>"],
        num_audio_codes=num_audio_codes,
        padded_vocab_size=padded_vocab_size(len(ranks), num_audio_codes),
        eos_token_ids=(specials["<|endoftext|>"], specials["<|user|>"], specials["<|observation|>"]),
        pad_token_id=specials["<|endoftext|>"],
    )
