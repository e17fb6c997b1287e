import pytest

from glm4voice.protocol import (
    AUDIO_SYSTEM_PROMPT,
    TEXT_SYSTEM_PROMPT,
    AudioBlock,
    AudioInput,
    BlockSchedule,
    Conversation,
    Demuxer,
    EndOfTurn,
    EndReason,
    StreamError,
    TextDelta,
    TextInput,
    render_prompt_text,
)


def test_special_tokens_follow_published_layout(text_tokenizer, special_tokens, tiny_checkpoints):
    base = tiny_checkpoints.vocab.num_bpe  # 151329 in the published tokenizer
    s = special_tokens
    assert (s.endoftext, s.gmask, s.sop, s.system, s.user, s.assistant, s.observation) == (
        base, base + 2, base + 4, base + 6, base + 7, base + 8, base + 9,
    )  # fmt: skip
    assert (s.begin_of_audio, s.end_of_audio) == (base + 14, base + 15)
    assert s.audio_offset == base + 1024
    assert s.stop_ids == {s.endoftext, s.user, s.observation}
    assert s.audio_id(16383) == s.audio_offset + 16383  # built arithmetically: no string for it
    with pytest.raises(KeyError):
        text_tokenizer.token_to_id("<|audio_16383|>")
    with pytest.raises(ValueError):
        s.audio_id(16384)
    with pytest.raises(ValueError):
        s.audio_id(-1)


def test_system_prompts_are_the_originals():
    assert AUDIO_SYSTEM_PROMPT.endswith("26 audio tokens. ")
    assert TEXT_SYSTEM_PROMPT.endswith("26 audio tokens.")
    assert AUDIO_SYSTEM_PROMPT.startswith("User will provide you with a speech instruction.")
    assert TEXT_SYSTEM_PROMPT.startswith("User will provide you with a text instruction.")


def test_render_prompt_text_first_and_second_turn():
    first = render_prompt_text("", TextInput("Hi"))
    assert first == f"<|system|>\n{TEXT_SYSTEM_PROMPT}<|user|>\nHi<|assistant|>streaming_transcription\n"
    history = first + "Hello<|audio_1|><|audio_2|>\n"
    second = render_prompt_text(history, AudioInput((7, 8)))
    # history is stripped, the system prompt is not repeated, the audio turn is wrapped
    assert second == (
        history.strip() + "<|user|>\n<|begin_of_audio|><|audio_7|><|audio_8|><|end_of_audio|>"
        "<|assistant|>streaming_transcription\n"
    )
    assert second.count("<|system|>") == 1


def test_conversation_ids_equal_tokenized_original_strings(text_tokenizer, special_tokens):
    conversation = Conversation(text_tokenizer, special_tokens)
    turn1 = AudioInput((0, 5, 16382))
    prompt1 = conversation.prompt_for(turn1)
    assert prompt1 == text_tokenizer.encode_prompt(render_prompt_text("", turn1))
    assert prompt1[:3] == [special_tokens.gmask, special_tokens.sop, special_tokens.system]
    assert text_tokenizer.decode(prompt1).startswith("[gMASK]<sop><|system|>\n" + AUDIO_SYSTEM_PROMPT)

    reply = text_tokenizer.encode("Sure.", allow_special=False) + [special_tokens.audio_id(3), special_tokens.user]
    conversation.add_turn(prompt1, reply)
    assert conversation.history[-1] == special_tokens.audio_id(3)  # <|user|> is not kept

    turn2 = TextInput("Again, faster.")
    prompt2 = conversation.prompt_for(turn2)
    history_text = render_prompt_text("", turn1) + "Sure.<|audio_3|>"
    assert prompt2 == text_tokenizer.encode_prompt(render_prompt_text(history_text, turn2))
    assert prompt2.count(special_tokens.system) == 1
    assert conversation.turns == 1
    conversation.clear()
    assert conversation.history == [] and conversation.turns == 0


def test_code_16383_survives_in_ids(text_tokenizer, special_tokens):
    prompt = Conversation(text_tokenizer, special_tokens).prompt_for(AudioInput((16383,)))
    assert special_tokens.audio_offset + 16383 in prompt


def test_typed_special_tokens_stay_text(text_tokenizer, special_tokens):
    prompt = Conversation(text_tokenizer, special_tokens).prompt_for(TextInput("<|user|> hi"))
    assert prompt.count(special_tokens.user) == 1  # only the real turn marker


def test_empty_audio_turn_is_rejected(text_tokenizer, special_tokens):
    with pytest.raises(ValueError):
        Conversation(text_tokenizer, special_tokens).prompt_for(AudioInput(()))


# --- demultiplexer ------------------------------------------------------------------------------------


def text_ids(tokenizer, text):
    return tokenizer.encode(text, allow_special=False)


def audio_ids(special, codes):
    return [special.audio_id(c) for c in codes]


def run(demuxer, ids, close=False):
    events = demuxer.feed_many(ids)
    if close:
        events += demuxer.close()
    return events


def blocks(events):
    return [e.codes for e in events if isinstance(e, AudioBlock)]


def test_interleaved_stream_with_block_schedule(text_tokenizer, special_tokens):
    words = "Once upon a time there was a curious little cat who loved music, 雨 and 猫, and the quiet rain at night."
    text = text_ids(text_tokenizer, words)
    assert len(text) >= 26
    codes = list(range(100, 160))
    ids = text[:13] + audio_ids(special_tokens, codes[:26]) + text[13:] + audio_ids(special_tokens, codes[26:])
    demuxer = Demuxer(text_tokenizer, special_tokens, BlockSchedule((10, 20)))
    events = run(demuxer, ids + [special_tokens.user])
    assert blocks(events) == [tuple(codes[0:10]), tuple(codes[10:30]), tuple(codes[30:50]), tuple(codes[50:60])]
    assert [e.index for e in events if isinstance(e, AudioBlock)] == [0, 1, 2, 3]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == words
    end = events[-1]
    assert isinstance(end, EndOfTurn) and end.reason is EndReason.USER and end.text == words
    assert list(end.reply_ids) == ids
    # a block is emitted as soon as it is full, not one token later
    first_block_at = next(i for i, e in enumerate(demuxer_events_per_token(text_tokenizer, special_tokens, ids)) if e)
    assert first_block_at == 13 + 10 - 1


def demuxer_events_per_token(tokenizer, special, ids):
    demuxer = Demuxer(tokenizer, special, BlockSchedule((10, 20)))
    return [[e for e in demuxer.feed(i) if isinstance(e, AudioBlock)] for i in ids]


def test_stream_ending_without_user_flushes_audio(text_tokenizer, special_tokens):
    demuxer = Demuxer(text_tokenizer, special_tokens, BlockSchedule((25,)))
    ids = text_ids(text_tokenizer, "Hello") + audio_ids(special_tokens, range(30))
    events = run(demuxer, ids, close=True)
    assert blocks(events) == [tuple(range(25)), tuple(range(25, 30))]
    assert isinstance(events[-1], EndOfTurn) and events[-1].reason is EndReason.STREAM_END
    assert demuxer.close() == []  # closing twice is harmless


def test_all_text_stream(text_tokenizer, special_tokens):
    demuxer = Demuxer(text_tokenizer, special_tokens)
    events = run(demuxer, text_ids(text_tokenizer, "Only words here.") + [special_tokens.endoftext])
    assert blocks(events) == []
    assert events[-1] == EndOfTurn(
        EndReason.EOS, "Only words here.", tuple(text_ids(text_tokenizer, "Only words here."))
    )


def test_all_audio_stream(text_tokenizer, special_tokens):
    demuxer = Demuxer(text_tokenizer, special_tokens, BlockSchedule((25, 50, 100)))
    events = run(demuxer, audio_ids(special_tokens, range(200)) + [special_tokens.user])
    assert [len(b) for b in blocks(events)] == [25, 50, 100, 25]
    assert not any(isinstance(e, TextDelta) for e in events)
    assert events[-1].text == ""


def test_original_schedule_keeps_last_size(text_tokenizer, special_tokens):
    schedule = BlockSchedule((25, 50, 100, 150, 200))
    assert [schedule.size(k) for k in range(7)] == [25, 50, 100, 150, 200, 200, 200]
    for bad in [(), (0,), (10, -1), (2.5,)]:
        with pytest.raises(ValueError):
            BlockSchedule(bad)


def test_utf8_split_across_tokens(text_tokenizer, special_tokens):
    # byte-level tokens: "猫" is three bytes; feed them as three single-byte tokens
    single_bytes = [text_tokenizer.mergeable_ranks[bytes([b])] for b in "猫".encode()]
    demuxer = Demuxer(text_tokenizer, special_tokens)
    events = run(demuxer, single_bytes + [special_tokens.user])
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == ["", "", "猫"]
    assert events[-1].text == "猫"


def test_padded_vocab_rows_are_dropped(text_tokenizer, special_tokens):
    demuxer = Demuxer(text_tokenizer, special_tokens, BlockSchedule((2,)))
    beyond = special_tokens.audio_offset + special_tokens.num_audio_codes + 3
    events = run(demuxer, [special_tokens.audio_id(1), beyond, special_tokens.audio_id(2)], close=True)
    assert blocks(events) == [(1, 2)]
    assert demuxer.dropped_ids == 1


def test_failure_flushes_then_reports(text_tokenizer, special_tokens):
    demuxer = Demuxer(text_tokenizer, special_tokens, BlockSchedule((10,)))
    run(demuxer, audio_ids(special_tokens, range(4)))
    events = demuxer.fail("server error")
    assert blocks(events) == [(0, 1, 2, 3)]
    assert events[-1] == StreamError("server error")
    with pytest.raises(RuntimeError):
        demuxer.feed(special_tokens.audio_id(0))


def test_tokens_after_the_end_are_ignored_by_feed_many(text_tokenizer, special_tokens):
    demuxer = Demuxer(text_tokenizer, special_tokens)
    events = run(demuxer, [special_tokens.user] + text_ids(text_tokenizer, "late"))
    assert len(events) == 1 and isinstance(events[0], EndOfTurn)
