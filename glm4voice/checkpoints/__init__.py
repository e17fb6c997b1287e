"""Checkpoint folders: tiny random checkpoints in the three published formats (for tests and the
default demo), written by ``python -m glm4voice.checkpoints tiny OUT_DIR``."""

from glm4voice.checkpoints.tiny import (
    DECODER_FOLDER,
    LLM_FOLDER,
    SPEECH_TOKENIZER_FOLDER,
    TinyCheckpoints,
    write_tiny_checkpoints,
)

__all__ = ["LLM_FOLDER", "DECODER_FOLDER", "SPEECH_TOKENIZER_FOLDER", "TinyCheckpoints", "write_tiny_checkpoints"]
