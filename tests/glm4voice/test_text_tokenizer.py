import json

import pytest
import regex

from glm4voice.text_tokenizer import (
    GLM4_SPLIT_PATTERN,
    GLMTokenizer,
    TokenizerFileError,
    read_mergeable_ranks,
    write_mergeable_ranks,
)

SAMPLES = [
    "Hello! How are you today?",
    "你好，今天过得怎么样？请用粤语说一遍。",
    "Mixed 中文 and English, numbers 12345 and 3.14159...",
    "  leading spaces\n\nnew lines\r\n\ttabs   trailing  ",
    "emoji 🐈‍⬛ and accents: café, naïve, Ångström",
    "<|user|>\nHi<|assistant|>streaming_transcription\n<|begin_of_audio|><|audio_12|><|audio_0|><|end_of_audio|>",
    "<|audio_16382|><|audio_1|>text between<|audio_2|>",
]


def reference_encode(tokenizer: GLMTokenizer, text: str) -> list[int]:
    """Written from the algorithm of the original (HF added-token split, then GLM-4's regex
    pre-split and byte-level BPE by lowest merge rank), independent of tiktoken."""
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    split = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
    ids: list[int] = []
    for piece in split.split(text):
        if not piece:
            continue
        if piece in tokenizer.special_tokens:
            ids.append(tokenizer.special_tokens[piece])
            continue
        for word in regex.findall(GLM4_SPLIT_PATTERN, piece):
            parts = [bytes([b]) for b in word.encode("utf-8")]
            while len(parts) > 1:
                ranked = [(tokenizer.mergeable_ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                ranked = [(rank, i) for rank, i in ranked if rank is not None]
                if not ranked:
                    break
                _, i = min(ranked)
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            ids += [tokenizer.mergeable_ranks[p] for p in parts]
    return ids


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_reference_algorithm_and_round_trips(text_tokenizer, text):
    ids = text_tokenizer.encode(text)
    assert ids == reference_encode(text_tokenizer, text)
    assert text_tokenizer.decode(ids) == text


def test_bpe_merges_multibyte_text(text_tokenizer):
    # the tiny BPE was trained on this kind of text: fewer tokens than bytes
    text = "你好，今天天气很好"
    assert len(text_tokenizer.encode(text)) < len(text.encode())


def test_special_tokens_and_plain_mode(text_tokenizer, special_tokens):
    assert text_tokenizer.encode("<|user|>") == [special_tokens.user]
    plain = text_tokenizer.encode("<|user|>", allow_special=False)
    assert special_tokens.user not in plain and text_tokenizer.decode(plain) == "<|user|>"
    assert text_tokenizer.encode("<|audio_7|>") == [special_tokens.audio_offset + 7]


def test_prompt_prefix(text_tokenizer, special_tokens):
    assert text_tokenizer.encode_prompt("hi")[:2] == [special_tokens.gmask, special_tokens.sop]
    assert text_tokenizer.decode(text_tokenizer.encode_prompt("hi")) == "[gMASK]<sop>hi"


def test_unknown_ids_decode_to_nothing(text_tokenizer, special_tokens):
    missing = special_tokens.audio_offset + 16383  # published vocab has no string for it
    assert text_tokenizer.token_bytes(missing) == b""
    assert text_tokenizer.decode([missing, *text_tokenizer.encode("ok")]) == "ok"
    assert text_tokenizer.vocab_size == special_tokens.audio_offset + 16383


def test_incremental_decoder_holds_split_characters(text_tokenizer):
    decoder = text_tokenizer.incremental_decoder()
    pieces = [decoder.feed([text_tokenizer.mergeable_ranks[bytes([b])]]) for b in "é猫".encode()]
    assert "".join(pieces) == "é猫" and pieces[0] == "" and pieces[1] == "é"
    assert decoder.feed([text_tokenizer.mergeable_ranks[b"\xe7"]]) == ""
    assert decoder.flush() == "\ufffd"  # an unfinished character at the end is replaced, not lost silently


def test_rank_file_round_trip(tmp_path):
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, "猫".encode(): 257}
    write_mergeable_ranks(tmp_path / "t.model", ranks)
    assert read_mergeable_ranks(tmp_path / "t.model") == ranks


def test_bad_files_are_reported(tmp_path, tiny_checkpoints):
    with pytest.raises(TokenizerFileError, match="tokenizer.model"):
        GLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_text("not base64 at all!\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    with pytest.raises(TokenizerFileError, match="base64"):
        GLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((tiny_checkpoints.llm / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{broken json")
    with pytest.raises(TokenizerFileError, match="added_tokens_decoder"):
        GLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"5": {"content": "<|clash|>"}}})
    )
    with pytest.raises(TokenizerFileError, match="collide"):
        GLMTokenizer.from_pretrained(tmp_path)
