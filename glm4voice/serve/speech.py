"""The ``SpeechSide`` deployment: what ``web_demo.py`` loads (speech tokenizer, speech decoder, text
tokenizer), one set per replica, running turns for the OpenAI-compatible routes of the ingress.

Each replica is a :class:`~glm4voice.pipeline.VoiceChat` whose token server is the ``TokenEngine``
deployment (:class:`~glm4voice.serve.tokens.RayTokenClient`): Ray Serve routes each turn's token
stream to the least busy engine replica, and the replica's block batcher decodes the audio blocks of
all the turns it runs in shared decoder calls, as the web demo's does. A turn stays on one speech
replica from start to end (its decoder state lives there). Placement (same GPU as an engine replica,
or GPUs of its own) is the deployment's ``num_gpus`` (:mod:`glm4voice.serve.config`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from ray import serve

from glm4voice.devices import ALLOCATOR_ENV, decoder_dtype, prefer_expandable_segments
from glm4voice.pipeline import (
    GenerationOptions,
    TurnError,
    TurnEvent,
    TurnFinished,
    TurnProgress,
    UserRequest,
    VoiceChat,
)
from glm4voice.protocol import AudioInput, TextInput
from glm4voice.serve.batches import in_batches
from glm4voice.serve.config import ENGINE_APP, ENGINE_DEPLOYMENT, ServeConfig
from glm4voice.serve.messages import Accepted, InputRefused, TurnUpdate
from glm4voice.serve.tokens import RayTokenClient, tokenizer_folder
from glm4voice.text_tokenizer import GLMTokenizer

logger = logging.getLogger("glm4voice.serve")


class SpeechSide:
    async def __init__(self, config: ServeConfig):  # type: ignore[misc]  # Ray Serve awaits it
        from glm4voice.decoder import AudioDecoder
        from glm4voice.decoder.options import graph_batch_sizes_for
        from glm4voice.memory import memory_report, summary_line
        from speech_tokenizer import SpeechTokenizer

        prefer_expandable_segments()  # this replica's process: before its first CUDA allocation
        started = time.perf_counter()
        self.replica = serve.get_replica_context().replica_id.unique_id
        device = config.replica_device
        engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=ENGINE_APP)
        info = await engine.info.remote()
        text_tokenizer = GLMTokenizer.from_pretrained(tokenizer_folder(config.server.model_path))
        speech_tokenizer = SpeechTokenizer.from_pretrained(config.tokenizer_path, device=device)
        turns = config.max_concurrent_turns  # as web_demo.py: its graphs sized for that many blocks at once
        graphs = {} if turns is None else {"graph_batch_sizes": graph_batch_sizes_for(turns)}
        decoder = AudioDecoder.from_pretrained(config.flow_path, device=device,
                                               dtype=decoder_dtype(config.decoder_dtype, device), **graphs)  # fmt: skip
        client = RayTokenClient(engine, config.server, text_tokenizer, info)
        self.chat = VoiceChat(text_tokenizer, speech_tokenizer, decoder, client, config.pipeline,
                              server_url=client.base_url)  # fmt: skip
        if decoder.device.type == "cuda":  # every block shape's CUDA graph now, not while a listener waits
            decoder.warm_up(config.pipeline.block_sizes, first_block_sizes=self.chat.first_block_sizes)
        self.turns = 0
        logger.info("speech replica %s ready on %s in %.1f s (pid %d)", self.replica, device,
                    time.perf_counter() - started, os.getpid())  # fmt: skip
        logger.info("speech replica %s", summary_line(memory_report(device, self.chat.memory_owners())))

    def info(self) -> dict[str, Any]:
        return {"replica": self.replica, "sample_rate": self.chat.sample_rate}

    async def prepare_input(self, request: UserRequest) -> TextInput | AudioInput | InputRefused:
        """The checked, tokenized input (speech through this replica's speech tokenizer)."""
        try:
            return await self.chat.prepare_input(request)
        except TurnError as error:
            return InputRefused(error.kind, error.message)

    async def generate(self, prompt_ids: Sequence[int], options: GenerationOptions,
                       decode_audio: bool = True) -> AsyncIterator[Accepted | TurnUpdate]:  # fmt: skip
        """:meth:`VoiceChat.generate`: :class:`Accepted`, then :class:`TurnUpdate` messages; closing the
        stream cancels the turn (its token stream too)."""
        self.turns += 1
        yield Accepted(self.replica, self.stats())
        progress = TurnProgress()
        sent = 0
        turn = self.chat.generate(prompt_ids, options, decode_audio=decode_audio, progress=progress)
        async for events in in_batches(turn):
            kept = progress.reply_ids
            yield TurnUpdate(tuple(_without_whole_audio(e) for e in events), tuple(kept[sent:]))
            sent = len(kept)

    def stats(self) -> dict[str, Any]:
        blocks = self.chat.blocks
        return {"replica": self.replica, "pid": os.getpid(), "allocator": os.environ.get(ALLOCATOR_ENV), "turns": self.turns,
                "active_turns": self.chat.active_turns, "decoder_calls": blocks.calls,
                "blocks_decoded": blocks.jobs}  # fmt: skip

    def __del__(self) -> None:
        self.chat.close()


def _without_whole_audio(event: TurnEvent) -> TurnEvent:
    """A finished turn's event without its whole answer's audio: the caller has every chunk of it
    already (``RemoteVoiceChat`` puts it back together), so it does not travel twice."""
    if isinstance(event, TurnFinished):
        return dataclasses.replace(event, audio=np.zeros(0, dtype=np.float32))
    return event
