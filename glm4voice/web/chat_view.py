"""What the page's chat shows of a conversation: :class:`ChatView` turns a
:class:`glm4voice.conversation.ConversationSession`'s events into the chat's messages, each answer's live
audio stream (:mod:`glm4voice.web.streams`) and its wav file, and the status line of each turn.

One :class:`AnswerView` per answer: its bubble of text (streamed, then final), its audio stream while it
is generated, its wav in the chat once it is done, and how it ended. An answer that was stopped (Stop, or
the user speaking over it) shows the part the history keeps (the text up to the heard speech) marked as
cut, and its wav holds the heard speech only. A failed answer shows the partial text and the error.

Plain data, changed only through :meth:`ChatView.apply` (called with each session event, in order) and
:meth:`ChatView.clear`; whoever shows the page reads :meth:`ChatView.messages` and the answers' status, and
may compare the counters ``structure`` (messages added or replaced: show at once) and ``text`` (streamed text
grew: show now and then) to know what changed.

Audio files (each answer's wav, its heard part when it is cut, a question spoken in conversation mode) are
encoded and written off the event loop (the live sockets of every tab share it); their players appear in
the chat once written, and the view's ``changed`` callback says so. An answer is :attr:`AnswerView.done`
once it has ended and its files are written; :meth:`ChatView.settled` waits for every write started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from glm4voice.audio import SPEECH_TOKEN_RATE
from glm4voice.conversation import (
    AssistantItem,
    ItemAdded,
    ItemTruncated,
    Response,
    ResponseAudioDelta,
    ResponseCreated,
    ResponseDone,
    ResponseStatus,
    ResponseTextDelta,
    SessionEvent,
    SessionFailure,
    UserItem,
)
from glm4voice.conversation.items import CancelReason
from glm4voice.protocol import AudioInput
from glm4voice.web.files import DemoFiles
from glm4voice.web.streams import AudioStreams, TurnAudioStream

logger = logging.getLogger(__name__)

CUT_MARK = "✂️"
"""Marks an answer that was stopped before its end (the chat and the status line)."""
NO_TEXT = "(no text in this answer)"
PLACEHOLDER = "…"
SPOKEN = "🎙️ …"
"""A spoken question's bubble until its recording is written."""


def failure_markdown(turn_number: int, message: str) -> str:
    return f"⚠️ **Turn {turn_number} failed:** {message}"


def speech_note(user_input: Any) -> str:
    """What the status says of a spoken question: its length, from its speech tokens (12.5 per second)."""
    if not isinstance(user_input, AudioInput):
        return ""
    codes = len(user_input.codes)
    return f"heard {codes / SPEECH_TOKEN_RATE:.1f} s of speech ({codes} speech tokens) · "


@dataclass(eq=False)
class Bubble:
    """One chat message."""

    role: str
    content: Any
    """Text (Markdown), or ``{"path", "mime_type"}`` of an audio file."""

    def message(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content}


@dataclass(eq=False)
class AnswerView:
    """One answer as the page shows it."""

    number: int
    """The turn's number in this tab (1, 2, ...)."""
    response: Response
    stream: TurnAudioStream
    bubble: Bubble
    question: UserItem | None
    """The user input it answers."""
    began: float
    """``time.perf_counter()`` when the turn began (Submit pressed, or the end of speech detected)."""
    text: str = ""
    """The text streamed so far."""
    audio_bubble: Bubble | None = None
    audio_path: Path | None = None
    chunks: list[np.ndarray] = field(default_factory=list, repr=False)
    """The decoded speech until the answer is done."""
    samples: np.ndarray | None = field(default=None, repr=False)
    """The whole decoded speech once it is done, while it is the latest answer (a cut is written from it)."""
    first_audio_s: float | None = None
    ended: bool = False
    """Its ResponseDone was applied (the response's own status is final a moment earlier)."""
    writing: asyncio.Task | None = field(default=None, repr=False)
    """The last file write of this answer (or of its question) that was started; writes run in order."""

    @property
    def turn(self) -> str:
        """The id the page's player knows the answer by (its audio stream's)."""
        return self.stream.id

    @property
    def item(self) -> AssistantItem:
        return self.response.item

    @property
    def done(self) -> bool:
        """The answer has ended and the chat shows how (its final text, its wav written)."""
        return self.ended and (self.writing is None or self.writing.done())

    @property
    def cut(self) -> bool:
        return self.response.status is ResponseStatus.CANCELLED or self.item.truncated_ms is not None

    def status(self) -> str:
        """The status line of this turn (Markdown)."""
        response, item = self.response, self.item
        note = speech_note(self.question.input) if self.question is not None else ""
        prompt = f"prompt {response.prompt_tokens} tokens" if response.prompt_tokens else "prompt …"
        head = f"Turn {self.number} · "
        if not self.done:
            return head + f"{note}{prompt} · generating…"
        if response.status is ResponseStatus.FAILED:
            return failure_markdown(self.number, response.error.message if response.error else "the answer failed")
        if self.cut:
            how = "interrupted" if response.cancel_reason is CancelReason.TURN_DETECTED else "stopped"
            return head + (
                f"{how} {CUT_MARK} · {note}the conversation keeps the {item.audio_ms / 1000:.1f} s of speech that "
                f"played and its text · {prompt}"
            )
        text_tokens = response.output_tokens - response.output_audio_tokens
        first = f", first audio after {self.first_audio_s:.2f} s" if self.first_audio_s is not None else ""
        return head + (
            f"done · {note}answer: {item.audio_ms / 1000:.1f} s of speech, {text_tokens} text tokens{first} · {prompt}"
        )


class ChatView:
    """The chat of one tab (see the module doc). ``streams`` and ``files`` are the app's."""

    def __init__(self, streams: AudioStreams, files: DemoFiles, changed: Callable[[], None] = lambda: None):
        self.streams = streams
        self.files = files
        self.changed = changed
        """Called when a file write finished and the chat changed (outside :meth:`apply`)."""
        self.owner: str | None = None
        """The browser session whose tab this is (its audio streams are capped together)."""
        self.bubbles: list[Bubble] = []
        self.answers: list[AnswerView] = []
        """The answers of the conversation shown, oldest first."""
        self.paths: list[Path] = []
        """Files this tab wrote (removed on Clear and when the tab goes)."""
        self.turns = 0
        self.failure: str | None = None
        """The last failure reported outside an answer (e.g. a spoken question the tokenizer refused)."""
        self.structure = 0
        """Bumped when messages are added or replaced, not when streamed text grows."""
        self.text = 0
        """Bumped when streamed text grows."""
        self._shown_as: dict[str, tuple[Any, float]] = {}
        self._question: UserItem | None = None
        self._question_written: asyncio.Task | None = None
        self._began: float | None = None
        self._writes: set[asyncio.Task] = set()
        self._clears = 0

    # --- what the page reads ----------------------------------------------------------------------------

    def messages(self) -> list[dict[str, Any]]:
        return [bubble.message() for bubble in self.bubbles]

    @property
    def latest(self) -> AnswerView | None:
        return self.answers[-1] if self.answers else None

    def answer(self, turn: str | None) -> AnswerView | None:
        """The answer the player knows as ``turn``."""
        return next((a for a in self.answers if a.turn == turn), None)

    def answer_for(self, response: Response) -> AnswerView | None:
        return next((a for a in reversed(self.answers) if a.response is response), None)

    async def settled(self) -> None:
        """Until every file write started so far has finished (and shows in the chat)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    # --- what the page tells it -------------------------------------------------------------------------

    def refused(self) -> int:
        """A question refused before it reached the conversation (empty, no speech, busy...) still uses up a
        turn number, so that each attempt's status names a turn of its own. Returns that number."""
        self.turns += 1
        return self.turns

    def show_user(self, item_id: str, content: Any, began: float) -> None:
        """How the user item ``item_id`` appears when it is added (the typed text, the recording's path),
        and when its turn began (``time.perf_counter()`` when Submit was pressed). Items the page does not
        announce (conversation mode) show their text or their audio, and their turn begins when added."""
        self._shown_as[item_id] = (content, began)

    def clear(self) -> None:
        for answer in self.answers:
            self.streams.discard(answer.stream.id)
        self.files.remove(self.paths)
        self.bubbles, self.answers = [], []
        self._shown_as, self._question, self._question_written, self._began = {}, None, None, None
        self.failure = None
        self._clears += 1
        self.structure += 1

    # --- session events ---------------------------------------------------------------------------------

    def apply(self, event: SessionEvent) -> None:
        if isinstance(event, ItemAdded) and isinstance(event.item, UserItem):
            self._user_added(event.item)
        elif isinstance(event, ResponseCreated):
            self._answer_started(event.response)
        elif isinstance(event, ResponseTextDelta):
            answer = self.answer_for(event.response)
            if answer is not None:
                answer.text += event.text
                answer.bubble.content = answer.text
                self.text += 1
        elif isinstance(event, ResponseAudioDelta):
            answer = self.answer_for(event.response)
            if answer is not None and not answer.stream.closed:
                if answer.first_audio_s is None:
                    answer.first_audio_s = time.perf_counter() - answer.began
                answer.stream.push(event.samples)
                answer.chunks.append(event.samples)
        elif isinstance(event, ResponseDone):
            answer = self.answer_for(event.response)
            if answer is not None:
                self._answer_done(answer)
        elif isinstance(event, ItemTruncated):
            answer = next((a for a in self.answers if a.item is event.item), None)
            if answer is not None:
                self._answer_cut(answer)
        elif isinstance(event, SessionFailure):
            self.failure = event.error.message
            self.structure += 1

    def _user_added(self, item: UserItem) -> None:
        content, self._began = self._shown_as.pop(item.id, (None, time.perf_counter()))
        if content is None and item.text is not None:
            content = item.text
        bubble = Bubble("user", content if content is not None else SPOKEN)
        self.bubbles.append(bubble)
        self._question, self._question_written = item, None
        if content is None and item.audio is not None:  # a spoken turn of conversation mode: its recording
            audio = item.audio
            self._question_written = self._write(
                None,
                f"question-{item.id}",
                audio.samples,
                audio.sample_rate,
                lambda path: self._show_question(bubble, path),
            )
        self.structure += 1

    def _show_question(self, bubble: Bubble, path: Path | None) -> None:
        if path is not None:
            bubble.content = {"path": str(path), "mime_type": "audio/wav"}

    def _answer_started(self, response: Response) -> None:
        previous = self.latest
        if previous is not None:  # the player moves on to the new answer: the old stream goes
            self.streams.discard(previous.stream.id)
            previous.samples = None
        self.turns += 1
        began, self._began = self._began or time.perf_counter(), None
        bubble = Bubble("assistant", PLACEHOLDER)
        answer = AnswerView(self.turns, response, self.streams.open(self.owner), bubble, self._question, began)
        answer.writing, self._question_written = self._question_written, None  # done once its question shows
        self.answers.append(answer)
        self.bubbles.append(bubble)
        self.structure += 1

    def _answer_done(self, answer: AnswerView) -> None:
        answer.ended = True
        answer.stream.close()
        response = answer.response
        if response.status is ResponseStatus.FAILED:
            message = response.error.message if response.error else "the answer failed"
            partial = answer.text
            answer.bubble.content = (partial + "\n\n" if partial else "") + f"⚠️ {message}"
            answer.chunks = []
        else:
            samples = np.concatenate(answer.chunks) if answer.chunks else np.zeros(0, np.float32)
            answer.chunks = []
            answer.samples = samples
            self._show_audio(answer, samples)
            self._show_text(answer)
        self.structure += 1

    def _answer_cut(self, answer: AnswerView) -> None:
        """The answer was cut to what the listener heard (after its ResponseDone)."""
        self._show_audio(answer, answer.samples, suffix="-heard")
        self._show_text(answer)
        self.structure += 1

    def _show_text(self, answer: AnswerView) -> None:
        item = answer.item
        if answer.cut:
            heard = item.audio_ms / 1000
            text = item.text.strip()
            mark = f"{CUT_MARK} *cut after {heard:.1f} s of speech: the rest was not heard*"
            answer.bubble.content = f"{text}\n\n{mark}" if text else mark
        else:
            answer.bubble.content = item.text or answer.text or NO_TEXT

    def _show_audio(self, answer: AnswerView, samples: np.ndarray | None, suffix: str = "") -> None:
        """The answer's player: the speech the history keeps (``samples``, or the answer's wav when None, cut
        to the item's audio), written after the answer's earlier writes."""
        answer.writing = self._write(
            answer, f"answer-{answer.turn}{suffix}", samples, answer.item.sample_rate,
            lambda path: self._show_answer_audio(answer, path), keep=answer.item.audio_samples,
        )  # fmt: skip

    def _show_answer_audio(self, answer: AnswerView, path: Path | None) -> None:
        answer.audio_path = path
        if path is None:
            if answer.audio_bubble is not None:
                self.bubbles.remove(answer.audio_bubble)
                answer.audio_bubble = None
            return
        content = {"path": str(path), "mime_type": "audio/wav"}
        if answer.audio_bubble is None:
            answer.audio_bubble = Bubble("assistant", content)
            self.bubbles.insert(self.bubbles.index(answer.bubble) + 1, answer.audio_bubble)
        else:
            answer.audio_bubble.content = content

    def _write(
        self,
        answer: AnswerView | None,
        stem: str,
        samples: np.ndarray | None,
        sample_rate: int,
        show: Callable[[Path | None], None],
        keep: int | None = None,
    ) -> asyncio.Task:
        """Write ``samples[:keep]`` (None: the answer's current wav, read back) as ``stem``.wav in a worker
        thread, after the answer's earlier writes; then ``show`` the file (None: no speech) unless the chat
        was cleared meanwhile."""
        previous = answer.writing if answer is not None else None
        generation = self._clears

        def job() -> Path | None:
            audio = samples
            if audio is None:
                source = answer.audio_path if answer is not None else None
                audio = sf.read(str(source), dtype="float32")[0] if source is not None else np.zeros(0, np.float32)
            audio = audio[:keep] if keep is not None else audio
            return self.files.write_wav(stem, audio, sample_rate) if len(audio) else None

        async def write() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                path = await asyncio.to_thread(job)
            except Exception:  # a full disk: the chat goes on without this player
                logger.exception("could not write %s.wav", stem)
                path = None
            if generation != self._clears:
                if path is not None:  # the chat was cleared meanwhile
                    self.files.remove([path])
                return
            if path is not None:
                self.paths.append(path)
            show(path)
            self.structure += 1
            self.changed()

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task
