"""SwiGLU feed-forward network with the packed ``w12`` projection of the official ViT-g checkpoints.

The hidden width is 2/3 of ``mlp_ratio·D`` rounded up to a multiple of 8 (4096 for ViT-g), which keeps
the parameter count close to the plain MLP while matching the official tensor shapes.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def swiglu_hidden_features(hidden_features: int) -> int:
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` where ``a`` and ``b`` are the two halves of ``w12(x)``."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True):
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)
