"""Fixtures of the LLM tests: the tiny glm-4-voice-9b folder loaded in float32 on the CPU."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llm_folder(tiny_checkpoints):
    return tiny_checkpoints.llm


@pytest.fixture(scope="session")
def tiny_llm(llm_folder):
    from glm4voice.llm.checkpoint import load_model

    return load_model(llm_folder, device="cpu", dtype="float32")
