"""Speech made with espeak-ng (a system package: ``apt install espeak-ng``): the spoken inputs of the
tests and of ``python -m glm4voice.llm.quality`` come from here, as the sample prompts in resources/
and bench/data come from the same program (their make_*.sh scripts)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from glm4voice.audio import INPUT_SAMPLE_RATE, Audio, load_audio

ESPEAK = "espeak-ng"


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed."""


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def speak(text: str, voice: str = "en-us", words_per_minute: int | None = None,
          sample_rate: int = INPUT_SAMPLE_RATE) -> Audio:  # fmt: skip
    """``text`` spoken by espeak-ng's ``voice`` (e.g. ``en-us``, ``cmn``), mono float at ``sample_rate``."""
    if not espeak_available():
        raise EspeakError(f"{ESPEAK} is not installed (apt install espeak-ng)")
    command = [ESPEAK, "-v", voice] + (["-s", str(words_per_minute)] if words_per_minute else [])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        try:
            subprocess.run([*command, "-w", str(path), text], check=True, capture_output=True)
        except subprocess.CalledProcessError as error:
            raise EspeakError(f"{ESPEAK} -v {voice} failed: {error.stderr.decode(errors='replace').strip()}") from error
        return load_audio(path, sample_rate)
