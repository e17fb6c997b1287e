"""The caller's side of the ``SpeechSide`` deployment: :class:`RemoteVoiceChat`, a stand-in for
:class:`~glm4voice.pipeline.VoiceChat` whose turns run on the speech replicas.

It has what the conversation sessions of the OpenAI-compatible routes use of a ``VoiceChat``
(``prepare_input``, ``generate`` with a :class:`~glm4voice.pipeline.TurnProgress`, the text tokenizer,
the special tokens, the pipeline config and the sample rate), so ``glm4voice.openai_api`` runs on it
unchanged. Ray Serve picks the least busy speech replica for each call; a turn's whole answer comes
from one replica. Failures of the cluster become the pipeline's own: a :class:`TurnFailed` event (every
speech replica busy: ``SERVER_BUSY``; the replica died mid-turn: ``STREAM_FAILED``) or a
:class:`TurnError` from ``prepare_input``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from glm4voice.audio import OUTPUT_SAMPLE_RATE
from glm4voice.pipeline import (
    AssistantAudio,
    AssistantText,
    FailureKind,
    GenerationOptions,
    PipelineConfig,
    TurnError,
    TurnEvent,
    TurnFailed,
    TurnFinished,
    TurnProgress,
    TurnTimings,
    UserRequest,
    UserSpeech,
)
from glm4voice.protocol import AudioInput, Demuxer, SpecialTokens, TextInput
from glm4voice.serve.board import ReplicaBoard
from glm4voice.serve.messages import Accepted, InputRefused
from glm4voice.text_tokenizer import GLMTokenizer

logger = logging.getLogger("glm4voice.serve")

BUSY_MESSAGE = "Every speech replica is busy. Please try again shortly."


class _RemoteReply:
    """What a :class:`TurnProgress` follows: the reply ids the speech replica reported so far."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    @property
    def reply_ids(self) -> tuple[int, ...]:
        return tuple(self.ids)


class RemoteVoiceChat:
    """A ``VoiceChat`` for the conversation sessions whose turns run on the ``SpeechSide`` replicas."""

    def __init__(self, speech: DeploymentHandle[Any], text_tokenizer: GLMTokenizer, config: PipelineConfig,
                 sample_rate: int = OUTPUT_SAMPLE_RATE):  # fmt: skip
        self.speech = speech
        self.streaming = speech.options(stream=True)
        self.text_tokenizer = text_tokenizer
        self.special = SpecialTokens.from_tokenizer(text_tokenizer)
        self.config = config
        self.sample_rate = sample_rate
        self.server_url = "the speech replicas (Ray Serve)"
        self.board = ReplicaBoard()
        """What each speech replica reported as it took a turn from this process (``GET /replicas``)."""

    async def prepare_input(self, request: UserRequest) -> TextInput | AudioInput:
        """Check and tokenize ``request`` on a speech replica; :class:`TurnError` as ``VoiceChat`` raises."""
        try:
            result = await self.speech.prepare_input.remote(_portable(request))
        except BackPressureError:
            raise TurnError(FailureKind.SERVER_BUSY, BUSY_MESSAGE) from None
        except RayActorError as error:
            message = f"The speech replica stopped while reading the input ({type(error).__name__}). Please try again."
            raise TurnError(FailureKind.SERVER_UNAVAILABLE, message) from None
        if isinstance(result, InputRefused):
            raise TurnError(result.kind, result.message)
        if not isinstance(result, (TextInput, AudioInput)):
            raise TypeError(f"a speech replica answered {type(result).__name__}, not a tokenized input")
        return result

    async def generate(self, prompt_ids: Sequence[int], options: GenerationOptions = GenerationOptions(), *,
                       decode_audio: bool = True, progress: TurnProgress | None = None) -> AsyncIterator[TurnEvent]:  # fmt: skip
        """The answer to ``prompt_ids`` from a speech replica (as :meth:`VoiceChat.generate`); stopping the
        iteration early cancels the turn there (and its token stream)."""
        started = time.perf_counter()
        reply = _RemoteReply()
        if progress is not None:
            progress.follow(cast(Demuxer, reply))  # a TurnProgress reads only reply_ids
        text: list[str] = []
        chunks: list[np.ndarray] = []
        call = cast(
            DeploymentResponseGenerator[Any], self.streaming.generate.remote(list(prompt_ids), options, decode_audio)
        )
        ended = False
        replica = None
        try:
            async for update in call:
                if isinstance(update, Accepted):
                    replica = update.replica
                    self.board.accepted(replica, update.counters)
                    continue
                reply.ids.extend(update.reply_ids)
                for event in update.events:
                    if isinstance(event, AssistantText):
                        text.append(event.text)
                    elif isinstance(event, AssistantAudio):
                        chunks.append(event.samples)
                    elif isinstance(event, TurnFinished):
                        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
                        event = dataclasses.replace(event, audio=audio)
                    ended = isinstance(event, (TurnFinished, TurnFailed))
                    yield event
        except BackPressureError:
            ended = True
            yield self._failed(FailureKind.SERVER_BUSY, BUSY_MESSAGE, text, started)
        except RayActorError as error:
            ended = True
            if replica is not None:
                self.board.lost(replica)
            message = (f"The answer was cut off: the speech replica serving it stopped ({type(error).__name__}). "
                       "Please try again.")  # fmt: skip
            yield self._failed(FailureKind.STREAM_FAILED, message, text, started)
        finally:
            if not ended:
                call.cancel()  # type: ignore[no-untyped-call]
            if replica is not None:
                self.board.ended(replica)

    def _failed(self, kind: FailureKind, message: str, text: list[str], started: float) -> TurnFailed:
        logger.info("turn failed (%s): %s", kind.value, message)
        return TurnFailed(kind, message, "".join(text), TurnTimings(), time.perf_counter() - started)

    def close(self) -> None:
        """Nothing to stop here: the speech replicas belong to Ray Serve."""


def _portable(request: UserRequest) -> UserRequest:
    """A request that means the same on another machine: a file named by its path is sent as its bytes."""
    if isinstance(request, UserSpeech) and isinstance(request.source, (str, os.PathLike)):
        try:
            return UserSpeech(Path(request.source).read_bytes())
        except OSError as error:
            raise TurnError(FailureKind.INVALID_INPUT, f"The audio file cannot be read: {error.strerror}.") from None
    return request
