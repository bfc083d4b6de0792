"""Stochastic depth: the per-sample ``DropPath`` and the cheaper batch-subset residual.

``DropPath`` zeroes a whole residual branch for a random subset of samples and rescales the rest by
1/keep; the branch is still computed for every sample. For large rates (> 0.1, the official
threshold) :func:`add_residual_on_subset` computes the branch only for a random subset of
``int(b·(1−p))`` samples and adds it back scaled by ``b / subset``: same expectation, ~p fewer FLOPs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

SUBSET_RESIDUAL_MIN_RATE = 0.1


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def sample_subset(batch: int, rate: float, device: torch.device) -> tuple[Tensor, float]:
    """Random indices of the ``max(int(b·(1−p)), 1)`` samples that get the branch, and the scale b/subset."""
    size = max(int(batch * (1.0 - rate)), 1)
    return torch.randperm(batch, device=device)[:size], batch / size


def add_residual_on_subset(
    xs: list[Tensor], branch: Callable[[list[Tensor]], list[Tensor]], rate: float
) -> list[Tensor]:
    """``x + branch(x)`` for a random batch subset of every crop group (independent per group)."""
    subsets = [sample_subset(x.shape[0], rate, x.device) for x in xs]
    residuals = branch([x[index] for x, (index, _) in zip(xs, subsets)])
    outputs = []
    for x, (index, scale), residual in zip(xs, subsets, residuals):
        flat = torch.index_add(x.flatten(1), 0, index, residual.flatten(1).to(x.dtype), alpha=scale)
        outputs.append(flat.view_as(x))
    return outputs
