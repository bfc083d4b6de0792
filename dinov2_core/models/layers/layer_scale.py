"""LayerScale: a learned per-channel gain on each residual branch (CaiT), key ``gamma``."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma
