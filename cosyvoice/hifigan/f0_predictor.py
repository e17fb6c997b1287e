"""F0 from mel for HiFT's source (``cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor`` in config.yaml):
five weight-normed k3 convolutions with ELU, then a linear layer; |output| in Hz per mel frame."""

from __future__ import annotations

import torch
from torch import nn

from cosyvoice.hifigan.weight_norm import weight_normed

CONDNET_LAYERS = 5


class ConvRNNF0Predictor(nn.Module):
    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(CONDNET_LAYERS):
            layers += [
                weight_normed(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) -> f0 (B, T)."""
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))
