"""The web demo's audio files (answers, and the questions spoken in conversation mode): one temporary
folder owned by the app, removed at shutdown.

The app puts that folder inside Gradio's upload folder: Gradio then serves the files from where they
are instead of hashing and copying each one into its cache (on the event loop) when the chat shows it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from glm4voice.audio import encode_wav


class DemoFiles:
    """Answer wav files (the chat's audio player of each finished answer), in one temporary folder."""

    def __init__(self, parent: str | Path | None = None) -> None:
        """``parent``: where the folder is made (default: the system's temporary folder)."""
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="glm4voice-demo-", dir=parent))

    def write_answer(self, name: str, samples: np.ndarray, sample_rate: int) -> Path:
        return self.write_wav(f"answer-{name}", samples, sample_rate)

    def write_wav(self, stem: str, samples: np.ndarray, sample_rate: int) -> Path:
        path = self.folder / f"{stem}.wav"
        path.write_bytes(encode_wav(samples, sample_rate))
        return path

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
        paths.clear()

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
