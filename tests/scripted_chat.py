"""A stand-in for :class:`glm4voice.pipeline.VoiceChat` in the page's tests: the parts a page tab (and its
conversation session) uses, with scripted inputs and answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

from glm4voice.audio import OUTPUT_SAMPLE_RATE
from glm4voice.pipeline import FailureKind, PipelineConfig, TurnError, UserText
from glm4voice.protocol import AudioInput, SpecialTokens, TextInput


@dataclass
class ScriptedChat:
    """The parts of a VoiceChat a tab uses: the tiny text tokenizer; ``prepare_input`` accepts (or, with
    ``refuse``, refuses) every input; every answer yields ``events`` (with ``progress`` reporting
    ``reply_ids``; each event followed by a yield point, as a network read is), then with ``hold`` waits
    until it is cancelled."""

    text_tokenizer: object
    events: list
    reply_ids: tuple[int, ...] = ()
    refuse: TurnError | None = None
    hold: bool = False
    sample_rate: int = OUTPUT_SAMPLE_RATE
    config: PipelineConfig = PipelineConfig()
    server_url: str = "scripted"
    client: object = None
    requests: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    options: list = field(default_factory=list)
    held: asyncio.Event | None = None
    closed: bool = False
    open_streams: int = 0
    """Answers whose generation has not ended (a stopped answer's generator is closed)."""

    def __post_init__(self) -> None:
        self.special = SpecialTokens.from_tokenizer(self.text_tokenizer)

    async def prepare_input(self, request):
        self.requests.append(request)
        if self.refuse is not None:
            raise self.refuse
        if isinstance(request, UserText):
            text = request.text.strip()
            if not text:
                raise TurnError(FailureKind.EMPTY_INPUT, "Please type a message first.")
            return TextInput(text)
        return AudioInput((1, 2, 3, 4, 5))

    async def generate(self, prompt_ids, options, *, decode_audio=True, progress=None):
        self.prompts.append(list(prompt_ids))
        self.options.append(options)
        self.open_streams += 1
        try:
            if progress is not None:
                progress.follow(SimpleNamespace(reply_ids=tuple(self.reply_ids)))
            for event in self.events:
                yield event
                await asyncio.sleep(0)  # a yield point between events, as a real token stream has
            if self.hold:
                self.held = self.held or asyncio.Event()
                self.held.set()
                await asyncio.Event().wait()
        finally:
            self.open_streams -= 1

    def close(self) -> None:
        self.closed = True
