"""Fixtures of the conversation tests: the tiny models and the VAD model, loaded once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest


@dataclass
class Models:
    text_tokenizer: object
    speech_tokenizer: object
    decoder: object


@pytest.fixture(scope="session")
def models(tiny_checkpoints) -> Models:
    from flow_inference import AudioDecoder
    from glm4voice.text_tokenizer import GLMTokenizer
    from speech_tokenizer import SpeechTokenizer

    return Models(
        GLMTokenizer.from_pretrained(tiny_checkpoints.llm),
        SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device="cpu"),
        AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu"),
    )


@pytest.fixture(scope="session")
def vad():
    from glm4voice.conversation.vad import SileroVAD

    model = asyncio.run(SileroVAD.load())
    yield model
    model.close()
