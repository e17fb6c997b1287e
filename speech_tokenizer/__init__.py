"""GLM-4-Voice speech tokenizer: 16 kHz speech -> Whisper-VQ code ids, 12.5 per second.

- :class:`SpeechTokenizer` (``speech_tokenizer.tokenizer``): the typed API (paths, bytes, arrays).
- :func:`extract_speech_token` (``speech_tokenizer.utils``): the original's call, same results.
- :class:`WhisperVQEncoder` / :class:`WhisperVQConfig`: the model and its ``config.json``, loading
  ``THUDM/glm-4-voice-tokenizer`` unchanged.
"""

from speech_tokenizer.checkpoint import CheckpointError
from speech_tokenizer.configuration_whisper import ConfigError, WhisperVQConfig
from speech_tokenizer.modeling_whisper import WhisperVQEncoder, WhisperVQOutput
from speech_tokenizer.tokenizer import SpeechTokenizer, TokenizerOptions
from speech_tokenizer.utils import extract_speech_token

__all__ = [
    "CheckpointError",
    "ConfigError",
    "SpeechTokenizer",
    "TokenizerOptions",
    "WhisperVQConfig",
    "WhisperVQEncoder",
    "WhisperVQOutput",
    "extract_speech_token",
]
