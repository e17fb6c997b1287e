"""The published ``glm-4-voice-decoder`` folder -> the flow and HiFT modules, loaded strictly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cosyvoice.config import load_decoder_config
from glm4voice.audio import MEL_HOP_LENGTH, NUM_MEL_BINS
from glm4voice.hub import resolve_checkpoint

if TYPE_CHECKING:
    from cosyvoice.flow.flow import MaskedDiffWithXvec
    from cosyvoice.hifigan.generator import HiFTGenerator

CONFIG_FILE = "config.yaml"
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"


def decoder_files(folder_or_hub_id: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(config.yaml, flow.pt, hift.pt) of a local folder or hub id (fetched if needed)."""
    folder = resolve_checkpoint(os.fspath(folder_or_hub_id), allow_patterns=[CONFIG_FILE, FLOW_FILE, HIFT_FILE])
    return folder / CONFIG_FILE, folder / FLOW_FILE, folder / HIFT_FILE


def load_modules(
    config_path: str | os.PathLike[str],
    flow_ckpt_path: str | os.PathLike[str],
    hift_ckpt_path: str | os.PathLike[str],
    device: torch.device,
) -> tuple[MaskedDiffWithXvec, HiFTGenerator]:
    """(flow, hift) built from config.yaml (on the meta device, so no memory is spent on random
    weights), their checkpoints assigned strictly, moved to ``device`` in eval mode."""
    with torch.device("meta"):
        config = load_decoder_config(Path(config_path))
    flow, hift = config["flow"], config["hift"]
    load_strict(flow, flow_ckpt_path, "flow")
    load_strict(hift, hift_ckpt_path, "hift")
    flow.to(device).eval()
    hift.to(device).eval()
    if int(hift.upsample_scale) != MEL_HOP_LENGTH or flow.output_size != NUM_MEL_BINS:
        raise ValueError("the decoder config does not produce 80-bin mel at a hop of 256 samples")
    return flow, hift


def load_strict(module: nn.Module, path: str | os.PathLike[str], what: str) -> None:
    """Assign the state dict at ``path`` to ``module``: every key present, none unknown, shapes equal."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state dict (found {type(state).__name__})")
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the {what} model of config.yaml: {error}") from error
    leftover = [name for name, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"{path} left parameters unset: {leftover[:5]}")
