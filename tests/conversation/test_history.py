"""Prompts from turns (as the page builds them) and the truncation rule."""

from __future__ import annotations

import pytest

from glm4voice.conversation.history import (
    Turn,
    build_prompt,
    cut_after_audio_tokens,
    heard_audio_tokens,
    heard_reply,
    reply_text,
)
from glm4voice.protocol import AudioInput, Conversation, TextInput


@pytest.mark.parametrize(
    "ms, tokens",
    [(0, 0), (39, 0), (40, 1), (79, 1), (80, 1), (119, 1), (120, 2), (999, 12), (1000, 13), (1040, 13), (8000, 100)],
)
def test_heard_tokens_round_to_the_nearest_token_halves_up(ms, tokens):
    assert heard_audio_tokens(ms) == tokens


def test_heard_tokens_refuse_negative_time():
    with pytest.raises(ValueError):
        heard_audio_tokens(-1)


def test_cut_keeps_ids_up_to_the_nth_audio_token(special_tokens):
    a = [special_tokens.audio_id(c) for c in range(10)]
    reply = [1, 2, 3, a[0], a[1], a[2], 4, 5, a[3], a[4], 6]
    assert cut_after_audio_tokens(reply, 0, special_tokens) == ()
    assert cut_after_audio_tokens(reply, 1, special_tokens) == (1, 2, 3, a[0])
    assert cut_after_audio_tokens(reply, 3, special_tokens) == (1, 2, 3, a[0], a[1], a[2])
    assert cut_after_audio_tokens(reply, 4, special_tokens) == (1, 2, 3, a[0], a[1], a[2], 4, 5, a[3])
    assert cut_after_audio_tokens(reply, 5, special_tokens) == tuple(reply[:-1])  # text after the last speech: unheard
    assert cut_after_audio_tokens(reply, 6, special_tokens) == tuple(reply)  # fewer audio tokens than heard: all kept
    assert heard_reply(reply, 200, special_tokens) == cut_after_audio_tokens(reply, 3, special_tokens)


def test_prompt_of_turns_equals_the_page_conversation(text_tokenizer, special_tokens):
    audio = AudioInput((5, 6, 7))
    replies = [(10, 11, special_tokens.audio_id(3)), (12, special_tokens.audio_id(4), 13)]
    page = Conversation(text_tokenizer, special_tokens)
    for user, reply in ((audio, replies[0]), (TextInput("And then?"), replies[1])):
        page.add_turn(page.prompt_for(user), reply)
    expected = page.prompt_for(TextInput("Thanks"))
    turns = [Turn(audio, replies[0]), Turn(TextInput("And then?"), replies[1])]
    assert build_prompt(text_tokenizer, special_tokens, turns, TextInput("Thanks")) == expected
    # an unanswered turn is a turn with an empty answer
    empty = Conversation(text_tokenizer, special_tokens)
    empty.add_turn(empty.prompt_for(TextInput("Hi")), ())
    assert build_prompt(text_tokenizer, special_tokens, [Turn(TextInput("Hi"))], audio) == empty.prompt_for(audio)


def test_reply_text_leaves_the_audio_out(text_tokenizer, special_tokens):
    ids = text_tokenizer.encode("Hello there", allow_special=False)
    mixed = ids[:1] + [special_tokens.audio_id(9)] + ids[1:]
    assert reply_text(mixed, text_tokenizer, special_tokens) == "Hello there"
