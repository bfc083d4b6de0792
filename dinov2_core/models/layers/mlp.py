"""Two-layer feed-forward network (``fc1`` → exact GELU → ``fc2``), the FFN of ViT-S/B/L."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
