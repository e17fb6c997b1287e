"""The speech decoder: GLM-4-Voice speech tokens -> 22.05 kHz speech (flow matching + HiFT vocoder).

Modules, one job each: :mod:`~glm4voice.decoder.codes` (input checks), :mod:`~glm4voice.decoder.options`
(constants and options), :mod:`~glm4voice.decoder.state` (per-stream state as plain data),
:mod:`~glm4voice.decoder.blocks` (block bookkeeping), :mod:`~glm4voice.decoder.synthesis` (the model
work on a batch of blocks), :mod:`~glm4voice.decoder.graphs` (first blocks, and optionally the encoder
and vocoder of later ones, as CUDA graphs),
:mod:`~glm4voice.decoder.loading` (the checkpoint folder), :mod:`~glm4voice.decoder.original` (the
original's per-uuid ``token2wav`` table),
:mod:`~glm4voice.decoder.decoder` (:class:`AudioDecoder`, which owns the states and every decode path)
and :mod:`~glm4voice.decoder.stream` (:class:`DecoderStream`, a handle on one stream).
"""

from glm4voice.decoder.codes import DecoderError, validate_codes
from glm4voice.decoder.decoder import AudioDecoder
from glm4voice.decoder.options import DEFAULT_PROMPT_WINDOW, HIFT_SEED_STREAM, DecoderOptions
from glm4voice.decoder.state import StreamState, VocoderCarry
from glm4voice.decoder.stream import DecoderStream

__all__ = [
    "DEFAULT_PROMPT_WINDOW",
    "HIFT_SEED_STREAM",
    "AudioDecoder",
    "DecoderError",
    "DecoderOptions",
    "DecoderStream",
    "StreamState",
    "VocoderCarry",
    "validate_codes",
]
