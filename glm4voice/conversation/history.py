"""A conversation's history as token ids, and how an answer is cut to the part that was heard.

The prompt of a turn is built exactly as the web page builds it (:class:`glm4voice.protocol.Conversation`):
the earlier turns replayed in order (each user input, then the ids the assistant generated for it),
then the new user input. So a conversation held by any front end gives the same prompt ids for the
same turns.

Truncation: an answer that was interrupted, or that the listener stopped, keeps its ids up to and
including the N-th audio token, where N is the heard audio in speech tokens (12.5 per second),
rounded to the nearest whole token (a token counts as heard once half of its 80 ms has played)::

    N = floor(audio_end_ms * 12.5 / 1000 + 1/2)

Text tokens before that point are kept (the model writes each run of text before the speech it
speaks); everything after it is dropped, also text that follows the last audio token (it was never
spoken). N = 0 keeps nothing; an answer with fewer than N audio tokens is kept whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from glm4voice.audio import SPEECH_TOKEN_RATE
from glm4voice.protocol import Conversation, SpecialTokens, TokenizerLike, UserInput


class TextDecoder(Protocol):
    def decode(self, ids: Iterable[int]) -> str: ...


@dataclass(frozen=True)
class Turn:
    """One exchange: what the user said or typed, and the assistant's ids (empty: no answer kept)."""

    user: UserInput
    reply_ids: tuple[int, ...] = ()


def build_prompt(
    tokenizer: TokenizerLike, special: SpecialTokens, turns: Sequence[Turn], next_input: UserInput
) -> list[int]:
    """The prompt ids of the turn that answers ``next_input`` after ``turns``."""
    conversation = Conversation(tokenizer, special)
    for turn in turns:
        conversation.add_turn(conversation.prompt_for(turn.user), turn.reply_ids)
    return conversation.prompt_for(next_input)


def heard_audio_tokens(audio_end_ms: int) -> int:
    """Audio tokens covered by ``audio_end_ms`` of played speech (nearest whole token, halves up)."""
    if audio_end_ms < 0:
        raise ValueError(f"audio_end_ms must not be negative (got {audio_end_ms})")
    return math.floor(audio_end_ms * SPEECH_TOKEN_RATE / 1000 + 0.5)


def cut_after_audio_tokens(reply_ids: Sequence[int], audio_tokens: int, special: SpecialTokens) -> tuple[int, ...]:
    """``reply_ids`` up to and including its ``audio_tokens``-th audio token (see the module doc)."""
    if audio_tokens <= 0:
        return ()
    seen = 0
    for index, token_id in enumerate(reply_ids):
        if special.is_audio(token_id):
            seen += 1
            if seen == audio_tokens:
                return tuple(reply_ids[: index + 1])
    return tuple(reply_ids)


def heard_reply(reply_ids: Sequence[int], audio_end_ms: int, special: SpecialTokens) -> tuple[int, ...]:
    """The part of an answer a listener heard after ``audio_end_ms`` of its speech."""
    return cut_after_audio_tokens(reply_ids, heard_audio_tokens(audio_end_ms), special)


def reply_text(reply_ids: Sequence[int], tokenizer: TextDecoder, special: SpecialTokens) -> str:
    """The text of an answer's ids (its audio tokens left out)."""
    return tokenizer.decode([i for i in reply_ids if not special.is_audio(i)])
