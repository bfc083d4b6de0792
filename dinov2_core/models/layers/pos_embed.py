"""Resize a learned ViT position embedding to another patch grid, exactly as the official checkpoints expect.

Two families exist and give clearly different values (recipe §1.4):

- models without registers: ``interpolate_offset=0.1``, bicubic with
  ``scale_factor=((h+0.1)/M, (w+0.1)/M)`` and no antialias;
- ``_reg4`` models: ``interpolate_offset=0``, bicubic with ``size=(h, w)`` and ``antialias=True``.

The computation runs in float32; the cls slot is never resized; the source grid must be square.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def interpolate_pos_embed(
    pos_embed: Tensor, grid_h: int, grid_w: int, offset: float = 0.1, antialias: bool = False
) -> Tensor:
    """``pos_embed`` (1, 1+M², D) → (1, 1+grid_h·grid_w, D); returned unchanged when the grid is M×M."""
    num_patches = pos_embed.shape[1] - 1
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch slots, which is not a square grid")
    if grid_h == side and grid_w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    source = pos_embed.float()
    grid = source[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        resize = {"scale_factor": ((grid_h + offset) / side, (grid_w + offset) / side)}
    else:
        resize = {"size": (grid_h, grid_w)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **resize)
    if grid.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"interpolated grid {tuple(grid.shape[-2:])} != requested {(grid_h, grid_w)}")
    patches = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((source[:, :1], patches), dim=1).to(pos_embed.dtype)
