"""16 kHz waveforms -> code ids: 30 s pieces, Whisper log-mel features, batched encoder runs.

Semantics (those of the original ``extract_speech_token`` for one utterance):
- an utterance is cut into consecutive 30 s pieces, each tokenized on its own (positions restart),
  and the pieces' codes are concatenated;
- a piece's features are computed with transformers' ``WhisperFeatureExtractor`` after zero padding
  to a multiple of one code (1280 samples); when the utterance has several pieces, its last piece
  is zero padded to the full 30 s first, because the original featurizes all pieces of an
  utterance in one padded batch (this only matters for the last feature frame: its STFT window
  reaches 40 samples past the padded end, which ``torch.stft`` fills by reflection);
- a piece of N samples gives ceil(N / 1280) codes.

Because every piece is featurized exactly as it would be alone, grouping pieces of different
utterances into one model batch gives the same codes as one-by-one (the original's batches of
several utterances do not have this property). Pieces are processed ``batch_size`` at a time, so
memory is bounded whatever the audio length.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from glm4voice.audio import INPUT_SAMPLE_RATE, WHISPER_CHUNK_SAMPLES, WHISPER_HOP_LENGTH

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
"""30 s pieces per encoder batch (the original used 128; the size does not change the codes)."""


class FeatureExtractorMismatch(ValueError):
    """The preprocessor config does not describe the features this model was trained on."""


@dataclass(frozen=True)
class Piece:
    """One <= 30 s stretch of an utterance and the length it is zero padded to before featurizing."""

    utterance: int
    index: int
    samples: np.ndarray
    padded_length: int


def split_pieces(waveform: np.ndarray, utterance: int, samples_per_token: int) -> list[Piece]:
    """Cut a 16 kHz waveform into 30 s pieces, each with the padded length the original gives it."""
    starts = range(0, len(waveform), WHISPER_CHUNK_SAMPLES)
    several = len(starts) > 1
    pieces = []
    for index, start in enumerate(starts):
        samples = waveform[start : start + WHISPER_CHUNK_SAMPLES]
        target = WHISPER_CHUNK_SAMPLES if several else len(samples)
        padded = -(-target // samples_per_token) * samples_per_token
        pieces.append(Piece(utterance, index, samples, padded))
    return pieces


def check_feature_extractor(model, feature_extractor) -> None:
    """Raise :class:`FeatureExtractorMismatch` unless the features fit the model."""
    problems = []
    if feature_extractor.sampling_rate != INPUT_SAMPLE_RATE:
        problems.append(f"sampling_rate {feature_extractor.sampling_rate} (expected {INPUT_SAMPLE_RATE})")
    if feature_extractor.hop_length != WHISPER_HOP_LENGTH:
        problems.append(f"hop_length {feature_extractor.hop_length} (expected {WHISPER_HOP_LENGTH})")
    if feature_extractor.feature_size != model.config.num_mel_bins:
        problems.append(
            f"feature_size {feature_extractor.feature_size} (the model has {model.config.num_mel_bins} mel bins)"
        )
    if problems:
        raise FeatureExtractorMismatch("preprocessor_config.json does not fit the model: " + ", ".join(problems))


def samples_per_token(model, feature_extractor) -> int:
    """Input samples per code: conv strides x pooling x hop (1280 as published)."""
    return model.frames_per_token * feature_extractor.hop_length


@torch.inference_mode()
def tokenize_waveforms(
    model,
    feature_extractor,
    waveforms: Sequence[np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[list[int]]:
    """Code ids for each 16 kHz mono float32 waveform (non-empty, finite; checked by the callers)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_feature_extractor(model, feature_extractor)
    stride = samples_per_token(model, feature_extractor)
    pieces = [piece for number, wave in enumerate(waveforms) for piece in split_pieces(wave, number, stride)]
    # Longest first, so that a batch holds pieces of similar length (the order does not change codes).
    pieces.sort(key=lambda piece: -piece.padded_length)
    codes: dict[tuple[int, int], list[int]] = {}
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start : start + batch_size]
        for piece, ids in zip(batch, _encode_batch(model, feature_extractor, batch, stride)):
            codes[(piece.utterance, piece.index)] = ids
    results: list[list[int]] = [[] for _ in waveforms]
    for utterance, index in sorted(codes):
        results[utterance].extend(codes[(utterance, index)])
    return results


def _encode_batch(model, feature_extractor, batch: list[Piece], stride: int) -> list[list[int]]:
    device = model.device
    features, masks = _featurize(feature_extractor, batch, stride, device)
    frames = max(feature.shape[-1] for feature in features)
    input_features = torch.zeros(len(batch), features[0].shape[0], frames, dtype=torch.float32, device=device)
    attention_mask = torch.zeros(len(batch), frames, dtype=torch.bool, device=device)
    for row, (feature, mask) in enumerate(zip(features, masks)):
        input_features[row, :, : feature.shape[-1]] = feature
        attention_mask[row, : mask.shape[-1]] = mask
    output = model(input_features, attention_mask)
    ids = output.quantized_token_ids.cpu()
    valid = output.token_mask.cpu()
    return [ids[row][valid[row]].tolist() for row in range(len(batch))]


def _featurize(feature_extractor, batch: list[Piece], stride: int, device: torch.device):
    """Log-mel features and frame masks per piece, each computed as if the piece were alone."""
    groups: dict[int, list[int]] = defaultdict(list)
    for row, piece in enumerate(batch):
        groups[piece.padded_length].append(row)
    features: list[torch.Tensor | None] = [None] * len(batch)
    masks: list[torch.Tensor | None] = [None] * len(batch)
    for padded_length, rows in groups.items():
        out = feature_extractor(
            [batch[row].samples for row in rows],
            sampling_rate=feature_extractor.sampling_rate,
            padding="max_length",
            max_length=padded_length,
            pad_to_multiple_of=stride,
            return_attention_mask=True,
            return_tensors="pt",
            device=_feature_device(device),
        )
        for position, row in enumerate(rows):
            features[row] = out["input_features"][position].to(device, non_blocking=True)
            masks[row] = out["attention_mask"][position].to(device=device, dtype=torch.bool, non_blocking=True)
    return features, masks


def _feature_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device)
