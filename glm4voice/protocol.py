"""The GLM-4-Voice chat protocol: special token ids, prompts, and the output demultiplexer.

Prompt (the original's; docs/ORIGINAL.md)::

    [gMASK]<sop><|system|>\\n{system prompt}<|user|>\\n{input}<|assistant|>streaming_transcription\\n

then the generated tokens; the next turn appends ``<|user|>...`` to the previous prompt plus the
previous completion. The assistant answers with text tokens interleaved with audio tokens
(13 text : 26 audio); every id at or above ``<|audio_0|>`` is audio; ``<|user|>`` ends the turn.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from glm4voice.audio import NUM_AUDIO_CODES
from glm4voice.text_tokenizer import IncrementalTextDecoder

logger = logging.getLogger(__name__)

AUDIO_SYSTEM_PROMPT = (
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
"""System prompt for speech input, exactly as the original (trailing space included)."""
TEXT_SYSTEM_PROMPT = (
    "User will provide you with a text instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)
"""System prompt for text input, exactly as the original."""
ASSISTANT_MODE = "streaming_transcription"
"""The assistant role metadata the model was trained with."""

TEXT_TOKENS_PER_SEGMENT = 13
AUDIO_TOKENS_PER_SEGMENT = 26

ORIGINAL_BLOCK_SIZES = (25, 50, 100, 150, 200)
"""The original web demo's schedule of audio tokens per decoded block."""
LOW_LATENCY_BLOCK_SIZES = (10, 20, 40, 80, 160)
"""Our default: the decoder works from 10 tokens; blocks grow to keep the vocoder efficient."""


class TokenizerLike(Protocol):
    def token_to_id(self, token: str) -> int: ...
    def encode(self, text: str, *, allow_special: bool = True) -> list[int]: ...
    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the protocol needs, read from a tokenizer (never hard-coded)."""

    gmask: int
    sop: int
    endoftext: int
    system: int
    user: int
    assistant: int
    observation: int
    begin_of_audio: int
    end_of_audio: int
    audio_offset: int
    num_audio_codes: int = NUM_AUDIO_CODES

    @classmethod
    def from_tokenizer(cls, tokenizer: TokenizerLike, num_audio_codes: int = NUM_AUDIO_CODES) -> SpecialTokens:
        ids = tokenizer.token_to_id
        return cls(
            gmask=ids("[gMASK]"),
            sop=ids("<sop>"),
            endoftext=ids("<|endoftext|>"),
            system=ids("<|system|>"),
            user=ids("<|user|>"),
            assistant=ids("<|assistant|>"),
            observation=ids("<|observation|>"),
            begin_of_audio=ids("<|begin_of_audio|>"),
            end_of_audio=ids("<|end_of_audio|>"),
            audio_offset=ids("<|audio_0|>"),
            num_audio_codes=num_audio_codes,
        )

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation (the published generation_config's eos ids)."""
        return frozenset({self.endoftext, self.user, self.observation})

    def is_audio(self, token_id: int) -> bool:
        return token_id >= self.audio_offset

    def audio_id(self, code: int) -> int:
        """Token id of audio code ``code`` (built arithmetically: the published vocabulary lacks
        the string ``<|audio_16383|>``)."""
        if not 0 <= code < self.num_audio_codes:
            raise ValueError(f"audio code {code} outside [0, {self.num_audio_codes})")
        return self.audio_offset + code

    def audio_code(self, token_id: int) -> int:
        return token_id - self.audio_offset


# --- prompts -----------------------------------------------------------------------------------------


class InputMode(str, enum.Enum):
    AUDIO = "audio"
    TEXT = "text"

    @property
    def system_prompt(self) -> str:
        return AUDIO_SYSTEM_PROMPT if self is InputMode.AUDIO else TEXT_SYSTEM_PROMPT


@dataclass(frozen=True)
class TextInput:
    text: str


@dataclass(frozen=True)
class AudioInput:
    codes: tuple[int, ...]


UserInput = TextInput | AudioInput


def render_user_content(user_input: UserInput) -> str:
    """The user turn as the original writes it into the prompt string."""
    if isinstance(user_input, TextInput):
        return user_input.text
    return "<|begin_of_audio|>" + "".join(f"<|audio_{c}|>" for c in user_input.codes) + "<|end_of_audio|>"


def render_prompt_text(history_text: str, user_input: UserInput) -> str:
    """The original web demo's prompt string for one turn (without the ``[gMASK]<sop>`` prefix
    that its tokenizer adds). ``history_text`` is the previous prompt plus completion, or ''."""
    mode = InputMode.AUDIO if isinstance(user_input, AudioInput) else InputMode.TEXT
    inputs = history_text.strip()
    if "<|system|>" not in inputs:
        inputs += "<|system|>\n" + mode.system_prompt
    return inputs + "<|user|>\n" + render_user_content(user_input) + f"<|assistant|>{ASSISTANT_MODE}\n"


@dataclass
class Conversation:
    """Multi-turn history as token ids (one per user session; no strings round-tripped).

    ``prompt_for(input)`` gives the ids to send for the next turn; ``add_reply(ids)`` records the
    assistant's generated ids (the terminating ``<|user|>`` excluded) once the turn is over.
    The system prompt is chosen by the first turn's input mode and kept, as in the original.
    User text is encoded without special tokens, so typed ``<|user|>`` is plain text.
    """

    tokenizer: TokenizerLike
    special: SpecialTokens
    history: list[int] = field(default_factory=list)
    turns: int = 0

    def prompt_for(self, user_input: UserInput) -> list[int]:
        ids = list(self.history)
        encode = self.tokenizer.encode
        if not ids:
            mode = InputMode.AUDIO if isinstance(user_input, AudioInput) else InputMode.TEXT
            ids += [self.special.gmask, self.special.sop, self.special.system]
            ids += encode("\n" + mode.system_prompt, allow_special=False)
        ids.append(self.special.user)
        if isinstance(user_input, TextInput):
            ids += encode("\n" + user_input.text, allow_special=False)
        else:
            if not user_input.codes:
                raise ValueError("an audio turn needs at least one audio token")
            ids += encode("\n", allow_special=False)
            ids.append(self.special.begin_of_audio)
            ids += [self.special.audio_id(c) for c in user_input.codes]
            ids.append(self.special.end_of_audio)
        ids.append(self.special.assistant)
        ids += encode(ASSISTANT_MODE + "\n", allow_special=False)
        return ids

    def add_turn(self, prompt_ids: Sequence[int], reply_ids: Sequence[int]) -> None:
        """Record a finished turn: the prompt that was sent and what the assistant generated."""
        self.history = list(prompt_ids) + [i for i in reply_ids if i not in self.special.stop_ids]
        self.turns += 1

    def clear(self) -> None:
        self.history = []
        self.turns = 0


# --- output demultiplexing ------------------------------------------------------------------------


@dataclass(frozen=True)
class TextDelta:
    """Text tokens and the text they complete (a split UTF-8 character waits for its rest)."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class AudioBlock:
    """Audio codes (0-based, not token ids) ready to be decoded as one block."""

    codes: tuple[int, ...]
    index: int


class EndReason(str, enum.Enum):
    USER = "user"  # the model ended its turn with <|user|>
    EOS = "eos"  # another stop token (<|endoftext|>, <|observation|>)
    STREAM_END = "stream_end"  # the stream stopped without a stop token (length limit, cancel)


@dataclass(frozen=True)
class EndOfTurn:
    reason: EndReason
    text: str
    """The whole assistant text of the turn."""
    reply_ids: tuple[int, ...]
    """Every generated id of the turn except the stop token (for the history)."""


@dataclass(frozen=True)
class StreamError:
    message: str


Event = TextDelta | AudioBlock | EndOfTurn | StreamError


@dataclass(frozen=True)
class BlockSchedule:
    """Audio tokens per decoded block: ``sizes[k]`` for the k-th block, the last size repeating."""

    sizes: tuple[int, ...] = LOW_LATENCY_BLOCK_SIZES

    def __post_init__(self) -> None:
        if not self.sizes or any(int(s) != s or s <= 0 for s in self.sizes):
            raise ValueError(f"block sizes must be positive integers, got {self.sizes}")

    def size(self, block_index: int) -> int:
        return self.sizes[min(block_index, len(self.sizes) - 1)]


class Demuxer:
    """State machine from a stream of generated token ids to typed events.

    ``feed(id)`` returns the events that id completes; ``close()`` ends a stream that stopped
    without a stop token; ``fail(message)`` ends it with an error. Pending audio is always
    flushed before the end (the original dropped it when generation stopped without
    ``<|user|>``). Ids past the audio codebook (padded embedding rows) are dropped with a warning.
    """

    def __init__(self, tokenizer: TokenizerLike, special: SpecialTokens, schedule: BlockSchedule = BlockSchedule()):
        self.special = special
        self.schedule = schedule
        self._text = IncrementalTextDecoder(tokenizer)  # type: ignore[arg-type]
        self._pending_audio: list[int] = []
        self._text_parts: list[str] = []
        self._reply: list[int] = []
        self._blocks = 0
        self.finished = False
        self.dropped_ids = 0

    @property
    def blocks_emitted(self) -> int:
        return self._blocks

    def feed(self, token_id: int) -> list[Event]:
        if self.finished:
            raise RuntimeError("the turn is over; start a new Demuxer")
        special = self.special
        if token_id in special.stop_ids:
            reason = EndReason.USER if token_id == special.user else EndReason.EOS
            return self._finish(reason)
        if special.is_audio(token_id):
            code = special.audio_code(token_id)
            if code >= special.num_audio_codes:
                self.dropped_ids += 1
                logger.warning("dropping token id %d: past the %d audio codes", token_id, special.num_audio_codes)
                return []
            self._reply.append(token_id)
            self._pending_audio.append(code)
            if len(self._pending_audio) >= self.schedule.size(self._blocks):
                return [self._take_block()]
            return []
        self._reply.append(token_id)
        text = self._text.feed([token_id])
        self._text_parts.append(text)
        return [TextDelta((token_id,), text)]

    def feed_many(self, ids: Iterable[int]) -> list[Event]:
        events: list[Event] = []
        for token_id in ids:
            events += self.feed(token_id)
            if self.finished:
                break
        return events

    def close(self) -> list[Event]:
        """The stream ended without a stop token."""
        if self.finished:
            return []
        return self._finish(EndReason.STREAM_END)

    def fail(self, message: str) -> list[Event]:
        """The stream broke: flush what was generated, then report the error."""
        if self.finished:
            return []
        events = self._flush()
        self.finished = True
        return events + [StreamError(message)]

    @property
    def reply_ids(self) -> tuple[int, ...]:
        """The generated ids kept so far, in order (what :class:`EndOfTurn` will carry): stop tokens
        and ids past the audio codebook are left out."""
        return tuple(self._reply)

    @property
    def pending_audio(self) -> int:
        """Audio codes received but not yet handed out in a block."""
        return len(self._pending_audio)

    def flush_audio(self) -> AudioBlock | None:
        """Hand out the pending audio now as the next block (before its scheduled size is reached),
        e.g. when the listener's buffer is running low and the model is about to spend a run of text
        tokens; the schedule then goes on with the next size. None if nothing is pending."""
        if self.finished or not self._pending_audio:
            return None
        return self._take_block()

    def _take_block(self) -> AudioBlock:
        block = AudioBlock(tuple(self._pending_audio), self._blocks)
        self._pending_audio = []
        self._blocks += 1
        return block

    def _flush(self) -> list[Event]:
        events: list[Event] = []
        tail = self._text.flush()
        if tail:
            self._text_parts.append(tail)
            events.append(TextDelta((), tail))
        if self._pending_audio:
            events.append(self._take_block())
        return events

    def _finish(self, reason: EndReason) -> list[Event]:
        events = self._flush()
        self.finished = True
        return events + [EndOfTurn(reason, "".join(self._text_parts), tuple(self._reply))]
