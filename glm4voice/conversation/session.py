"""One conversation, whatever the front end: items, the input audio buffer with turn detection, the
response in flight, cancellation and truncation.

    session = ConversationSession(chat, SessionConfig(), vad=vad, emit=queue.put_nowait)
    await session.append_audio(samples_16k)     # server VAD: speech start / stop, automatic answers
    session.create_response()                   # or explicitly
    await session.cancel_response()             # closes the token stream: the server frees the slot
    await session.truncate(item_id, audio_end_ms)
    await session.playback_stopped(item_id, played_ms)  # a front end's answer to each speech start

The history is a list of items (user inputs, assistant answers as token ids); the prompt of an answer
is built from them exactly as the web page builds it (:mod:`glm4voice.conversation.history`). What the
session reports goes to one ``emit`` callback as typed events (the ``SessionEvent`` union below), in
order; ``emit`` must not block (a queue's ``put_nowait``). An answer's audio is emitted at the
front end's rate (``SessionConfig.output_sample_rate``, resampled from the decoder's with a streaming
resampler), and the session counts what it emitted: an answer that is cancelled (``cancel_response``,
barge-in) keeps in the history the part whose audio was emitted, and ``truncate`` cuts it further to
what the listener actually heard (see :mod:`glm4voice.conversation.history` for the rule).

A front end whose listener hears the answers through a player of its own (the web page) sets
``SessionConfig.playback_reports``: it answers every speech start with ``playback_stopped`` (the answer its
player stopped, and how much of it was heard), and an automatic answer waits for that report. So the
answer to a question asked over an answer still playing (barge-in, also after the answer has finished
generating) sees only what the listener heard of it.

Rules of the conversation (GLM-4-Voice takes one text or one spoken input per user turn):
- every user item is one user turn; an assistant item answers the user item before it (consecutive
  assistant items are joined); a user item not followed by an answer counts as a turn with an empty
  answer (as an answer cancelled before any of it was heard);
- system messages are not part of the prompt (the model was trained with a fixed system prompt).

Audio in is 16 kHz mono float (the VAD's and the speech tokenizer's rate); the front end resamples
(:class:`glm4voice.conversation.resampling.StreamResampler`). Positions and durations the session
reports are milliseconds of that input stream, i.e. audio time, not wall time.

Calls must not overlap (a front end handles its client's events one at a time); the response runs in
its own task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import numpy as np

from glm4voice.audio import INPUT_SAMPLE_RATE, Audio
from glm4voice.conversation.events import (
    InputCleared,
    InputCommitted,
    ItemAdded,
    ItemDeleted,
    ItemTruncated,
    ResponseAudioDelta,
    ResponseCreated,
    ResponseDone,
    ResponseTextDelta,
    SessionEvent,
    SessionFailure,
    SpeechStarted,
    SpeechStopped,
)
from glm4voice.conversation.history import Turn, build_prompt, heard_reply, reply_text
from glm4voice.conversation.items import (
    AssistantItem,
    CancelReason,
    Item,
    ItemStatus,
    Response,
    ResponseStatus,
    SessionError,
    UserItem,
    new_id,
)
from glm4voice.conversation.resampling import StreamResampler
from glm4voice.conversation.vad import (
    SileroVAD,
    SpeechStart,
    TurnDetection,
    VoiceActivityDetector,
    ms_to_samples,
    samples_to_ms,
)
from glm4voice.pipeline import (
    AssistantAudio,
    AssistantText,
    FailureKind,
    GenerationOptions,
    TurnError,
    TurnFailed,
    TurnFinished,
    UserSpeech,
    UserText,
    VoiceChat,
)
from glm4voice.protocol import EndReason, TextInput, UserInput

logger = logging.getLogger(__name__)

MIN_COMMIT_MS = 100
"""Shortest audio buffer a manual commit accepts (OpenAI's rule)."""


# --- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionConfig:
    output_audio: bool = True
    """Answers with speech (the decoder runs) or text only (the decoder never runs)."""
    output_sample_rate: int | None = None
    """Rate of the audio the session emits (None: the decoder's own rate, no resampling)."""
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    """Server VAD on the input audio; None: the front end commits the buffer itself."""
    options: GenerationOptions = GenerationOptions()
    playback_reports: bool = False
    """The front end answers every speech start with :meth:`ConversationSession.playback_stopped` (what its
    listener heard of the answer that was playing); an automatic answer waits for that report, so that its
    prompt holds only the heard part of an interrupted answer, also one that had finished generating."""
    record_failed_turns: bool = True
    """False: a failed answer leaves no trace: it and the user input it answered leave the conversation
    (:class:`ItemDeleted` after its :class:`ResponseDone`), as if the turn had not happened."""

    def __post_init__(self) -> None:
        if self.output_sample_rate is not None and self.output_sample_rate < 1:
            raise ValueError(f"invalid output sample rate {self.output_sample_rate}")


# --- the session ---------------------------------------------------------------------------------------


class ConversationSession:
    def __init__(
        self,
        chat: VoiceChat,
        config: SessionConfig = SessionConfig(),
        *,
        emit: Callable[[SessionEvent], None],
        vad: SileroVAD | None = None,
    ):
        self.chat = chat
        self.vad = vad
        self.emit = emit
        self.items: list[Item] = []
        self.response: Response | None = None
        """The response in flight (None when idle)."""
        self.config = config
        self._max_input_samples = ms_to_samples(chat.config.max_input_seconds * 1000)
        # input audio: everything since ``_buffer_start`` (a position in the 16 kHz input stream)
        self.input_samples = 0
        """Samples of input audio received so far (the session's audio clock)."""
        self._buffer: list[np.ndarray] = []
        self._buffer_start = 0
        self._buffered = 0
        self._detector: VoiceActivityDetector | None = None
        self._detector_origin = 0
        self._speech_item_id: str | None = None
        self._speech_from = 0
        self._reports_due = 0
        """Speech starts not yet answered by :meth:`playback_stopped` (with ``playback_reports``)."""
        self._answer_due = False
        """A turn ended while reports were due: the automatic answer starts with the last report."""
        self._lock = asyncio.Lock()
        self._tokenizing: set[asyncio.Task] = set()
        self._set_turn_detection(config.turn_detection)

    # --- configuration ------------------------------------------------------------------------------

    @property
    def output_sample_rate(self) -> int:
        return self.config.output_sample_rate or self.chat.sample_rate

    def update(self, config: SessionConfig) -> None:
        """New settings; a change of turn detection restarts the detector (the buffer is kept)."""
        changed = config.turn_detection != self.config.turn_detection
        self.config = config
        if changed:
            self._set_turn_detection(config.turn_detection)

    def _set_turn_detection(self, detection: TurnDetection | None) -> None:
        if detection is None:
            self._detector = None
        elif self.vad is None:
            raise SessionError("vad_unavailable", "server turn detection needs the VAD model")
        else:
            self._detector = VoiceActivityDetector(self.vad, detection)
        self._detector_origin = self.input_samples
        self._speech_item_id = None
        self._reports_due = 0
        self._answer_due = False

    @property
    def in_speech(self) -> bool:
        return self._speech_item_id is not None

    # --- input audio ----------------------------------------------------------------------------------

    async def append_audio(self, samples: np.ndarray) -> None:
        """Append 16 kHz mono float samples to the input buffer; with turn detection, speech boundaries
        are reported, an answer in flight is cancelled when speech starts (if ``interrupt_response``),
        and the user's turn is committed (and answered, if ``create_response``) when speech stops."""
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        async with self._lock:
            detection = self.config.turn_detection
            if self._detector is None and self._buffered + len(samples) > self._max_input_samples:
                raise SessionError(
                    "input_audio_buffer_full",
                    f"the input audio buffer holds at most {self.chat.config.max_input_seconds:g} s: commit or clear it",
                )
            self._buffer.append(samples)
            self._buffered += len(samples)
            self.input_samples += len(samples)
            if self._detector is None:
                return
            # a detector exists only with the VAD and the turn detection it was made for (_set_turn_detection)
            assert self.vad is not None and detection is not None
            for boundary in await self.vad.run(self._detector.feed, samples):
                if isinstance(boundary, SpeechStart):
                    await self._speech_started(self._detector_origin + boundary.sample, detection)
                else:
                    await self._speech_stopped(self._detector_origin + boundary.decided)
            if self.in_speech and self.input_samples - self._speech_from >= self._max_input_samples:
                self._detector.force_stop()  # the turn reached the input limit: it ends here
                await self._speech_stopped(self.input_samples)
            elif not self.in_speech:  # keep what a next start's prefix padding may need
                keep_from = self._detector_origin + self._detector.position - ms_to_samples(detection.prefix_padding_ms)
                self._drop_before(keep_from)

    async def _speech_started(self, start: int, detection: TurnDetection) -> None:
        self._speech_item_id = new_id("item")
        self._speech_from = max(self._buffer_start, start - ms_to_samples(detection.prefix_padding_ms))
        self.emit(SpeechStarted(self._speech_item_id, samples_to_ms(self._speech_from), samples_to_ms(start)))
        if self.config.playback_reports:
            self._reports_due += 1
        if detection.interrupt_response and self.response is not None:
            await self.cancel_response(CancelReason.TURN_DETECTED)

    async def _speech_stopped(self, end: int) -> None:
        item_id, self._speech_item_id = self._speech_item_id, None
        assert item_id is not None  # called in speech only (after SpeechStarted)
        self.emit(SpeechStopped(item_id, samples_to_ms(end)))
        self._drop_before(self._speech_from)
        audio = self._take(end - self._buffer_start)
        self._commit(audio, item_id)
        detection = self.config.turn_detection
        if detection is not None and detection.create_response and self.response is None:
            if self._reports_due:
                self._answer_due = True  # once the listener said what it heard (playback_stopped)
            else:
                self.create_response()

    async def playback_stopped(self, item_id: str | None, played_ms: int = 0) -> AssistantItem | None:
        """The front end's answer to a speech start (``SessionConfig.playback_reports``): its listener's
        player stopped the answer ``item_id`` after ``played_ms`` of its speech (``item_id`` None: nothing
        was playing). The answer is cut to what was heard (cancelled first if it is still running; an
        answer heard to its end is kept whole); then an automatic answer that waited for this report
        starts. Returns the answer if it was cut."""
        cut = None
        try:
            if item_id is not None:
                item = self._find(item_id)
                if not isinstance(item, AssistantItem):
                    raise SessionError("invalid_item", f"item {item_id} is not an assistant answer", "item_id")
                if self.response is not None and item is self.response.item:
                    await self.cancel_response(CancelReason.TURN_DETECTED)
                if item.has_audio and played_ms < item.audio_ms:
                    cut = await self.truncate(item_id, max(0, int(played_ms)))
        finally:
            self._reports_due = max(0, self._reports_due - 1)
            if not self._reports_due and self._answer_due:
                self._answer_due = False
                if self.response is None:
                    self.create_response()
        return cut

    def commit(self) -> UserItem:
        """Make the whole input buffer a user item (its speech is tokenized in the background)."""
        if self._buffered * 1000 < MIN_COMMIT_MS * INPUT_SAMPLE_RATE:
            raise SessionError(
                "input_audio_buffer_commit_empty",
                f"the input audio buffer holds {samples_to_ms(self._buffered)} ms of audio; "
                f"a commit needs at least {MIN_COMMIT_MS} ms",
            )
        item_id = self._speech_item_id or new_id("item")
        audio = self._take(self._buffered)
        self._set_turn_detection(self.config.turn_detection)
        return self._commit(audio, item_id)

    def clear_input(self) -> None:
        self._take(self._buffered)
        self._set_turn_detection(self.config.turn_detection)
        self.emit(InputCleared())

    def _take(self, count: int) -> np.ndarray:
        data = np.concatenate(self._buffer) if self._buffer else np.zeros(0, dtype=np.float32)
        taken, rest = data[:count], data[count:]
        self._buffer = [rest] if len(rest) else []
        self._buffer_start += len(taken)
        self._buffered = len(rest)
        return taken

    def _drop_before(self, position: int) -> None:
        if position > self._buffer_start:
            self._take(min(position - self._buffer_start, self._buffered))

    def _commit(self, samples: np.ndarray, item_id: str) -> UserItem:
        audio = Audio(samples, INPUT_SAMPLE_RATE)
        item = UserItem(item_id, audio=audio)
        previous = self._insert(item, None)
        item.ready = asyncio.create_task(self._tokenize(item, audio))
        self.emit(InputCommitted(item, previous))
        self.emit(ItemAdded(item, previous))
        return item

    async def _tokenize(self, item: UserItem, audio: Audio) -> None:
        """Tokenize ``item``'s speech ``audio`` (run as a task: ``item.ready``)."""
        task = asyncio.current_task()
        assert task is not None  # always run as a task
        self._tokenizing.add(task)
        try:
            item.input = await self.chat.prepare_input(UserSpeech(audio))
        except TurnError as error:
            logger.info("user audio %s refused: %s", item.id, error.message)
            if item in self.items:
                self.items.remove(item)
                self.emit(ItemDeleted(item.id))
            self.emit(SessionFailure(SessionError(error.kind.value, error.message, kind=error.kind)))
        finally:
            self._tokenizing.discard(task)

    # --- items ----------------------------------------------------------------------------------------

    async def add_user_text(
        self, text: str, previous_item_id: str | None = None, *, item_id: str | None = None
    ) -> UserItem:
        user_input = await self._prepare(UserText(text))
        assert isinstance(user_input, TextInput)  # typed input is always tokenized as text
        return self.add_user_input(user_input, previous_item_id, text=user_input.text, item_id=item_id)

    def add_user_audio(self, audio: Audio, previous_item_id: str | None = None, item_id: str | None = None) -> UserItem:
        """Spoken input (any rate: the speech tokenizer resamples); tokenized in the background."""
        item = UserItem(self._new_item_id(item_id), audio=audio)
        previous = self._insert(item, previous_item_id)
        item.ready = asyncio.create_task(self._tokenize(item, audio))
        self.emit(ItemAdded(item, previous))
        return item

    def add_user_input(
        self,
        user_input: UserInput,
        previous_item_id: str | None = None,
        *,
        text: str | None = None,
        item_id: str | None = None,
    ) -> UserItem:
        """An input that is already checked and tokenized (:meth:`VoiceChat.prepare_input`)."""
        item = UserItem(self._new_item_id(item_id), text=text, input=user_input)
        previous = self._insert(item, previous_item_id)
        self.emit(ItemAdded(item, previous))
        return item

    def add_assistant_reply(
        self,
        reply_ids: tuple[int, ...],
        text: str,
        *,
        has_audio: bool,
        previous_item_id: str | None = None,
        item_id: str | None = None,
    ) -> AssistantItem:
        """An earlier answer put back into the conversation by its exact ids."""
        item = AssistantItem(
            self._new_item_id(item_id), self.output_sample_rate, generated_ids=tuple(reply_ids), reply_ids=tuple(reply_ids),
            text=text, has_audio=has_audio,
        )  # fmt: skip
        previous = self._insert(item, previous_item_id)
        self.emit(ItemAdded(item, previous))
        return item

    def add_assistant_text(
        self, text: str, previous_item_id: str | None = None, *, item_id: str | None = None
    ) -> AssistantItem:
        """An answer given as text: its text tokens go into the history (no speech tokens)."""
        ids = tuple(self.chat.text_tokenizer.encode(text, allow_special=False))
        return self.add_assistant_reply(ids, text, has_audio=False, previous_item_id=previous_item_id, item_id=item_id)

    def _new_item_id(self, item_id: str | None) -> str:
        if item_id is None:
            return new_id("item")
        if any(item.id == item_id for item in self.items):
            raise SessionError("duplicate_item_id", f"the conversation already has an item {item_id!r}", "item.id")
        return item_id

    async def delete_item(self, item_id: str) -> None:
        item = self._find(item_id)
        if self.response is not None and item is self.response.item:
            await self.cancel_response(CancelReason.CLIENT_CANCELLED)
        self.items.remove(item)
        self.emit(ItemDeleted(item_id))

    async def truncate(self, item_id: str, audio_end_ms: int) -> AssistantItem:
        """Cut an answer to its first ``audio_end_ms`` of speech (what the listener heard): the
        history keeps its ids up to the heard audio token (an answer still running is cancelled)."""
        item = self._find(item_id)
        if not isinstance(item, AssistantItem):
            raise SessionError("invalid_item", f"item {item_id} is not an assistant answer", "item_id")
        if self.response is not None and item is self.response.item:
            await self.cancel_response(CancelReason.CLIENT_CANCELLED)
        if not item.has_audio:
            raise SessionError("invalid_item", f"item {item_id} has no audio to truncate", "item_id")
        if not 0 <= audio_end_ms <= item.audio_ms:
            raise SessionError(
                "invalid_value",
                f"audio_end_ms must be between 0 and the item's audio duration ({item.audio_ms} ms), got {audio_end_ms}",
                "audio_end_ms",
            )
        special = self.chat.special
        item.reply_ids = heard_reply(item.generated_ids, audio_end_ms, special)
        item.text = reply_text(item.reply_ids, self.chat.text_tokenizer, special)
        item.audio_samples = audio_end_ms * item.sample_rate // 1000
        item.truncated_ms = audio_end_ms
        self.emit(ItemTruncated(item, audio_end_ms))
        return item

    def _find(self, item_id: str) -> Item:
        for item in self.items:
            if item.id == item_id:
                return item
        raise SessionError("item_not_found", f"no item with id {item_id!r} in the conversation", "item_id")

    def _insert(self, item: Item, previous_item_id: str | None) -> str | None:
        """Insert after ``previous_item_id`` (None: at the end, 'root': first); the id before it."""
        if previous_item_id is None:
            index = len(self.items)
        elif previous_item_id == "root":
            index = 0
        else:
            index = self.items.index(self._find(previous_item_id)) + 1
        self.items.insert(index, item)
        return self.items[index - 1].id if index > 0 else None

    async def _prepare(self, request) -> UserInput:
        try:
            return await self.chat.prepare_input(request)
        except TurnError as error:
            raise SessionError(error.kind.value, error.message, kind=error.kind) from error

    # --- prompts --------------------------------------------------------------------------------------

    def _check_answerable(self, items: list[Item]) -> None:
        if items and isinstance(items[0], AssistantItem):
            raise SessionError(
                "invalid_conversation", "the conversation starts with an answer: GLM-4-Voice needs a user turn first"
            )
        last_user = max((i for i, item in enumerate(items) if isinstance(item, UserItem)), default=None)
        if last_user is None or any(isinstance(item, AssistantItem) for item in items[last_user:]):
            raise SessionError(
                "no_user_input", "there is no user input to answer: add a user item or commit audio first"
            )

    async def prompt_ids(self, exclude: Item | None = None) -> list[int]:
        """The prompt of an answer to the conversation so far (waits for speech being tokenized)."""
        items = [item for item in self.items if item is not exclude]
        for item in items:
            if isinstance(item, UserItem) and item.ready is not None:
                await asyncio.shield(item.ready)  # a cancelled answer leaves the tokenizer's job running
        items = [item for item in items if not _refused(item)]
        self._check_answerable(items)
        turns: list[Turn] = []
        pending: UserInput | None = None
        for item in items:
            if isinstance(item, UserItem):
                if pending is not None:
                    turns.append(Turn(pending))
                pending = item.input
            elif pending is None:
                turns[-1] = Turn(turns[-1].user, turns[-1].reply_ids + item.reply_ids)
            else:
                turns.append(Turn(pending, item.reply_ids))
                pending = None
        assert pending is not None  # _check_answerable: a user item ends them, tokenized (refused ones left out)
        return build_prompt(self.chat.text_tokenizer, self.chat.special, turns, pending)

    # --- responses ------------------------------------------------------------------------------------

    def create_response(
        self, *, output_audio: bool | None = None, options: GenerationOptions | None = None
    ) -> Response:
        """Start answering the conversation (one answer at a time)."""
        if self.response is not None:
            raise SessionError(
                "conversation_already_has_active_response",
                f"response {self.response.id} is still in progress: cancel it or wait for it",
            )
        self._check_answerable([item for item in self.items if not _refused(item)])
        audio = self.config.output_audio if output_audio is None else output_audio
        item = AssistantItem(new_id("item"), self.output_sample_rate, has_audio=audio, status=ItemStatus.IN_PROGRESS)
        response = Response(new_id("resp"), item, audio, options or self.config.options)
        item.response_id = response.id
        self.response = response
        self.emit(ResponseCreated(response))
        previous = self._insert(item, None)
        self.emit(ItemAdded(item, previous))
        task = response.task = asyncio.create_task(self._run(response))
        # ends the response whatever ended the task, also a cancel before it ever ran; added first, it runs
        # before the callbacks of anyone waiting for the task (cancel_response returns after it)
        task.add_done_callback(lambda _: self._finish(response, task))
        return response

    async def cancel_response(self, reason: CancelReason = CancelReason.CLIENT_CANCELLED) -> Response | None:
        """Stop the answer in flight (the token stream is closed at once); returns it, done, or None if
        there was none. Its audio emitted so far stays in the history (see the module doc)."""
        response = self.response
        if response is None:
            return None
        if response.cancel_reason is None:
            response.cancel_reason = reason
        task = _task_of(response)
        task.cancel()
        await asyncio.wait([task])
        return response

    async def wait(self) -> Response | None:
        """Until the answer in flight (if any) is done."""
        response = self.response
        if response is not None:
            await asyncio.wait([_task_of(response)])
        return response

    async def _run(self, response: Response) -> None:
        item = response.item
        resampler = StreamResampler(self.chat.sample_rate, self.output_sample_rate)
        try:
            prompt = await self.prompt_ids(exclude=item)
            response.prompt_tokens = len(prompt)
            response.prompt_audio_tokens = sum(1 for i in prompt if self.chat.special.is_audio(i))
            turn = self.chat.generate(
                prompt, response.options, decode_audio=response.output_audio, progress=response.progress
            )
            async with aclosing(turn) as events:
                async for event in events:
                    if isinstance(event, AssistantText):
                        item.text += event.text
                        self.emit(ResponseTextDelta(response, event.text))
                    elif isinstance(event, AssistantAudio):
                        self._emit_audio(response, resampler.feed(event.samples))
                    elif isinstance(event, TurnFinished):
                        self._emit_audio(response, resampler.flush())
                        item.generated_ids = item.reply_ids = event.reply_ids
                        item.text = event.text
                        response.output_tokens = len(event.reply_ids)
                        response.output_audio_tokens = event.audio_tokens
                        stopped = event.reason is EndReason.STREAM_END
                        response.status = ResponseStatus.INCOMPLETE if stopped else ResponseStatus.COMPLETED
                    elif isinstance(event, TurnFailed):
                        response.status = ResponseStatus.FAILED
                        response.error = SessionError(event.kind.value, event.message, kind=event.kind)
                        self._keep_heard(response)
        except asyncio.CancelledError:
            self._cancelled(response)
            raise
        except SessionError as error:
            response.status = ResponseStatus.FAILED
            response.error = error
        except Exception as error:  # a bug: the client hears of it, the log keeps the traceback
            logger.exception("response %s failed", response.id)
            response.status = ResponseStatus.FAILED
            response.error = SessionError(
                FailureKind.INTERNAL.value, f"internal error: {error}", kind=FailureKind.INTERNAL
            )

    def _cancelled(self, response: Response) -> None:
        response.status = ResponseStatus.CANCELLED
        response.cancel_reason = response.cancel_reason or CancelReason.CLIENT_CANCELLED
        self._keep_heard(response)

    def _finish(self, response: Response, task: asyncio.Task[None]) -> None:
        """The response's ``task`` is over: settle its status, free the session, report it."""
        if response.status is ResponseStatus.IN_PROGRESS:
            if task.cancelled():  # cancelled before it started
                self._cancelled(response)
            else:  # the turn ended without a final event
                response.status = ResponseStatus.FAILED
                response.error = response.error or SessionError(FailureKind.INTERNAL.value, "the answer ended early")
        item = response.item
        item.status = ItemStatus.COMPLETED if response.status is ResponseStatus.COMPLETED else ItemStatus.INCOMPLETE
        if self.response is response:
            self.response = None
        self.emit(ResponseDone(response))
        if response.status is ResponseStatus.FAILED and not self.config.record_failed_turns:
            self._forget_turn(item)

    def _forget_turn(self, item: AssistantItem) -> None:
        """Remove an answer and the user input(s) it answered from the conversation."""
        if item not in self.items:
            return
        end = self.items.index(item) + 1
        start = end - 1
        while start > 0 and isinstance(self.items[start - 1], UserItem):
            start -= 1
        removed = self.items[start:end]
        del self.items[start:end]
        for gone in removed:
            self.emit(ItemDeleted(gone.id))

    def _emit_audio(self, response: Response, samples: np.ndarray) -> None:
        if len(samples):
            response.item.audio_samples += len(samples)
            self.emit(ResponseAudioDelta(response, samples))

    def _keep_heard(self, response: Response) -> None:
        """A stopped answer: the history keeps what was emitted of it."""
        item = response.item
        special = self.chat.special
        generated = response.progress.reply_ids
        item.generated_ids = generated
        item.reply_ids = heard_reply(generated, item.audio_ms, special) if response.output_audio else generated
        item.text = reply_text(item.reply_ids, self.chat.text_tokenizer, special)
        response.output_tokens = len(generated)
        response.output_audio_tokens = sum(1 for i in generated if special.is_audio(i))

    # --- end ------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel the answer in flight and the speech tokenizer's jobs (the client has gone)."""
        await self.cancel_response(CancelReason.CLIENT_CANCELLED)
        for task in list(self._tokenizing):
            task.cancel()
        if self._tokenizing:
            await asyncio.wait(list(self._tokenizing))


def _task_of(response: Response) -> asyncio.Task[None]:
    """The task answering ``response`` (:meth:`ConversationSession.create_response` starts it)."""
    if response.task is None:
        raise RuntimeError(f"response {response.id} has no task")
    return response.task


def _refused(item: Item) -> bool:
    """A user item whose speech the tokenizer refused (it is also removed from the conversation)."""
    return isinstance(item, UserItem) and item.input is None and item.ready is not None and item.ready.done()


__all__ = ["MIN_COMMIT_MS", "ConversationSession", "SessionConfig"]
