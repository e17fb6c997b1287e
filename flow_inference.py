"""Speech tokens -> 22.05 kHz speech with the published ``glm-4-voice-decoder`` folder, offline and streaming.

The original's module name and API (``AudioDecoder(config_path, flow_ckpt_path, hift_ckpt_path, device)``,
``token2wav``, ``offline_inference``, ``stream_inference``) beside the streaming one
(``decoder.stream(seed=...)``, ``feed_many``); the implementation is the :mod:`glm4voice.decoder` package.
"""

from glm4voice.decoder import (
    DEFAULT_PROMPT_WINDOW,
    HIFT_SEED_STREAM,
    AudioDecoder,
    DecoderError,
    DecoderOptions,
    DecoderStream,
    StreamState,
    VocoderCarry,
    validate_codes,
)
from glm4voice.decoder.loading import CONFIG_FILE, FLOW_FILE, HIFT_FILE

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_PROMPT_WINDOW",
    "FLOW_FILE",
    "HIFT_FILE",
    "HIFT_SEED_STREAM",
    "AudioDecoder",
    "DecoderError",
    "DecoderOptions",
    "DecoderStream",
    "StreamState",
    "VocoderCarry",
    "validate_codes",
]
